"""`staircase serve` through the official `openai` Python client.

Driven by `tests/serve.rs`, which starts a real server on a loopback port with a scratch
plugin folder and pipeline folder, passes their paths here, and stops the server after.
Every check raises on failure; the script exits non-zero if any phase failed.
"""

import argparse
import concurrent.futures as futures
import hashlib
import json
import os
import re
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

import openai

QUESTION = [{"role": "user", "content": "Name one planet."}]
# Upper bound on any wait for the server to show a state (a swap, freed sequences): far above
# what it takes, so only a real failure reaches it.
WAIT_SECS = 120


class Server:
    def __init__(self, base, key):
        self.base = base
        self.key = key

    def client(self, key=None, retries=0):
        return openai.OpenAI(
            base_url=self.base + "/v1",
            api_key=key or self.key,
            max_retries=retries,
            timeout=300,
        )

    def get(self, path, key=None):
        request = urllib.request.Request(self.base + path)
        request.add_header("Authorization", "Bearer " + (key or self.key))
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()

    def get_json(self, path):
        return json.loads(self.get(path)[2])

    def metrics(self):
        text = self.get("/metrics")[2].decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
        return values

    def metric(self, name, **labels):
        """Sum of the series of `name` whose labels include `labels`."""
        total = 0.0
        for series, value in self.metrics().items():
            base = series.split("{", 1)[0]
            if base != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += value
        return total

    def wait_for(self, what, condition):
        deadline = time.monotonic() + WAIT_SECS
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.02)  # polling an observable state, not timing the test
        raise AssertionError(f"timed out waiting for {what}")


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def collect(stream):
    """Text, the last chunk, and every chunk of a streamed completion."""
    text, chunks = "", []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text, chunks


# ---- phases -------------------------------------------------------------------------------


def basics(server):
    client = server.client()
    models = {m.id: m for m in client.models.list().data}
    for name in ("moa", "reload", "guarded", "default"):
        check(name in models, f"{name} missing from models.list(): {sorted(models)}")
    moa = models["moa"].model_dump()
    check(moa["owned_by"] == "staircase-pipeline", moa)
    check(len(moa["nodes"]) == 4 and moa["nodes"][-1]["kind"] == "aggregator", moa)

    for model in ("moa", "default"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=QUESTION, max_tokens=8, temperature=0, seed=1
        )
        run_id = raw.headers.get("x-staircase-run-id")
        completion = raw.parse()
        check(run_id == completion.id, (run_id, completion.id))
        answer = completion.choices[0].message.content
        check(answer.strip(), f"{model}: empty answer")
        check(completion.choices[0].finish_reason in ("stop", "length"), completion)
        usage = completion.usage
        check(usage.completion_tokens > 0 and usage.prompt_tokens > 0, usage)
        extra = completion.model_extra["staircase"]
        check(extra["run_id"] == run_id, extra)
        if model == "moa":
            check(len(extra["nodes"]) == 4 and extra["ttft_ms"] > 0, extra)
            check(extra["critical_path_measured"]["nodes"], extra)
            output = extra["nodes"][-1]
            check(output["output_tokens"] <= 8, f"max_tokens ignored: {output}")
            status, headers, body = server.get(f"/v1/runs/{run_id}/trace")
            check(status == 200 and json.loads(body), "trace")
            status, headers, body = server.get(f"/v1/runs/{run_id}/trace.svg")
            check(status == 200 and body.startswith(b"<svg"), body[:40])
        else:
            check(usage.completion_tokens <= 8, usage)

        stream = client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, chunks = collect(stream)
        check(text.strip(), f"{model}: empty stream")
        finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        check(len(finish) == 1, f"{model}: {len(finish)} finish chunks")
        last = chunks[-1]
        check(not last.choices and last.usage and last.usage.completion_tokens > 0, last)
        check("staircase" in last.model_extra, "no report on the last chunk")
        if model == "default":
            # Greedy on one model: the streamed answer is the whole one. (A staircase
            # aggregator steps as chunks arrive, so a pipeline's answer may vary.)
            check(text == answer, f"{model}: streamed {text!r} != whole {answer!r}")

    # Multi-turn: earlier turns reach the model (the answer changes with them).
    turns = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ]
    one = client.chat.completions.create(model="default", messages=turns, max_tokens=6, temperature=0)
    check(one.usage.prompt_tokens > 20, one.usage)

    # Without include_usage the report rides on the finishing chunk and no usage chunk comes.
    text, chunks = collect(
        client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4, stream=True)
    )
    check(all(c.usage is None for c in chunks), "usage without include_usage")
    check("staircase" in chunks[-1].model_extra, chunks[-1])


def errors(server):
    client = server.client()

    def expect(kind, call, param=None, code=None):
        try:
            call()
        except kind as error:
            body = error.body or {}
            if param is not None:
                check(body.get("param") == param, f"param {body.get('param')!r} != {param!r}: {body}")
            if code is not None:
                check(body.get("code") == code, f"code {body.get('code')!r} != {code!r}: {body}")
            return error
        raise AssertionError(f"expected {kind.__name__}")

    expect(openai.NotFoundError, lambda: client.chat.completions.create(model="nope", messages=QUESTION),
           param="model")
    expect(openai.BadRequestError, lambda: client.chat.completions.create(model="moa", messages=QUESTION, n=2),
           param="n")
    expect(openai.BadRequestError, lambda: client.chat.completions.create(
        model="default", messages=QUESTION,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), param="tools")
    expect(openai.BadRequestError, lambda: client.chat.completions.create(model="moa", messages=[]),
           param="messages")
    expect(openai.BadRequestError, lambda: client.chat.completions.create(
        model="moa", messages=[{"content": "x"}]), param="messages[0].role")
    long = [{"role": "user", "content": "word " * 40000}]
    expect(openai.BadRequestError, lambda: client.chat.completions.create(model="default", messages=long),
           code="context_length_exceeded")
    bad = server.client(key="wrong-key")
    expect(openai.AuthenticationError, lambda: bad.chat.completions.create(model="moa", messages=QUESTION))
    expect(openai.AuthenticationError, lambda: bad.models.list())
    try:
        server.get("/admin/status", key="wrong-key")
        raise AssertionError("admin without the key")
    except urllib.error.HTTPError as error:
        check(error.code == 401, error.code)
    # A body over the limit: 413 in OpenAI's shape.
    body = json.dumps({"model": "moa", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    request = urllib.request.Request(server.base + "/v1/chat/completions", data=body, method="POST")
    request.add_header("Authorization", "Bearer " + server.key)
    request.add_header("Content-Type", "application/json")
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("no 413")
    except urllib.error.HTTPError as error:
        check(error.code == 413, error.code)
        check("error" in json.loads(error.read()), "413 body")
    # Malformed JSON.
    request = urllib.request.Request(server.base + "/v1/chat/completions", data=b"{oops", method="POST")
    request.add_header("Authorization", "Bearer " + server.key)
    request.add_header("Content-Type", "application/json")
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("no 400")
    except urllib.error.HTTPError as error:
        check(error.code == 400 and "error" in json.loads(error.read()), error.code)


GUARDED = """name = "guarded"
description = "a proposer with a hostile role plugin, and the built-in aggregator"
[[nodes]]
id = "proposer"
kind = "agent"
plugin = "hostile-role"
model = "default"
max_tokens = 4
[[nodes]]
id = "aggregator"
kind = "aggregator"
plugin = "moa-aggregator"
model = "default"
max_tokens = 4
inputs = ["proposer"]
"""


def setup(server, args):
    """Drops the test's plugins and pipelines into the watched folders of the running server
    (a hot add) and waits until it serves them."""
    for name, wasm, manifest in (
        ("reloadable", args.v1, args.v1_manifest),
        ("hostile-role", args.hostile, args.hostile_manifest),
    ):
        replace(os.path.join(args.plugins, name + ".toml"), open(manifest, "rb").read())
        replace(os.path.join(args.plugins, name + ".wasm"), open(wasm, "rb").read())

    def served(kind, names):
        return lambda: names <= {p["name"] for p in server.get_json("/admin/status")[kind]}

    # Pipelines are checked against the plugins they name, so the plugins go first.
    server.wait_for("the test's plugins", served("plugins", {"reloadable", "hostile-role"}))
    replace(os.path.join(args.pipelines, "reload.toml"), PIPELINE_A.encode())
    replace(os.path.join(args.pipelines, "guarded.toml"), GUARDED.encode())
    server.wait_for("the test's pipelines", served("pipelines", {"reload", "guarded"}))


def hostile(server):
    """A plugin that traps or spins fails its pipeline's requests; the others keep answering."""
    client = server.client()

    def attack(word, stream):
        messages = [{"role": "user", "content": f"attack:{word}"}]
        try:
            if stream:
                collect(client.chat.completions.create(model="guarded", messages=messages, stream=True))
            else:
                client.chat.completions.create(model="guarded", messages=messages)
        except openai.APIError as error:
            check("hostile-role" in str(error), f"the error does not name the plugin: {error}")
            return
        raise AssertionError(f"attack:{word} succeeded")

    def bystander(model):
        answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4)
        check(answer.choices[0].message.content.strip(), model)

    with futures.ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(attack, w, s) for w in ("loop", "panic") for s in (False, True)]
        jobs += [pool.submit(bystander, m) for m in ("moa", "default", "reload")] * 2
        for job in jobs:
            job.result()
    # The hostile pipeline itself still serves benign requests, and so does everyone else.
    bystander("guarded")
    bystander("moa")
    # Calls and failures are counted per plugin on /metrics.
    check(server.metric("staircase_plugin_calls_total", plugin="hostile-role") > 0, "plugin calls")
    check(server.metric("staircase_plugin_calls_total", plugin="moa-aggregator") > 0, "plugin calls")
    check(server.metric("staircase_plugin_failures_total", plugin="hostile-role") > 0, "plugin failures")


PIPELINE_A = """name = "reload"
[[nodes]]
id = "solo"
kind = "agent"
plugin = "reloadable"
model = "default"
max_tokens = 3
"""
PIPELINE_B = PIPELINE_A.replace("max_tokens = 3", "max_tokens = 4") + "# version B\n"
PIPELINE_BROKEN_TOML = 'name = "reload"\n[[nodes]\nid = "solo"\n'
PIPELINE_CYCLE = """name = "reload"
[[nodes]]
id = "a"
kind = "agent"
plugin = "reloadable"
model = "default"
inputs = ["b"]
[[nodes]]
id = "b"
kind = "agent"
plugin = "reloadable"
model = "default"
inputs = ["a"]
"""
SWAPS = 52  # of each: alternating good and broken versions


def replace(path, data):
    """Writes beside the file and renames over it, as a deploy would (atomic)."""
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def hot_swap(server, plugins, pipelines, artifacts):
    v1 = open(artifacts["v1"], "rb").read()
    v2 = open(artifacts["v2"], "rb").read()
    wrong = open(artifacts["wrong"], "rb").read()  # an aggregator under the role's manifest
    plugin_path = os.path.join(plugins, "reloadable.wasm")
    pipeline_path = os.path.join(pipelines, "reload.toml")
    plugin_versions = [("good", v2), ("broken", v1[: len(v1) // 2]), ("good", v1), ("broken", wrong)]
    pipeline_versions = [
        ("good", PIPELINE_B.encode()),
        ("broken", PIPELINE_BROKEN_TOML.encode()),
        ("good", PIPELINE_A.encode()),
        ("broken", PIPELINE_CYCLE.encode()),
    ]
    good_plugins = {sha(v1)[:12], sha(v2)[:12]}
    budget = {sha(PIPELINE_A.encode())[:12]: 3, sha(PIPELINE_B.encode())[:12]: 4}

    def status():
        return server.get_json("/admin/status")

    def plugin_sha(s):
        return next(p["sha256"] for p in s["plugins"] if p["name"] == "reloadable")

    def pipeline_sha(s):
        return next(p["sha256"] for p in s["pipelines"] if p["name"] == "reload")

    stop = threading.Event()
    results, failures = [], []

    def client_loop():
        client = server.client()
        while not stop.is_set():
            try:
                stream = client.chat.completions.create(
                    model="reload", messages=QUESTION, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )
                text, chunks = collect(stream)
                last = chunks[-1]
                check(last.usage is not None, "no usage")
                results.append((last.system_fingerprint, text, last.usage.completion_tokens))
            except Exception as error:  # every failure counts
                failures.append(repr(error))

    clients = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        before = status()
        for i in range(SWAPS):
            verdict, data = plugin_versions[i % 4]
            rejected = before["plugin_reloads"]["rejected"]
            replace(plugin_path, data)
            if verdict == "good":
                before = server.wait_for(f"plugin swap {i}", lambda: (s := status()) and plugin_sha(s) == sha(data) and s)
            else:
                before = server.wait_for(f"plugin rejection {i}",
                                         lambda: (s := status())["plugin_reloads"]["rejected"] > rejected and s)
                check(plugin_sha(before) in {sha(v1), sha(v2)}, "a broken plugin was swapped in")
            verdict, data = pipeline_versions[i % 4]
            rejected = before["pipeline_reloads"]["rejected"]
            replace(pipeline_path, data)
            if verdict == "good":
                before = server.wait_for(f"pipeline swap {i}",
                                         lambda: (s := status()) and pipeline_sha(s) == sha(data) and s)
            else:
                before = server.wait_for(f"pipeline rejection {i}",
                                         lambda: (s := status())["pipeline_reloads"]["rejected"] > rejected and s)
                error = before["last_pipeline_rejection"]["error"]
                check(re.match(re.escape(pipeline_path) + r":\d+: ", error), f"no file and line: {error}")
    finally:
        stop.set()
        for t in clients:
            t.join()
    check(not failures, f"{len(failures)} failed requests during hot swap: {failures[:3]}")
    check(len(results) >= 10, f"only {len(results)} requests during the swaps")
    groups = {}
    for fingerprint, text, tokens in results:
        parts = fingerprint.split(";")
        check(len(parts) == 2, fingerprint)
        pipeline_label, plugin_label = parts
        pipe_sha = pipeline_label.rsplit(":", 1)[1]
        plug_sha = plugin_label.rsplit(":", 1)[1]
        check(plug_sha in good_plugins, f"answer from a plugin version never accepted: {fingerprint}")
        check(pipe_sha in budget, f"answer from a pipeline version never accepted: {fingerprint}")
        check(tokens <= budget[pipe_sha], f"{tokens} tokens under a pipeline of {budget[pipe_sha]}")
        groups.setdefault((pipe_sha, plug_sha), set()).add(text)
    # Answers of one version are not compared as text: greedy answers of concurrent
    # requests differ here at near-ties (batching), so the versions are told apart by the
    # fingerprint the run pinned and by each pipeline version's token budget.
    check(len({k[0] for k in groups}) == 2 and len({k[1] for k in groups}) == 2,
          f"the requests did not straddle the swaps: {sorted(groups)}")
    print(f"hot swap: {SWAPS} plugin and {SWAPS} pipeline replacements, {len(results)} requests, "
          f"0 failed, versions seen {len(groups)}")


def disconnects(server):
    # A dropped stream frees its queue place when the server notices, just after the next
    # request of the same client may arrive: retries absorb that overlap.
    client = server.client(retries=3)
    cancelled_before = server.metric("staircase_requests_cancelled_total")

    def drop(i):
        stream = client.chat.completions.create(
            model="moa", messages=[{"role": "user", "content": f"Describe the sea, take {i}."}],
            max_tokens=256, stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()

    with futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(drop, range(100)))

    def idle():
        live = server.metric("staircase_engine_live_sequences")
        queued = server.metric("staircase_engine_queued")
        running = server.metric("staircase_runs_running")
        return live == 0 and queued == 0 and running == 0

    server.wait_for("engine sequences freed after disconnects", idle)
    kv = server.metric("staircase_engine_kv_cells_used")
    cache = server.metric("staircase_prefix_cache_cells")
    check(kv == cache, f"{kv} KV cells in use beyond the prefix cache's {cache}")
    cancelled = server.metric("staircase_requests_cancelled_total") - cancelled_before
    check(cancelled >= 100, f"only {cancelled} of 100 dropped streams were cancelled")
    print(f"disconnects: 100 dropped, {cancelled:.0f} cancelled, 0 live sequences, {kv:.0f} KV cells = cache")


def overload(server, capacity):
    """More requests than the queue holds: the excess gets 429 with Retry-After at once, and
    every accepted request completes."""
    client = server.client()
    held = [
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"Count to fifty, take {i}."}],
            max_tokens=200, stream=True,
        )
        for i in range(capacity)
    ]
    refused = 0
    for _ in range(4):
        try:
            client.chat.completions.create(model="default", messages=QUESTION, max_tokens=2)
        except openai.RateLimitError as error:
            check(error.response.headers.get("retry-after"), "429 without Retry-After")
            refused += 1
    check(refused == 4, f"{refused} of 4 requests past the queue were refused")
    for stream in held:
        text, chunks = collect(stream)
        finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        check(len(finish) == 1 and text, "an accepted request did not complete")
    print(f"overload: {capacity} accepted and completed, {refused} refused with 429")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--plugins", required=True)
    parser.add_argument("--pipelines", required=True)
    parser.add_argument("--v1", required=True)
    parser.add_argument("--v1-manifest", required=True)
    parser.add_argument("--hostile", required=True)
    parser.add_argument("--hostile-manifest", required=True)
    parser.add_argument("--v2", required=True)
    parser.add_argument("--wrong", required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    server = Server(args.base_url, args.key)
    phases = [
        ("setup", lambda: setup(server, args)),
        ("basics", lambda: basics(server)),
        ("errors", lambda: errors(server)),
        ("hostile", lambda: hostile(server)),
        ("hot_swap", lambda: hot_swap(server, args.plugins, args.pipelines,
                                      {"v1": args.v1, "v2": args.v2, "wrong": args.wrong})),
        ("disconnects", lambda: disconnects(server)),
        ("overload", lambda: overload(server, args.capacity)),
    ]
    passed = failed = 0
    for name, phase in phases:
        if args.only and name not in args.only and name != "setup":
            continue
        started = time.monotonic()
        try:
            phase()
            passed += 1
            print(f"ok {name} ({time.monotonic() - started:.1f} s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {name}", flush=True)
            traceback.print_exc()
    print(f"openai client: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
