// {{name}}: a compressor plugin in JavaScript (componentize-js). It shortens a conversation
// history to a token budget, keeping the system messages and the most recent turns that
// fit. To fail, throw an error: the host gets its message.
import { countTokens } from 'staircase:agent/host@0.1.0';

export const compressorPolicy = {
  compress(history, budgetTokens) {
    const system = history.filter((m) => m.role === 'system');
    let used = system.reduce((sum, m) => sum + countTokens(m.content), 0);
    const kept = [];
    for (const message of history.filter((m) => m.role !== 'system').reverse()) {
      const tokens = countTokens(message.content);
      if (used + tokens > budgetTokens) {
        break;
      }
      used += tokens;
      kept.unshift(message);
    }
    return [...system, ...kept];
  },
};
