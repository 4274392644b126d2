/** @module Interface staircase:agent/compressor-policy@0.1.0 **/
/**
 * The history shortened to at most `budget-tokens` tokens (as counted by
 * `host.count-tokens`), or an error explaining why it cannot be.
 */
export function compress(history: Array<ChatMessage>, budgetTokens: number): Array<ChatMessage>;
export type ChatMessage = import('./staircase-agent-types.js').ChatMessage;
