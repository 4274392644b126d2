// world staircase:agent/compressor@0.1.0
export type * as StaircaseAgentHost010 from './interfaces/staircase-agent-host.js'; // import staircase:agent/host@0.1.0
export type * as StaircaseAgentModel010 from './interfaces/staircase-agent-model.js'; // import staircase:agent/model@0.1.0
export type * as StaircaseAgentTypes010 from './interfaces/staircase-agent-types.js'; // import staircase:agent/types@0.1.0
export * as compressorPolicy from './interfaces/staircase-agent-compressor-policy.js'; // export staircase:agent/compressor-policy@0.1.0
