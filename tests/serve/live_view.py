"""The live view at `/` of `staircase serve`, in a real headless Chromium (Debian's package)
driven by Playwright: run `moa` in staircase mode on the embedded model and check what the
page shows. Started by tests/serve.rs (`live_view_in_a_browser`) against a server it owns.

Asserts: every node's lane received text; the answer began while a proposer was still
generating (the page notes which nodes were running when the first answer text arrived);
the report shows a TTFT; the recent-runs view lists and replays the run; the comparison view runs both modes;
with --guarded-pipeline, a run of that pipeline shows its inner-edge guard's verdicts on the
guarded node's lane, and, as an output guard masks every word of its answer, only the masked
answer and no agent's text; no console errors and no error banner. Writes a screenshot of the
finished run.
"""

import argparse
import sys

from playwright.sync_api import sync_playwright

RUN_TIMEOUT_MS = 600_000


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--answer-tokens", default="16")
    parser.add_argument("--mode", default="staircase", help="layered shows the check failing")
    parser.add_argument("--guarded-pipeline", help="a pipeline whose node `analyst` has an inner-edge guard and whose answer has an output guard, each masking every word")
    args = parser.parse_args()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        problems = []
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

        page.goto(args.base_url + "/")
        page.wait_for_selector("body[data-ready=true]")
        check(page.locator("#pipeline option[value=moa]").count() == 1, "moa is offered")
        page.select_option("#pipeline", "moa")
        page.select_option("#mode", args.mode)
        page.fill("#max-tokens", args.answer_tokens)
        page.fill("#prompt", "Why do leaves change colour in autumn?")
        page.click("#run")

        run = page.locator("#live-run")
        page.wait_for_selector("#live-run[data-state]", timeout=RUN_TIMEOUT_MS)
        status = run.locator(".status").inner_text()
        check(run.get_attribute("data-state") == "finished", f"the run finished ({status}): {run.inner_text()[:1500]}")

        lanes = run.locator(".lane")
        check(lanes.count() == 4, f"one lane per node of moa, got {lanes.count()}")
        for i in range(lanes.count()):
            lane = lanes.nth(i)
            node = lane.get_attribute("data-node")
            text = lane.locator(".lane-text").inner_text()
            check(text.strip(), f"lane {node} received text")
            # What the node's latest engine request sent to its model, folded until opened.
            prompt = lane.locator(".lane-prompt")
            check(prompt.get_attribute("data-step") is not None, f"lane {node} shows its latest prompt")
            prompt.locator("summary").click()
            sent = prompt.locator("pre").inner_text()
            check("system: " in sent or "user: " in sent, f"lane {node}'s prompt lists its messages: {sent[:300]!r}")
            if node in ("analyst", "critic", "creative"):
                check("Why do leaves change colour" in sent, f"proposer {node} sent the question: {sent[:300]!r}")
            print(f"lane {node}: {len(text)} chars, state {lane.get_attribute('data-state')}")

        answer = run.locator(".answer")
        check(answer.inner_text().strip(), "the answer streamed")
        running = answer.get_attribute("data-running-at-first-answer") or ""
        proposers = {"analyst", "critic", "creative"}
        still = proposers & set(filter(None, running.split(",")))
        check(still, f"the answer began while a proposer was generating (running then: {running!r})")
        print(f"answer began at {answer.get_attribute('data-first-ms')} ms, proposers still running: {sorted(still)}")

        ttft = run.locator(".report .ttft b").inner_text()
        check(ttft and ttft != "-", f"the report shows a TTFT: {ttft!r}")
        check(run.locator(".report tr.critical").count() >= 1, "the critical path is highlighted")
        trace = run.locator(".report a.trace-link").get_attribute("href")
        check(page.request.get(args.base_url + trace).ok, f"the trace link {trace} answers")
        print(f"TTFT shown: {ttft}")
        page.screenshot(path=args.screenshot, full_page=True)

        # The second view lists the run and replays it from its events.
        run_id = run.get_attribute("data-run-id")
        page.click(".tab[data-view=runs]")
        row = page.locator(f"#runs-table tr[data-run-id='{run_id}']")
        row.wait_for()
        row.locator("button.open").click()
        page.wait_for_selector("#opened-run[data-state=finished]")
        replayed = page.locator("#opened-run .answer").inner_text()
        check(replayed == answer.inner_text(), "the replayed run shows the same answer")

        # The third view runs the prompt in both modes, side by side, TTFTs compared.
        page.click(".tab[data-view=compare]")
        page.click("#run")
        page.wait_for_selector("#compare-summary .headline", timeout=RUN_TIMEOUT_MS)
        headline = page.locator("#compare-summary .headline").inner_text()
        for side in ("staircase", "layered"):
            state = page.locator(f"#compare-{side}").get_attribute("data-state")
            check(state == "finished", f"the {side} run of the comparison finished")
        print(headline)
        page.screenshot(path=args.screenshot.replace(".png", "-compare.png"), full_page=True)

        if args.guarded_pipeline:
            page.click(".tab[data-view=live]")
            page.select_option("#pipeline", args.guarded_pipeline)
            page.select_option("#mode", "staircase")
            page.click("#run")
            page.wait_for_function(
                f"() => {{ const r = document.querySelector('#live-run'); return r.dataset.runId && r.dataset.runId !== '{run_id}' && r.dataset.state; }}",
                timeout=RUN_TIMEOUT_MS,
            )
            check(run.get_attribute("data-state") == "finished", f"the guarded run finished: {run.inner_text()[:1500]}")
            guarded = page.locator("#live-run .lane[data-node=analyst]")
            check(guarded.get_attribute("data-guard") == "redacted", f"the guard's verdict on the lane: {guarded.inner_text()[:500]}")
            verdicts = guarded.locator(".guards").inner_text()
            check("pattern-guard redacted" in verdicts, f"the lane names the guard: {verdicts!r}")
            print(f"guarded lane: {verdicts}")
            # The answer's own guard: the view shows only what it released, and no agent's text.
            answer = run.locator(".answer")
            check(answer.get_attribute("data-guarded") == "true", "the answer came from the guards' released text")
            released = answer.inner_text()
            check("[redacted]" in released and not any(c.isalpha() for c in released.replace("[redacted]", "")), f"only masked words were released: {released!r}")
            for i in range(lanes.count()):
                lane = lanes.nth(i)
                check(not lane.locator(".lane-text").inner_text().strip(), f"lane {lane.get_attribute('data-node')} withholds its text")
                check(lane.locator(".lane-prompt").get_attribute("data-step") is None, f"lane {lane.get_attribute('data-node')} withholds its prompts")
            check(run.locator(".withheld").is_visible(), "the view says the texts are withheld")
            output = page.locator("#live-run .lane[data-node=aggregator]")
            check(output.get_attribute("data-guard") == "redacted", f"the answer guard's verdict on the output lane: {output.inner_text()[:500]}")
            print(f"guarded answer: {released[:80]!r}; output lane: {output.locator('.guards').inner_text()}")

        check(page.locator("#errors").is_hidden(), f"no error banner: {page.locator('#errors').inner_text()}")
        check(not problems, f"no console errors: {problems}")
        browser.close()
    print("live view ok")


if __name__ == "__main__":
    main()
