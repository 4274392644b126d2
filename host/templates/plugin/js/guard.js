// {{name}}: an output guard in JavaScript (componentize-js). The resource `guard-stream` of
// `guard-policy` is the class `guardPolicy.GuardStream`: one per answer. It sees the text
// before the client does and replaces every "password" with "[hidden]"; the host shows it
// the whole window not yet released, so a word split across chunks is seen whole, and it
// holds back a tail that could still become the word. Offsets are UTF-8 bytes, as the host
// counts them.
const WORD = 'password';
const MASK = '[hidden]';
const bytes = (text) => new TextEncoder().encode(text).length;

function judge(window, last) {
  const edits = [];
  for (let at = window.indexOf(WORD); at >= 0; at = window.indexOf(WORD, at + WORD.length)) {
    const start = bytes(window.slice(0, at));
    edits.push({ start, end: start + bytes(WORD), text: MASK });
  }
  const edited = bytes(window) + edits.length * (bytes(MASK) - bytes(WORD));
  let hold = 0;
  if (!last) {
    for (let n = WORD.length - 1; n > 0; n--) {
      if (window.endsWith(WORD.slice(0, n))) {
        hold = n;
        break;
      }
    }
  }
  return { tag: 'redact', val: { edits, release: edited - hold } };
}

class GuardStream {
  constructor(info) {
    this.info = info;
  }

  push(window, newBytes, tokens) {
    return judge(window, false);
  }

  finish(window) {
    return judge(window, true);
  }
}

export const guardPolicy = { GuardStream };
