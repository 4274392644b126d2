/** @module Interface staircase:agent/host@0.3.0 **/
/**
 * Writes to the host's log, tagged with the plugin's name and version.
 */
export function log(level: LogLevel, message: string): void;
/**
 * Monotonic clock, in nanoseconds since an arbitrary point fixed for the host's life.
 */
export function nowNs(): bigint;
/**
 * A configuration value for this plugin, if any: set by the operator, or by the
 * pipeline file using the guard (the pipeline's value wins).
 */
export function config(key: string): string | undefined;
/**
 * How many tokens the text takes in the model this plugin is serving.
 * Approximate when the host has no tokenizer for the model (one token per 4 bytes).
 */
export function countTokens(text: string): number;
/**
 * # Variants
 * 
 * ## `"trace"`
 * 
 * ## `"debug"`
 * 
 * ## `"info"`
 * 
 * ## `"warn"`
 * 
 * ## `"error"`
 */
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error';
