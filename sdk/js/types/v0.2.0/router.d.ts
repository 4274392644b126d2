// world staircase:agent/router@0.2.0
export type * as StaircaseAgentHost020 from './interfaces/staircase-agent-host.js'; // import staircase:agent/host@0.2.0
export * as routerPolicy from './interfaces/staircase-agent-router-policy.js'; // export staircase:agent/router-policy@0.2.0
