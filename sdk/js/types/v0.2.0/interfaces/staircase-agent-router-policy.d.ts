/** @module Interface staircase:agent/router-policy@0.2.0 **/
/**
 * Which of `request.models` writes the next step of the node, and why.
 */
export function route(request: RouteRequest): RouteChoice;
/**
 * How sure a model was of the tokens it just generated.
 */
export interface Confidence {
  /**
   * The model that generated them.
   */
  model: string,
  /**
   * Tokens measured.
   */
  tokens: number,
  /**
   * Mean probability of the most likely next token (1.0: certain).
   */
  meanTopProb: number,
  /**
   * Mean entropy of the next-token distribution, in nats (0.0: certain).
   */
  meanEntropy: number,
}
/**
 * What the router knows about a step.
 */
export interface RouteRequest {
  /**
   * The pipeline node asking.
   */
  nodeId: string,
  /**
   * The node's label (its role, such as "analyst").
   */
  role: string,
  /**
   * Tokens in the prompt of this step.
   */
  promptTokens: number,
  /**
   * The text of the latest user message.
   */
  query: string,
  /**
   * The models the operator made available, by name.
   */
  models: Array<string>,
  /**
   * Tokens of the node's answer so far (0 on its first step).
   */
  answerTokens: number,
  /**
   * The node's token budget for its whole answer.
   */
  maxTokens: number,
  /**
   * The model of the node's previous step, if any.
   */
  previousModel?: string,
  /**
   * Confidence over the previous step's tokens, when its engine reports it (the
   * embedded engine does; remote servers may not).
   */
  confidence?: Confidence,
}
/**
 * The router's answer.
 */
export interface RouteChoice {
  /**
   * One of `request.models`.
   */
  model: string,
  /**
   * Why, in a few words (shown in run reports and traces).
   */
  reason: string,
}
