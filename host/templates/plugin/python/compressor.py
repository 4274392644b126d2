"""{{name}}: a compressor plugin in Python (componentize-py).

It shortens a conversation history to a token budget, keeping the system messages and the
most recent turns that fit. To fail, raise `componentize_py_types.Err("why")`.
"""

from typing import List

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import ChatMessage, Role


class CompressorPolicy(exports.CompressorPolicy):
    def compress(self, history: List[ChatMessage], budget_tokens: int) -> List[ChatMessage]:
        system = [m for m in history if m.role == Role.SYSTEM]
        used = sum(host.count_tokens(m.content) for m in system)
        kept: List[ChatMessage] = []
        for message in reversed([m for m in history if m.role != Role.SYSTEM]):
            tokens = host.count_tokens(message.content)
            if used + tokens > budget_tokens:
                break
            used += tokens
            kept.append(message)
        return system + list(reversed(kept))
