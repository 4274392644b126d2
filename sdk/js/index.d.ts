// The modules a plugin imports, under the names componentize-js gives them, typed by the
// declarations `jco types` generated from the WIT (sdk/wit). What each kind exports is its
// world's interface module under types/ (e.g. types/v0.1.0/interfaces/
// staircase-agent-role-policy.d.ts).

declare module 'staircase:agent/host@0.1.0' {
  export * from '@staircase/agent-types/types/v0.1.0/interfaces/staircase-agent-host.js';
}
declare module 'staircase:agent/types@0.1.0' {
  export * from '@staircase/agent-types/types/v0.1.0/interfaces/staircase-agent-types.js';
}
declare module 'staircase:agent/model@0.1.0' {
  export * from '@staircase/agent-types/types/v0.1.0/interfaces/staircase-agent-model.js';
}
declare module 'staircase:agent/host@0.2.0' {
  export * from '@staircase/agent-types/types/v0.2.0/interfaces/staircase-agent-host.js';
}
declare module 'staircase:agent/host@0.3.0' {
  export * from '@staircase/agent-types/types/v0.3.0/interfaces/staircase-agent-host.js';
}
