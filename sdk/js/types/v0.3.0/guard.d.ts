// world staircase:agent/guard@0.3.0
export type * as StaircaseAgentHost030 from './interfaces/staircase-agent-host.js'; // import staircase:agent/host@0.3.0
export * as guardPolicy from './interfaces/staircase-agent-guard-policy.js'; // export staircase:agent/guard-policy@0.3.0
