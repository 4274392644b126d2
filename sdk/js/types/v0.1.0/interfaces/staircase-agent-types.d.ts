/** @module Interface staircase:agent/types@0.1.0 **/
/**
 * Who wrote a chat message.
 * # Variants
 * 
 * ## `"system"`
 * 
 * ## `"user"`
 * 
 * ## `"assistant"`
 */
export type Role = 'system' | 'user' | 'assistant';
/**
 * One message of a conversation.
 */
export interface ChatMessage {
  role: Role,
  content: string,
}
/**
 * How a model should generate. A temperature of 0 means greedy decoding.
 */
export interface GenerationParams {
  /**
   * Upper bound on generated tokens.
   */
  maxTokens: number,
  temperature: number,
  /**
   * Nucleus sampling mass; 1.0 disables it.
   */
  topP: number,
  /**
   * Keep only the k most likely tokens; 0 disables it.
   */
  topK: number,
  /**
   * Generation stops before any of these strings.
   */
  stop: Array<string>,
}
/**
 * An upstream node whose output reaches this plugin.
 */
export interface Source {
  /**
   * The node id from the pipeline file; unique within a run.
   */
  id: string,
  /**
   * A human-readable label, such as the node's role name.
   */
  label: string,
}
/**
 * The finished output of an upstream node.
 */
export interface UpstreamOutput {
  source: Source,
  text: string,
}
