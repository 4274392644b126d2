"""Calling `staircase serve` with the official OpenAI Python client, unchanged.

    staircase serve &                       # http://127.0.0.1:8080
    pip install openai
    python examples/clients/chat.py         # or: python chat.py --model default "Hi"

Every pipeline is a model (`moa`, `debate`, any file of a `--pipelines` folder), and so is
the embedded model itself (`default`). The run report (TTFT, per-node timings, critical
path, cache counters) arrives as the extra `staircase` object.
"""

import argparse
import os

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("prompt", nargs="?", default="Why is the sky blue?")
parser.add_argument("--model", default="moa")
parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
args = parser.parse_args()

# Any key works unless the server was started with --api-key-env.
client = OpenAI(base_url=args.base_url, api_key=os.environ.get("STAIRCASE_API_KEY", "none"))

print("models:", ", ".join(m.id for m in client.models.list()))

stream = client.chat.completions.create(
    model=args.model,
    messages=[{"role": "user", "content": args.prompt}],
    max_tokens=128,
    stream=True,
    stream_options={"include_usage": True},
)
report = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n\nusage: {chunk.usage.prompt_tokens} prompt, {chunk.usage.completion_tokens} completion tokens")
    report = (chunk.model_extra or {}).get("staircase", report)
if report and report.get("ttft_ms") is not None:
    print(f"first token after {report['ttft_ms']:.0f} ms; critical path "
          + " -> ".join(report["critical_path_measured"]["nodes"]))
