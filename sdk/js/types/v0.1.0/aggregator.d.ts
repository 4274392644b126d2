// world staircase:agent/aggregator@0.1.0
export type * as StaircaseAgentHost010 from './interfaces/staircase-agent-host.js'; // import staircase:agent/host@0.1.0
export type * as StaircaseAgentTypes010 from './interfaces/staircase-agent-types.js'; // import staircase:agent/types@0.1.0
export * as aggregatorPolicy from './interfaces/staircase-agent-aggregator-policy.js'; // export staircase:agent/aggregator-policy@0.1.0
