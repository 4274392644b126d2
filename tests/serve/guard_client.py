"""A stop verdict through the official OpenAI client: a stream ends with finish_reason
`content_filter`, nothing of the banned phrase in its text, and a whole answer carries the
guard's reason as its `refusal`. Exits non-zero on the first failed check."""

import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", required=True)
args = parser.parse_args()
client = OpenAI(base_url=f"{args.base_url}/v1", api_key="unused")

# The model copies the pattern of the conversation: it answers with the address.
messages = [
    {"role": "user", "content": "Say: bob@example.org"},
    {"role": "assistant", "content": "bob@example.org"},
    {"role": "user", "content": "Say: ada@example.org"},
]

stream = client.chat.completions.create(
    model="default", messages=messages, max_tokens=20, temperature=0, stream=True
)
text, reasons = "", []
for chunk in stream:
    for choice in chunk.choices:
        text += choice.delta.content or ""
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
assert reasons == ["content_filter"], reasons
assert "example.org" not in text, text

whole = client.chat.completions.create(
    model="default", messages=messages, max_tokens=20, temperature=0
)
choice = whole.choices[0]
assert choice.finish_reason == "content_filter", choice
assert "example.org" not in (choice.message.content or ""), choice
assert "banned phrase" in (choice.message.refusal or ""), choice
print("guard client checks passed")
