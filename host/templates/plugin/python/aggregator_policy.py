"""The session resource of {{name}}: it receives the upstream agents' text as it streams
and decides when, and with what prompt, the aggregator model writes."""

from typing import List, Optional

from wit_world.exports import aggregator_policy as api
from wit_world.imports.types import ChatMessage, Role, Source

INSTRUCTION = "Combine the responses below into one accurate answer to the question."
STEP_TOKENS = 16
FINAL_TOKENS = 512


class Session(api.Session):
    def __init__(self, conversation: List[ChatMessage], sources: List[Source], mode: api.StreamMode) -> None:
        question = next((m.content for m in reversed(conversation) if m.role == Role.USER), "")
        self.head = f"{question}\n\nResponses:\n"
        self.body = ""
        self.open = {s.id for s in sources}
        self.mode = mode
        self.new_text = False
        self.done = False

    def push(self, source_id: str, text: str) -> api.Demand:
        # Text in arrival order keeps every prompt an extension of the last one, so the
        # host's prefix cache serves it.
        self.body += text
        self.new_text = True
        return api.Demand.MORE

    def finish(self, source_id: str) -> None:
        self.open.discard(source_id)

    def answered(self, text: str) -> None:
        pass

    def next_step(self) -> Optional[api.Step]:
        last = not self.open
        due = last or (self.mode == api.StreamMode.STAIRCASE and self.new_text)
        if self.done or not due:
            return None
        self.done = last
        self.new_text = False
        messages = [
            ChatMessage(role=Role.SYSTEM, content=INSTRUCTION),
            ChatMessage(role=Role.USER, content=self.head + self.body),
        ]
        return api.Step(messages=messages, max_tokens=FINAL_TOKENS if last else STEP_TOKENS, final=last)
