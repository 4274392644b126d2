//! `staircase bench serve`: what the HTTP server adds to a run. The same app serves a
//! pipeline and a plain model to 1, 4 and 16 concurrent streaming clients, once through the
//! library in-process and once over HTTP to a server on a loopback port in the same process,
//! so both share one engine and one machine state. Reports requests/s and p50/p99 time to
//! first token per variant, and the HTTP/in-process ratios. This module measures; printing
//! and files are the CLI's.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::app::App;
use crate::app::config::Limits;
use crate::engine::{ChatMessage, GenerationEvent, GenerationRequest, Role};
use crate::pipeline::{RunEvent, RunRequest};
use crate::policy::StreamMode;
use crate::server::ServeOptions;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ServeBenchOptions {
    /// Pipelines or models, by the name a client sends.
    pub targets: Vec<String>,
    pub clients: Vec<usize>,
    /// Requests each client sends one after another.
    pub requests_per_client: usize,
    /// Tokens of every node's output.
    pub max_tokens: u32,
}

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeBenchError {
    #[error("`{0}` is neither a pipeline nor a model")]
    UnknownTarget(String),
    #[error("in-process run: {0}")]
    Run(String),
    #[error("HTTP request: {0}")]
    Http(String),
    #[error("the server did not start: {0}")]
    Server(String),
}

/// One variant: a target, a client count, a transport.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub target: String,
    pub clients: usize,
    pub transport: &'static str,
    pub requests: usize,
    pub requests_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub total_p50_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub target: String,
    pub clients: usize,
    /// HTTP over in-process, p50 time to first token.
    pub ttft_p50: f64,
    pub total_p50: f64,
    pub requests_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServeBenchReport {
    pub max_tokens: u32,
    pub requests_per_client: usize,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
}

/// One request's times.
#[derive(Clone, Copy, Debug)]
struct Sample {
    ttft: Duration,
    total: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    InProcess,
    Http,
}

const QUESTION: &str = "Why is the sky blue?";

/// Runs the benchmark on `app`, starting its own server on a free loopback port.
pub async fn run(
    app: Arc<App>,
    options: &ServeBenchOptions,
) -> Result<ServeBenchReport, ServeBenchError> {
    for target in &options.targets {
        if app.pipelines().get(target).is_none() && app.engine(target).is_none() {
            return Err(ServeBenchError::UnknownTarget(target.clone()));
        }
    }
    let most = options.clients.iter().copied().max().unwrap_or(1);
    let serve_options = ServeOptions {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        tenants: Vec::new(),
        limits: Limits {
            max_running: most,
            queue: most,
            // Every node, as in-process runs cap them.
            max_tokens: Some(options.max_tokens),
            ..Limits::default()
        },
        watch: false,
        access: Default::default(),
    };
    let (addr_tx, addr_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::serve(
        app.clone(),
        serve_options,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let addr = match addr_rx.await {
        Ok(addr) => addr,
        Err(_) => {
            let reason = match server.await {
                Ok(Err(error)) => error.to_string(),
                _ => "it stopped".into(),
            };
            return Err(ServeBenchError::Server(reason));
        }
    };
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/chat/completions");

    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for target in &options.targets {
        // Untimed: the prompt heads go into the prefix cache, as in a server's steady state.
        request(
            &app,
            &http,
            &url,
            target,
            Transport::InProcess,
            "warm-up",
            options,
        )
        .await?;
        for &clients in &options.clients {
            let mut pair = Vec::new();
            for transport in [Transport::InProcess, Transport::Http] {
                let started = Instant::now();
                let mut jobs = Vec::new();
                for client in 0..clients {
                    let (app, http, url, target) =
                        (app.clone(), http.clone(), url.clone(), target.clone());
                    let options = options.clone();
                    jobs.push(tokio::spawn(async move {
                        let mut samples = Vec::new();
                        for k in 0..options.requests_per_client {
                            // Unique per transport too: a prompt the other transport sent
                            // would be served whole from the prefix cache.
                            let tag = format!("{transport:?} {client}.{k}");
                            samples.push(
                                request(&app, &http, &url, &target, transport, &tag, &options)
                                    .await?,
                            );
                        }
                        Ok::<_, ServeBenchError>(samples)
                    }));
                }
                let mut samples = Vec::new();
                for job in jobs {
                    samples.extend(
                        job.await
                            .map_err(|e| ServeBenchError::Run(e.to_string()))??,
                    );
                }
                let elapsed = started.elapsed().as_secs_f64();
                let row = summarise(target, clients, transport, &samples, elapsed);
                pair.push(row.clone());
                rows.push(row);
            }
            if let [local, remote] = pair.as_slice() {
                ratios.push(Ratio {
                    target: target.clone(),
                    clients,
                    ttft_p50: remote.ttft_p50_ms / local.ttft_p50_ms,
                    total_p50: remote.total_p50_ms / local.total_p50_ms,
                    requests_per_s: remote.requests_per_s / local.requests_per_s,
                });
            }
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(ServeBenchReport {
        max_tokens: options.max_tokens,
        requests_per_client: options.requests_per_client,
        rows,
        ratios,
    })
}

/// One streamed request; `tag` makes its prompt its own (the shared head stays cached).
async fn request(
    app: &App,
    http: &reqwest::Client,
    url: &str,
    target: &str,
    transport: Transport,
    tag: &str,
    options: &ServeBenchOptions,
) -> Result<Sample, ServeBenchError> {
    let prompt = format!("{QUESTION} (request {tag})");
    let started = Instant::now();
    let mut ttft = None;
    match transport {
        Transport::Http => {
            let body = serde_json::json!({
                "model": target,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": options.max_tokens,
                "stream": true,
            });
            let response = http
                .post(url)
                .json(&body)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| ServeBenchError::Http(e.to_string()))?;
            let mut events = response.bytes_stream().eventsource();
            while let Some(event) = events.next().await {
                let event = event.map_err(|e| ServeBenchError::Http(e.to_string()))?;
                if event.data == "[DONE]" {
                    break;
                }
                let chunk: serde_json::Value = serde_json::from_str(&event.data)
                    .map_err(|e| ServeBenchError::Http(e.to_string()))?;
                if let Some(error) = chunk.get("error") {
                    return Err(ServeBenchError::Http(error.to_string()));
                }
                let content = chunk["choices"][0]["delta"]["content"].as_str();
                if ttft.is_none() && content.is_some_and(|c| !c.is_empty()) {
                    ttft = Some(started.elapsed());
                }
            }
        }
        Transport::InProcess => {
            let conversation = vec![ChatMessage::new(Role::User, prompt)];
            if let Some(version) = app.pipelines().get(target) {
                let mut pipeline = (*version.pipeline).clone();
                pipeline.limit_tokens(options.max_tokens);
                let (runner, _) = app.pinned_runner(&pipeline);
                let (tx, mut events) = mpsc::unbounded_channel();
                let request = RunRequest {
                    conversation,
                    mode: StreamMode::Staircase,
                    namespace: Default::default(),
                    late_charge: None,
                };
                let run = runner.run(&pipeline, request, Some(tx));
                tokio::pin!(run);
                let result = loop {
                    tokio::select! {
                        result = &mut run => break result,
                        Some(event) = events.recv() => {
                            if let RunEvent::NodeDelta { node, text, .. } = event
                                && node == pipeline.output && !text.is_empty() && ttft.is_none()
                            {
                                ttft = Some(started.elapsed());
                            }
                        }
                    }
                };
                result.map_err(|e| ServeBenchError::Run(e.to_string()))?;
            } else if let Some(engine) = app.engine(target) {
                let mut request = GenerationRequest::chat(conversation);
                request.sampling.max_tokens = options.max_tokens.max(1);
                let mut stream = engine
                    .submit(request)
                    .map_err(|e| ServeBenchError::Run(e.to_string()))?;
                while let Some(event) = stream.next().await {
                    match event.map_err(|e| ServeBenchError::Run(e.to_string()))? {
                        GenerationEvent::Delta { text, .. } => {
                            if ttft.is_none() && !text.is_empty() {
                                ttft = Some(started.elapsed());
                            }
                        }
                        GenerationEvent::Finished { .. } => break,
                    }
                }
            }
        }
    }
    let total = started.elapsed();
    Ok(Sample {
        ttft: ttft.unwrap_or(total),
        total,
    })
}

fn summarise(
    target: &str,
    clients: usize,
    transport: Transport,
    samples: &[Sample],
    elapsed_s: f64,
) -> Row {
    let ms = crate::millis::millis;
    let mut ttft: Vec<f64> = samples.iter().map(|s| ms(s.ttft)).collect();
    let mut total: Vec<f64> = samples.iter().map(|s| ms(s.total)).collect();
    Row {
        target: target.to_string(),
        clients,
        transport: match transport {
            Transport::InProcess => "in-process",
            Transport::Http => "http",
        },
        requests: samples.len(),
        requests_per_s: samples.len() as f64 / elapsed_s.max(1e-9),
        ttft_p50_ms: super::percentile(&mut ttft, 0.50),
        ttft_p99_ms: super::percentile(&mut ttft, 0.99),
        total_p50_ms: super::percentile(&mut total, 0.50),
    }
}

impl ServeBenchReport {
    /// The table the CLI prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:<11} {:>8} {:>7} {:>13} {:>13} {:>14}",
            "target",
            "clients",
            "transport",
            "requests",
            "req/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "total p50 ms"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{:<10} {:>7} {:<11} {:>8} {:>7.2} {:>13.1} {:>13.1} {:>14.1}",
                r.target,
                r.clients,
                r.transport,
                r.requests,
                r.requests_per_s,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.total_p50_ms
            );
        }
        let _ = writeln!(
            out,
            "\nHTTP / in-process (target: TTFT at most 1.05 at 1 client)"
        );
        for r in &self.ratios {
            let _ = writeln!(
                out,
                "{:<10} {:>2} clients: TTFT p50 {:.3}, total p50 {:.3}, req/s {:.3}",
                r.target, r.clients, r.ttft_p50, r.total_p50, r.requests_per_s
            );
        }
        out
    }
}
