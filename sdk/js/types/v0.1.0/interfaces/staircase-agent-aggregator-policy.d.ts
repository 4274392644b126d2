/** @module Interface staircase:agent/aggregator-policy@0.1.0 **/
export type ChatMessage = import('./staircase-agent-types.js').ChatMessage;
export type Source = import('./staircase-agent-types.js').Source;
/**
 * How the pipeline runs this aggregator.
 * # Variants
 * 
 * ## `"staircase"`
 * 
 * Step on the first chunks of the sources, then again as more arrive.
 * ## `"layered"`
 * 
 * Classic Mixture-of-Agents: one step once every source is complete.
 */
export type StreamMode = 'staircase' | 'layered';
/**
 * Whether the aggregator still wants a source's output.
 * # Variants
 * 
 * ## `"more"`
 * 
 * Keep sending chunks.
 * ## `"enough"`
 * 
 * This source has given enough; the host may cancel it.
 */
export type Demand = 'more' | 'enough';
/**
 * One generation step of the aggregator model.
 */
export interface Step {
  /**
   * The full prompt for this step. Keeping its beginning stable across steps lets the
   * host reuse the cached prefix.
   */
  messages: Array<ChatMessage>,
  /**
   * How many tokens to generate in this step, continuing the answer so far. On the
   * final step, 0 means "until the model stops or the node's budget is spent". On any
   * other step, 0 is a warm-up: the host prefills `messages` into the prefix cache and
   * generates nothing, so a later step that extends them prefills only what it adds
   * (return one from the first `next-step`, before any text has arrived).
   */
  maxTokens: number,
  /**
   * The last step: generate until the model stops (or `max-tokens`, when not 0);
   * `next-step` is not called again.
   */
  final: boolean,
}

export class Session {
  /**
  * Starts a run: the user's conversation, the sources that will stream, the mode.
  */
  constructor(conversation: Array<ChatMessage>, sources: Array<Source>, mode: StreamMode)
  /**
  * A chunk of text from a source; chunks of one source arrive in order.
  */
  push(sourceId: string, text: string): Demand;
  /**
  * The source has no more output (finished or cancelled).
  */
  finish(sourceId: string): void;
  /**
  * The aggregator's answer so far grew by this text (the host's own output, so the
  * policy can budget the next step).
  */
  answered(text: string): void;
  /**
  * Asked after every push and finish: the step to run now, if any.
  */
  nextStep(): Step | undefined;
}
