"""The guard stream of {{name}}: it sees an answer's text before the client does and replaces
every "password" with "[hidden]". The host shows it the whole window of text not yet
released, so a word split across chunks is seen whole; it holds back a tail that could still
become the word. Offsets are UTF-8 bytes of the window, as the host counts them."""

from wit_world.exports import guard_policy as api

WORD = b"password"
MASK = "[hidden]"


def judge(window: str, last: bool) -> api.Verdict:
    data = window.encode()
    edits, at = [], data.find(WORD)
    while at >= 0:
        edits.append(api.Edit(start=at, end=at + len(WORD), text=MASK))
        at = data.find(WORD, at + len(WORD))
    edited = len(data) + len(edits) * (len(MASK.encode()) - len(WORD))
    hold = 0 if last else next((n for n in range(len(WORD) - 1, 0, -1) if data.endswith(WORD[:n])), 0)
    return api.Verdict_Redact(api.Redaction(edits=edits, release=edited - hold))


class GuardStream(api.GuardStream):
    def __init__(self, info: api.StreamInfo) -> None:
        self.info = info

    def push(self, window: str, new_bytes: int, tokens: int) -> api.Verdict:
        return judge(window, False)

    def finish(self, window: str) -> api.Verdict:
        return judge(window, True)
