"""The session resource of the `aggregator-policy` interface (see app.py)."""

from typing import List, Optional

from wit_world.exports import aggregator_policy as api
from wit_world.imports import host
from wit_world.imports.types import ChatMessage, Role, Source

INSTRUCTION = (
    "Combine the responses below into one accurate answer to the user's question. "
    "Responses may still be arriving."
)
# New text (characters) that earns another intermediate step, unless configured.
DEFAULT_STEP_CHARS = 200
# Tokens generated per intermediate step.
STEP_TOKENS = 16
FINAL_TOKENS = 512


class Session(api.Session):
    def __init__(self, conversation: List[ChatMessage], sources: List[Source], mode: api.StreamMode) -> None:
        question = next((m.content for m in reversed(conversation) if m.role == Role.USER), "")
        self.head = f"{question}\n\nResponses:"
        self.labels = {s.id: s.label for s in sources}
        self.open = set(self.labels)
        self.mode = mode
        self.body = ""
        self.last = None
        self.new = 0
        self.steps = 0
        self.done = False
        # Host imports are only available at run time, not while componentize-py
        # pre-initialises the module, so configuration is read here.
        self.step_chars = int(host.config("step-chars") or DEFAULT_STEP_CHARS)

    def push(self, source_id: str, text: str) -> api.Demand:
        if source_id != self.last:
            self.body += f"\n\n[{self.labels.get(source_id, source_id)}]\n"
            self.last = source_id
        self.body += text
        self.new += len(text)
        return api.Demand.MORE

    def finish(self, source_id: str) -> None:
        self.open.discard(source_id)

    def answered(self, text: str) -> None:
        pass

    def next_step(self) -> Optional[api.Step]:
        if self.done:
            return None
        final = not self.open
        due = final or (
            self.mode == api.StreamMode.STAIRCASE
            and self.new > 0
            and (self.steps == 0 or self.new >= self.step_chars)
        )
        if not due:
            return None
        self.done = final
        self.new = 0
        self.steps += 1
        messages = [
            ChatMessage(role=Role.SYSTEM, content=INSTRUCTION),
            ChatMessage(role=Role.USER, content=self.head + self.body),
        ]
        return api.Step(messages=messages, max_tokens=FINAL_TOKENS if final else STEP_TOKENS, final=final)
