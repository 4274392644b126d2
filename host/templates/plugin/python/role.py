"""{{name}}: a role plugin in Python (componentize-py).

The host asks it for the agent's system prompt, the messages to send to the model, and how
to generate. componentize-py looks for the class of the exported interface here
(`RolePolicy`). Host imports (`host.config`, `host.log`) work inside methods only, not at
module level (the module is pre-initialised while building).
"""

from typing import List

from wit_world import exports
from wit_world.exports.role_policy import RoleInput
from wit_world.imports import host
from wit_world.imports.types import ChatMessage, GenerationParams, Role

DEFAULT_PROMPT = "You are a helpful assistant. Answer briefly."


class RolePolicy(exports.RolePolicy):
    def system_prompt(self) -> str:
        return host.config("system-prompt") or DEFAULT_PROMPT

    def build_messages(self, input: RoleInput) -> List[ChatMessage]:
        host.log(host.LogLevel.DEBUG, f"{len(input.conversation)} messages in")
        messages = [ChatMessage(role=Role.SYSTEM, content=self.system_prompt())]
        messages.extend(input.conversation)
        if input.upstream:
            context = "Responses from other agents:\n" + "".join(
                f"\n### {u.source.label}\n{u.text}\n" for u in input.upstream
            )
            messages.append(ChatMessage(role=Role.USER, content=context))
        return messages

    def params(self) -> GenerationParams:
        return GenerationParams(max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, stop=[])
