// world staircase:agent/role@0.1.0
export type * as StaircaseAgentHost010 from './interfaces/staircase-agent-host.js'; // import staircase:agent/host@0.1.0
export type * as StaircaseAgentTypes010 from './interfaces/staircase-agent-types.js'; // import staircase:agent/types@0.1.0
export * as rolePolicy from './interfaces/staircase-agent-role-policy.js'; // export staircase:agent/role-policy@0.1.0
