"""The API surface operators of vLLM and llama-server expect, through the official `openai`
Python client: `/v1/completions` (whole and streamed), the extra sampling fields (`top_k`,
`min_p`, `repetition_penalty`, OpenAI's penalties) and vLLM's metric names on `/metrics`.

Driven by `tests/serve_api.rs`, which starts a real server (no key) on a loopback port and
stops it after. Nothing else talks to that server, so the metrics must add up exactly to
what this script was answered. Every check raises on failure; the exit code says whether any
did.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import openai

MODEL = "default"
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "Tell me a story about a fox."}]


def check(condition, message):
    if not condition:
        raise AssertionError(message)


class Tally:
    """What the server answered, to compare with its metrics."""

    def __init__(self):
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, usage):
        check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage)
        self.requests += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens


def expect_400(call, param):
    try:
        call()
    except openai.BadRequestError as error:
        got = (error.body or {}).get("param")
        check(got == param, f"param {got!r} != {param!r}: {error.body}")
        return
    raise AssertionError(f"expected a 400 naming {param}")


def completions(client, tally, args_base):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    tally.add(whole.usage)
    check(whole.object == "text_completion" and whole.id.startswith("cmpl-"), whole)
    text = whole.choices[0].text
    check(text.strip(), f"empty answer: {whole}")
    check(whole.choices[0].finish_reason in ("stop", "length"), whole)
    check(0 < whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0, whole.usage)
    # Raw text, no chat template: the prompt is a handful of tokens.
    check(whole.usage.prompt_tokens < 12, f"a template was applied? {whole.usage}")

    # An array of one string is the same prompt.
    again = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=8, temperature=0)
    tally.add(again.usage)
    check(again.choices[0].text == text, (again.choices[0].text, text))

    # Streamed: text chunks, one finish, then usage, then [DONE] (the client ends there).
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    check(streamed == text, f"streamed {streamed!r} != whole {text!r}")
    check(all(c.object == "text_completion" for c in chunks), chunks[0])
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    check(len(finish) == 1, f"{len(finish)} finish chunks")
    last = chunks[-1]
    check(not last.choices and last.usage, last)
    check(last.usage.completion_tokens == whole.usage.completion_tokens, (last.usage, whole.usage))
    tally.add(last.usage)

    # A stop string ends the text before it.
    if len(text) >= 5:
        stop = text[2:5]
        cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
        tally.add(cut.usage)
        check(cut.choices[0].text == text[: text.index(stop)], (cut.choices[0].text, stop, text))
        check(cut.choices[0].finish_reason == "stop", cut)

    # A high temperature with top_k = 1 is the greedy answer: the field reaches the sampler.
    for seed in (1, 2):
        hot = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=2, seed=seed, extra_body={"top_k": 1}
        )
        tally.add(hot.usage)
        check(hot.choices[0].text == text, f"top_k=1 at seed {seed}: {hot.choices[0].text!r} != {text!r}")

    expect_400(lambda: client.completions.create(model=MODEL, prompt=PROMPT, echo=True), "echo")
    expect_400(lambda: client.completions.create(model=MODEL, prompt=PROMPT, n=2), "n")
    expect_400(lambda: client.completions.create(model=MODEL, prompt=["a", "b"]), "prompt")
    expect_400(lambda: client.completions.create(model="moa", prompt=PROMPT), "model")
    # A page's "simple" cross-origin POST (text/plain) is refused before the body is read.
    body = json.dumps({"model": MODEL, "prompt": PROMPT}).encode()
    request = urllib.request.Request(args_base + "/v1/completions", data=body, method="POST")
    request.add_header("Content-Type", "text/plain")
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("text/plain was accepted")
    except urllib.error.HTTPError as error:
        check(error.code == 415, error.code)
    print(f"completions: {text!r}, streamed alike, stop and top_k honoured", flush=True)


def sampling_fields(client, tally):
    greedy = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    tally.add(greedy.usage)
    answer = greedy.choices[0].message.content
    for seed in (1, 2):
        for extra in ({"top_k": 1}, {"min_p": 1.0}):
            hot = client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=12, temperature=2, seed=seed, extra_body=extra
            )
            tally.add(hot.usage)
            got = hot.choices[0].message.content
            check(got == answer, f"{extra} at seed {seed}: {got!r} != greedy {answer!r}")
    # llama-server's and vLLM's names for the penalty are both taken.
    for extra in ({"repetition_penalty": 1.2}, {"repeat_penalty": 1.2, "top_k": 40, "min_p": 0.05}):
        ok = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, extra_body=extra)
        tally.add(ok.usage)
    # OpenAI's own penalties (llama.cpp's, over llama-server's `repeat_last_n` window).
    ok = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"repeat_last_n": 128},
    )
    tally.add(ok.usage)
    # A pipeline takes them too (on its answering node).
    moa = client.chat.completions.create(
        model="moa", messages=QUESTION, max_tokens=4, extra_body={"top_k": 1, "repetition_penalty": 1.1}
    )
    check(moa.choices[0].message.content is not None, moa)
    for extra, param in (
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repeat_last_n": -5}, "repeat_last_n"),
    ):
        expect_400(
            lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=extra), param
        )
    print("sampling fields: top_k = 1 and min_p = 1 greedy at temperature 2; nonsense refused", flush=True)


def metrics(base, tally):
    with urllib.request.urlopen(base + "/metrics", timeout=60) as response:
        text = response.read().decode()

    def value(name, **labels):
        total, seen = 0.0, False
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            series, _, number = line.rpartition(" ")
            if series.split("{", 1)[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(number)
                seen = True
        check(seen, f"{name} {labels} missing from /metrics")
        return total

    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        for model in (MODEL, "moa"):
            check(value(gauge, model_name=model) == 0, f"{gauge} {model} is not 0 when idle")
    check(value("vllm:prompt_tokens_total", model_name=MODEL) == tally.prompt_tokens, tally.prompt_tokens)
    check(value("vllm:generation_tokens_total", model_name=MODEL) == tally.completion_tokens,
          tally.completion_tokens)
    check(value("vllm:e2e_request_latency_seconds_count", model_name=MODEL) == tally.requests, tally.requests)
    ttft = value("vllm:time_to_first_token_seconds_count", model_name=MODEL)
    check(0 < ttft <= tally.requests, ttft)
    check(value("vllm:request_success_total", model_name=MODEL) == tally.requests, tally.requests)
    # Our own names stay.
    check(value("staircase_prompt_tokens_total", model=MODEL) == tally.prompt_tokens, "staircase_prompt_tokens_total")
    check(value("staircase_completion_tokens_total", model=MODEL) == tally.completion_tokens,
          "staircase_completion_tokens_total")
    print(f"metrics: vLLM's names add up to {tally.requests} requests, {tally.prompt_tokens} prompt and "
          f"{tally.completion_tokens} generated tokens", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url + "/v1", api_key="none", max_retries=0, timeout=300)
    tally = Tally()
    completions(client, tally, args.base_url)
    sampling_fields(client, tally)
    metrics(args.base_url, tally)
    print(json.dumps({"requests": tally.requests}))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
