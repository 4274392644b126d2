//! The API surface operators of vLLM and llama-server expect, end to end: the real binary on
//! a loopback port, the real default model, and the official `openai` Python client
//! (`tests/serve/completions_client.py`): `/v1/completions` whole and streamed, the extra
//! sampling fields reaching the sampler, and vLLM's metric names adding up on `/metrics`.

mod serve_support;

use std::time::Duration;

use serve_support::{python_with, run_client_script, serve, start_server};

/// A bound on the client script (a few dozen short answers on two cores).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn completions_sampling_fields_and_vllm_metrics_through_the_openai_client() {
    let python = python_with("openai");
    let (server, base) = start_server(&mut serve(&["--max-tokens", "16"]));
    let status = run_client_script(&python, "completions_client.py", &base, CLIENT_TIMEOUT);
    drop(server);
    assert!(
        status.is_some_and(|s| s.success()),
        "the completions client checks failed (see the output above): {status:?}"
    );
}
