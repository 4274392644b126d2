// Builds the JavaScript example into a component with componentize-js (the library: the
// `jco componentize` CLI fails here). Usage: node build.mjs [OUT.wasm]
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, 'js-reviewer.wasm');
const { component } = await componentize({
  sourcePath: join(here, 'role.js'),
  witPath: join(here, '..', '..', '..', 'wit', 'v0.1.0'),
  worldName: 'role',
  // A policy needs no other WASI feature (a smaller component with fewer imports); stdio
  // stays, so console.log and console.error become the plugin's log lines.
  disableFeatures: ['random', 'clocks', 'http', 'fetch-event'],
});
await writeFile(out, component);
console.log(`wrote ${out} (${component.length} bytes)`);
