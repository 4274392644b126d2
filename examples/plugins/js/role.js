// A role in JavaScript (componentize-js): a reviewer that critiques the other agents'
// answers. The exported interface `role-policy` is this module's `rolePolicy` object;
// WIT records are plain objects with camelCase fields, enums are strings.
import { config, log } from 'staircase:agent/host@0.1.0';

const DEFAULT_PROMPT =
  'You are a careful reviewer. Point out errors in the answers below, then give the correct answer.';

function systemPrompt() {
  return config('system-prompt') ?? DEFAULT_PROMPT;
}

export const rolePolicy = {
  systemPrompt,

  buildMessages(input) {
    const messages = [{ role: 'system', content: systemPrompt() }, ...input.conversation];
    if (input.upstream.length > 0) {
      const answers = input.upstream
        .map((u) => `### ${u.source.label}\n${u.text}`)
        .join('\n\n');
      messages.push({ role: 'user', content: `Answers to review:\n\n${answers}` });
    } else {
      log('warn', 'reviewer called without upstream answers');
    }
    return messages;
  },

  params() {
    return { maxTokens: 256, temperature: 0.2, topP: 1.0, topK: 0, stop: [] };
  },
};
