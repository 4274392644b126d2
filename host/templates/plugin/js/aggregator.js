// {{name}}: an aggregator plugin in JavaScript (componentize-js). The resource `session`
// of `aggregator-policy` is the class `aggregatorPolicy.Session`: one per pipeline run. It
// receives the upstream agents' text as it streams and decides when, and with what prompt,
// the aggregator model writes.
const INSTRUCTION = 'Combine the responses below into one accurate answer to the question.';
const STEP_TOKENS = 16;
const FINAL_TOKENS = 512;

class Session {
  constructor(conversation, sources, mode) {
    const question = [...conversation].reverse().find((m) => m.role === 'user')?.content ?? '';
    this.head = `${question}\n\nResponses:\n`;
    this.body = '';
    this.open = new Set(sources.map((s) => s.id));
    this.mode = mode;
    this.newText = false;
    this.done = false;
  }

  push(sourceId, text) {
    // Text in arrival order keeps every prompt an extension of the last one.
    this.body += text;
    this.newText = true;
    return 'more';
  }

  finish(sourceId) {
    this.open.delete(sourceId);
  }

  answered(text) {}

  nextStep() {
    const last = this.open.size === 0;
    const due = last || (this.mode === 'staircase' && this.newText);
    if (this.done || !due) {
      return undefined;
    }
    this.done = last;
    this.newText = false;
    return {
      messages: [
        { role: 'system', content: INSTRUCTION },
        { role: 'user', content: this.head + this.body },
      ],
      maxTokens: last ? FINAL_TOKENS : STEP_TOKENS,
      final: last,
    };
  }
}

export const aggregatorPolicy = { Session };
