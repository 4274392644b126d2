// {{name}}: a role plugin in JavaScript (componentize-js). The exported interface
// `role-policy` is this module's `rolePolicy` object; WIT records are plain objects with
// camelCase fields, enums are strings ('system'), options are a value or undefined.
import { config, log } from 'staircase:agent/host@0.1.0';

const DEFAULT_PROMPT = 'You are a helpful assistant. Answer briefly.';

function systemPrompt() {
  return config('system-prompt') ?? DEFAULT_PROMPT;
}

export const rolePolicy = {
  systemPrompt,

  buildMessages(input) {
    log('debug', `${input.conversation.length} messages in`);
    const messages = [{ role: 'system', content: systemPrompt() }, ...input.conversation];
    if (input.upstream.length > 0) {
      const answers = input.upstream.map((u) => `### ${u.source.label}\n${u.text}`).join('\n\n');
      messages.push({ role: 'user', content: `Responses from other agents:\n\n${answers}` });
    }
    return messages;
  },

  params() {
    return { maxTokens: 256, temperature: 0.0, topP: 1.0, topK: 0, stop: [] };
  },
};
