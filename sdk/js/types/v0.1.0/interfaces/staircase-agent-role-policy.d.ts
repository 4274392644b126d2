/** @module Interface staircase:agent/role-policy@0.1.0 **/
/**
 * The agent's system prompt.
 */
export function systemPrompt(): string;
/**
 * The messages sent to the model for this input, system prompt included.
 */
export function buildMessages(input: RoleInput): Array<ChatMessage>;
/**
 * The generation parameters this agent wants.
 */
export function params(): GenerationParams;
export type ChatMessage = import('./staircase-agent-types.js').ChatMessage;
export type GenerationParams = import('./staircase-agent-types.js').GenerationParams;
export type UpstreamOutput = import('./staircase-agent-types.js').UpstreamOutput;
/**
 * What the agent receives: the user's conversation and the outputs of its upstream nodes.
 */
export interface RoleInput {
  conversation: Array<ChatMessage>,
  upstream: Array<UpstreamOutput>,
}
