/** @module Interface staircase:agent/model@0.1.0 **/
/**
 * Runs the plugin's model on the messages to completion and returns the answer. The
 * plugin's call deadline covers the whole generation.
 */
export function complete(messages: Array<ChatMessage>, params: GenerationParams): string;
export type ChatMessage = import('./staircase-agent-types.js').ChatMessage;
export type GenerationParams = import('./staircase-agent-types.js').GenerationParams;
