// Run by `staircase plugin build` in the plugin's folder (node --input-type=module), so
// componentize-js resolves from the plugin's own node_modules. Arguments come in the
// environment: the source, the WIT folder, the world and the output file.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';

const env = process.env;
const { component } = await componentize({
  sourcePath: env.STAIRCASE_SOURCE,
  witPath: env.STAIRCASE_WIT,
  worldName: env.STAIRCASE_WORLD,
  // A policy needs no other WASI feature (a smaller component with fewer imports); stdio
  // stays, so console.log and console.error become the plugin's log lines.
  disableFeatures: ['random', 'clocks', 'http', 'fetch-event'],
});
await writeFile(env.STAIRCASE_OUT, component);
