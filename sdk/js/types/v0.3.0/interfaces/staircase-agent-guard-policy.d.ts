/** @module Interface staircase:agent/guard-policy@0.3.0 **/
/**
 * Where a stream's text comes from and goes to.
 */
export interface StreamInfo {
  /**
   * The pipeline node that generates it (a plain model's answer: "answer").
   */
  nodeId: string,
  /**
   * The model generating it.
   */
  model: string,
  /**
   * True when the text goes to the client; false on an inner edge (into another node).
   */
  toClient: boolean,
  /**
   * The most text the host holds back for this guard, in bytes. When the guard holds
   * a full window, the host releases its oldest text to make room; a guard that must
   * see more asks its operator for a larger `window-bytes` in its manifest.
   */
  windowBytes: number,
}
/**
 * Replace the bytes `start..end` of the window with `text`.
 */
export interface Edit {
  start: number,
  end: number,
  text: string,
}
export interface Redaction {
  edits: Array<Edit>,
  release: number,
}
/**
 * The guard's answer to a push or to the end of the stream.
 */
export type Verdict = VerdictRelease | VerdictRedact | VerdictStop;
/**
 * Release the window's first `n` bytes as they are (0: hold everything, the guard
 * needs more text). At the end of the stream the whole window is released.
 */
export interface VerdictRelease {
  tag: 'release',
  val: number,
}
/**
 * Apply the edits (in order, not overlapping, offsets into the window before any
 * edit), then release the first `release` bytes of the edited window.
 */
export interface VerdictRedact {
  tag: 'redact',
  val: Redaction,
}
/**
 * End the stream here: nothing more of it leaves, and the client is told why.
 */
export interface VerdictStop {
  tag: 'stop',
  val: string,
}

export class GuardStream {
  /**
  * A stream begins: where its text comes from and goes to.
  */
  constructor(info: StreamInfo)
  /**
  * New text arrived. `window` is all the text not yet released, ending with the new
  * chunk; `new-bytes` of it are new, `tokens` the new chunk's token count.
  */
  push(window: string, newBytes: number, tokens: number): Verdict;
  /**
  * The stream ended; `window` is what is still held. `release(n)` with any `n`
  * releases all of it.
  */
  finish(window: string): Verdict;
}
