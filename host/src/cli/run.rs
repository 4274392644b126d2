//! `staircase run`: runs a pipeline on a prompt and streams its answer.
//!
//! On a terminal it shows one live line per agent (tokens so far, tokens/s) above the
//! answer as it grows; otherwise it prints the answer as plain text; `--json` prints the
//! whole report instead. The answer passes the pipeline's output guards first, as the
//! server's does. Ctrl-C drops the run, which cancels every node.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{Notify, mpsc};

use crate::app::{AnswerGuards, PreparedRun, Progress, RunOutcome, RunSpec};
use crate::guard::GuardReport;
use crate::pipeline::plugin_log::PluginLine;
use crate::pipeline::{
    self, NodeIndex, Pipeline, Recorder, RunEvent, RunId, RunReport, RunRequest,
};
use crate::policy::StreamMode;

/// Arguments of `staircase run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The question or task.
    prompt: String,
    /// A pipeline file, or a built-in pipeline: moa, moa-2layer, debate, plan-and-write.
    #[arg(long, default_value = pipeline::DEFAULT_PIPELINE)]
    pipeline: String,
    /// `staircase`: aggregators start on their inputs' first chunks; `layered`: they wait
    /// for complete inputs (the classic Mixture-of-Agents).
    #[arg(long, default_value_t = StreamMode::Staircase)]
    mode: StreamMode,
    /// Write the run's timeline as Chrome trace JSON (open in Perfetto, or draw it with
    /// `staircase trace render`).
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Print a JSON report (answer, per-node timings, TTFT, critical paths, cache stats)
    /// instead of streaming the answer.
    #[arg(long)]
    json: bool,
    /// Cap every node's output at this many tokens.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// A GGUF model file to run instead of the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    /// Also load the plugins (`NAME.wasm` + `NAME.toml`) in this folder; repeatable. The
    /// user's plugin folder is always loaded when it exists.
    #[arg(long = "plugins", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// A `staircase.toml` (models, plugin and pipeline folders, grants); the flags above
    /// override it.
    #[arg(long, value_name = "staircase.toml")]
    config: Option<PathBuf>,
    /// The critical path the answer should fit in, ms: a pipeline with declared
    /// `[[variants]]` runs the best one predicted to fit (default: the file's budget).
    #[arg(long, value_name = "MS")]
    latency_budget: Option<u64>,
    /// Earlier turns of the conversation: a JSON array of `{"role", "content"}` messages
    /// (OpenAI's shape); the prompt is the next user message.
    #[arg(long, value_name = "FILE.json")]
    history: Option<PathBuf>,
    #[command(flatten)]
    engine: LocalEngineArgs,
}

/// `--threads` and `--ctx-size`: llama-server's names for the local engine's two knobs an
/// operator sets, over every local model of `staircase.toml` (remote models ignore them).
#[derive(Debug, Default, clap::Args)]
pub(crate) struct LocalEngineArgs {
    /// llama.cpp threads of every local model (default: `[models.*] threads`, else measured
    /// per machine, see docs/models.md).
    #[arg(long, env = "STAIRCASE_THREADS")]
    threads: Option<usize>,
    /// Context size in tokens of every local model (default: `[models.*] context_tokens`,
    /// else the engine's default).
    #[arg(long, value_name = "TOKENS", env = "STAIRCASE_CTX_SIZE")]
    ctx_size: Option<u32>,
}

impl LocalEngineArgs {
    /// The builder with these overrides on every local engine.
    pub(crate) fn apply(&self, builder: crate::app::AppBuilder) -> crate::app::AppBuilder {
        let (threads, ctx_size) = (self.threads, self.ctx_size);
        if threads.is_none() && ctx_size.is_none() {
            return builder;
        }
        builder.local_engine(move |config| {
            config.threads = threads.or(config.threads);
            config.context_tokens = ctx_size.or(config.context_tokens);
        })
    }
}

/// The host every pipeline command runs on: `staircase.toml` when `--config` names one,
/// with `--model` and `--plugins` over it.
pub(crate) fn open_app(
    config: Option<&Path>,
    model: Option<&Path>,
    plugin_dirs: &[PathBuf],
) -> anyhow::Result<crate::app::AppBuilder> {
    let builder = match config {
        Some(path) => crate::app::AppBuilder::from_file(path)?,
        None => crate::app::AppBuilder::new(),
    };
    Ok(builder
        .model(model.map(Path::to_path_buf))
        .plugin_dirs(plugin_dirs.iter().cloned()))
}

/// A pipeline of the host's table (or a file) with an optional token cap on every node.
pub(crate) fn pipeline_of(
    app: &crate::app::App,
    file_or_name: &str,
    max_tokens: Option<u32>,
) -> anyhow::Result<Pipeline> {
    let mut pipeline = Pipeline::clone(&app.pipeline(file_or_name)?.pipeline);
    if let Some(max) = max_tokens {
        pipeline.limit_tokens(max);
    }
    Ok(pipeline)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let app = args
        .engine
        .apply(open_app(
            args.config.as_deref(),
            args.model.as_deref(),
            &args.plugin_dirs,
        )?)
        .build()?;
    let declared = app.pipeline(&args.pipeline)?;
    // Every declared variant is checked up front, so a broken one is named before any run.
    app.runner().check(&declared.pipeline)?;
    let mut request = RunRequest::prompt(args.prompt.clone(), args.mode);
    if let Some(path) = &args.history {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut conversation: Vec<crate::engine::ChatMessage> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON array of messages", path.display()))?;
        conversation.append(&mut request.conversation);
        request.conversation = conversation;
    }
    // The answer's output guards: the pipeline's own, then `staircase.toml`'s that cover it.
    let guard_specs = app.answer_guard_specs(&declared.pipeline.name, Some(&declared.pipeline));
    let mut spec = RunSpec::served(RunId::random()?, declared, request);
    spec.max_tokens = args.max_tokens;
    spec.latency_budget = args.latency_budget.map(Duration::from_millis);
    let driven = super::runtime()?.block_on(async {
        // One-shot: the load is what the engines report (a remote one may be shared).
        let prepared = app.prepare(spec).await;
        if let Some(choice) = prepared.variant()
            && !args.json
        {
            eprintln!("variant `{}`: {}", choice.variant, choice.reason);
        }
        let guards = if guard_specs.is_empty() {
            None
        } else {
            let info = crate::guard::StreamInfo::answer_of(prepared.pipeline());
            Some(app.open_guards(&guard_specs, &info).await?)
        };
        let view = if args.json {
            View::Quiet
        } else if std::io::stdout().is_terminal() {
            View::Live(Live::new(prepared.pipeline()))
        } else {
            View::Plain
        };
        drive(prepared, view, guards).await
    })?;
    let Driven {
        outcome,
        guards,
        released,
    } = driven;
    let stopped = guards.as_ref().and_then(|g| g.stopped.clone());
    if let Some(outcome) = &outcome
        && let Some(path) = &args.trace
    {
        // The run as it was generated, before any guard: the operator's own debugging.
        std::fs::write(path, outcome.report.trace().to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("trace written to {}", path.display());
    }
    if args.json {
        let mut report = match &outcome {
            Some(outcome) => serde_json::to_value(outcome.full_report(""))?,
            None => serde_json::json!({}),
        };
        if let Some(guards) = &guards {
            // Only what the guards released leaves, as with the server.
            crate::guard::strip_texts(&mut report);
            if let serde_json::Value::Object(map) = &mut report {
                map.insert("answer".into(), released.into());
                map.insert("guards".into(), serde_json::to_value(guards)?);
            }
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    match stopped {
        Some(reason) => anyhow::bail!("an output guard stopped the answer: {reason}"),
        None => Ok(()),
    }
}

/// What [`drive`] gives back: the run's outcome (`None` when a guard stopped it first), what
/// its guards did, and the answer as they released it.
struct Driven {
    outcome: Option<RunOutcome>,
    guards: Option<GuardReport>,
    released: String,
}

/// Runs `prepared`, showing it in `view`, its answer through `guards` when there are any;
/// Ctrl-C (or a view that cannot write) drops the run.
async fn drive(
    prepared: PreparedRun,
    view: View,
    guards: Option<AnswerGuards>,
) -> anyhow::Result<Driven> {
    let pipeline = prepared.pipeline().clone();
    let view = RefCell::new(view);
    let shown: RefCell<anyhow::Result<()>> = RefCell::new(Ok(()));
    let view_failed = Notify::new();
    let show = |progress: Progress<'_>| {
        let mut shown = shown.borrow_mut();
        if shown.is_ok() {
            *shown = view.borrow_mut().on_progress(&pipeline, progress);
            if shown.is_err() {
                view_failed.notify_one();
            }
        }
    };
    let guarded = guards.is_some();
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    let (released_tx, mut released_rx) = mpsc::unbounded_channel();
    let show_ref = &show;
    let run = async move {
        // Dropped when the run ends, which tells the guards the answer is whole.
        let raw = raw_tx;
        let recorder = Recorder::new();
        prepared
            .run(&recorder, |progress| match progress {
                Progress::Answer(text) if guarded => {
                    let _ = raw.send(text.to_owned());
                }
                // A plugin may quote the text before the guards.
                Progress::Event(RunEvent::PluginLog { .. }) if guarded => {}
                progress => show_ref(progress),
            })
            .await
    };
    let work = async move {
        match guards {
            Some(guards) => {
                let (result, report) = guards.relay(run, raw_rx, released_tx, None).await;
                (result, Some(report))
            }
            None => (Some(run.await), None),
        }
    };
    let mut work = Box::pin(work);
    // One listener for the whole run, so a Ctrl-C during a redraw is not missed.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut released = String::new();
    let finished = loop {
        tokio::select! {
            Some(text) = released_rx.recv() => {
                show(Progress::Answer(&text));
                released.push_str(&text);
            }
            done = &mut work => break Some(done),
            _ = &mut ctrl_c => break None,
            () = view_failed.notified() => break None,
        }
    };
    while let Ok(text) = released_rx.try_recv() {
        show(Progress::Answer(&text));
        released.push_str(&text);
    }
    // The run (and the views' borrows in it) ends here.
    drop(work);
    shown.into_inner()?;
    let mut view = view.into_inner();
    let Some((result, guards)) = finished else {
        view.abandon();
        anyhow::bail!("interrupted; every node was cancelled");
    };
    let outcome = match result {
        Some(Ok(outcome)) => {
            view.done(&pipeline, Some(&outcome.report))?;
            Some(outcome)
        }
        Some(Err(error)) => {
            view.abandon();
            return Err(error.into());
        }
        // A guard stopped the answer: what it released stays on screen.
        None => {
            view.done(&pipeline, None)?;
            None
        }
    };
    Ok(Driven {
        outcome,
        guards,
        released,
    })
}

enum View {
    /// `--json`: nothing until the report.
    Quiet,
    /// Not a terminal: the answer as it streams, nothing else.
    Plain,
    Live(Live),
}

impl View {
    fn on_progress(&mut self, pipeline: &Pipeline, progress: Progress<'_>) -> anyhow::Result<()> {
        match (self, progress) {
            (View::Plain, Progress::Answer(text)) => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            // What plugins log goes to stderr, beside the answer on stdout.
            (View::Plain, Progress::Event(RunEvent::PluginLog { node, line })) => {
                eprintln!("{}", log_line(pipeline, *node, line));
            }
            (View::Live(live), Progress::Event(event)) => live.on_event(pipeline, event)?,
            (View::Live(live), Progress::Answer(text)) => live.answer.push_str(text),
            _ => {}
        }
        Ok(())
    }

    /// The run ended; `report` is `None` when a guard stopped it.
    fn done(&mut self, pipeline: &Pipeline, report: Option<&RunReport>) -> anyhow::Result<()> {
        match (self, report) {
            (View::Quiet, _) => {}
            (View::Plain, _) => println!(),
            (View::Live(live), Some(report)) => live.done(pipeline, report)?,
            (View::Live(live), None) => live.draw(pipeline, true)?,
        }
        Ok(())
    }

    fn abandon(&mut self) {
        if let View::Live(live) = self {
            live.clear();
        }
    }
}

/// How often the live view redraws at most: smooth to the eye, cheap for the terminal.
const REDRAW_EVERY: Duration = Duration::from_millis(50);
/// Answer lines kept on screen while the run goes on (the full answer prints at the end).
const LIVE_ANSWER_LINES: usize = 12;
/// Terminal width assumed when `COLUMNS` does not say.
const DEFAULT_COLUMNS: usize = 80;

#[derive(Default)]
struct AgentLine {
    tokens: u32,
    started: Option<Instant>,
    finished: Option<Instant>,
    cancelled: bool,
    /// The last line its plugin logged.
    last_log: Option<String>,
}

/// Cuts `text` to at most `max` characters (never inside one).
fn truncate_chars(text: &mut String, max: usize) {
    if let Some((at, _)) = text.char_indices().nth(max) {
        text.truncate(at);
    }
}

/// A plugin's log line as `run` shows it: `[node] plugin level: message`.
fn log_line(pipeline: &Pipeline, node: NodeIndex, line: &PluginLine) -> String {
    format!(
        "[{}] {} {}: {}",
        pipeline.node(node).id,
        line.plugin,
        line.level,
        line.message
    )
}

/// One line per node above the answer, redrawn in place.
struct Live {
    agents: Vec<AgentLine>,
    answer: String,
    drawn_lines: usize,
    last_draw: Option<Instant>,
    width: usize,
}

impl Live {
    fn new(pipeline: &Pipeline) -> Self {
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(DEFAULT_COLUMNS)
            .max(20);
        Self {
            agents: pipeline
                .nodes
                .iter()
                .map(|_| AgentLine::default())
                .collect(),
            answer: String::new(),
            drawn_lines: 0,
            last_draw: None,
            width,
        }
    }

    fn on_event(&mut self, pipeline: &Pipeline, event: &RunEvent) -> anyhow::Result<()> {
        self.update(event);
        if self.last_draw.is_none_or(|t| t.elapsed() >= REDRAW_EVERY) {
            self.draw(pipeline, false)?;
        }
        Ok(())
    }

    fn update(&mut self, event: &RunEvent) {
        match event {
            RunEvent::NodeStarted { node } => self.agents[node.0].started = Some(Instant::now()),
            RunEvent::NodeDelta { node, tokens, .. } => self.agents[node.0].tokens += tokens,
            RunEvent::NodeFinished { node, cancelled } => {
                let line = &mut self.agents[node.0];
                line.finished = Some(Instant::now());
                line.cancelled = *cancelled;
            }
            RunEvent::PluginLog { node, line } => {
                self.agents[node.0].last_log = Some(format!("{}: {}", line.plugin, line.message));
            }
            _ => {}
        }
    }

    fn agent_line(&self, pipeline: &Pipeline, node: NodeIndex) -> String {
        let spec = pipeline.node(node);
        let line = &self.agents[node.0];
        let state = match (line.started, line.finished) {
            (None, _) => "waiting".to_string(),
            (Some(_), Some(_)) if line.cancelled => "cancelled (not needed)".to_string(),
            (Some(start), end) => {
                let elapsed = end.unwrap_or_else(Instant::now).duration_since(start);
                let rate = f64::from(line.tokens) / elapsed.as_secs_f64().max(1e-3);
                let done = if end.is_some() { "  done" } else { "" };
                format!("{:>4} tok  {:>6.1} tok/s{done}", line.tokens, rate)
            }
        };
        let mut text = format!("{:<16} {:<10} {}", spec.id, spec.kind.name(), state);
        if let Some(log) = &line.last_log {
            text.push_str("  | ");
            // One line: a message's own line breaks would break the redraw.
            text.extend(log.chars().map(|c| if c.is_control() { ' ' } else { c }));
        }
        truncate_chars(&mut text, self.width.saturating_sub(1));
        text
    }

    /// Answer lines wrapped to the width: at spaces where possible, inside a word only when
    /// it is longer than a line.
    fn wrapped_answer(&self) -> Vec<String> {
        let width = self.width.saturating_sub(1).max(1);
        let mut lines = Vec::new();
        for paragraph in self.answer.split('\n') {
            let mut line = String::new();
            let mut len = 0;
            for word in paragraph.split(' ') {
                let word_len = word.chars().count();
                if len > 0 && len + 1 + word_len > width {
                    lines.push(std::mem::take(&mut line));
                    len = 0;
                }
                if len > 0 {
                    line.push(' ');
                    len += 1;
                }
                for c in word.chars() {
                    if len == width {
                        lines.push(std::mem::take(&mut line));
                        len = 0;
                    }
                    line.push(c);
                    len += 1;
                }
            }
            lines.push(line);
        }
        lines
    }

    fn draw(&mut self, pipeline: &Pipeline, final_frame: bool) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        self.clear_in(&mut out)?;
        let mut lines: Vec<String> = (0..pipeline.nodes.len())
            .map(|i| self.agent_line(pipeline, NodeIndex(i)))
            .collect();
        lines.push("-".repeat(self.width.saturating_sub(1).min(60)));
        let answer = self.wrapped_answer();
        if final_frame {
            // The last frame stays on screen: the whole answer, not just its tail.
            for line in &lines {
                writeln!(out, "{line}")?;
            }
            writeln!(out, "{}", self.answer.trim_end())?;
            self.drawn_lines = 0;
        } else {
            let tail = answer.len().saturating_sub(LIVE_ANSWER_LINES);
            lines.extend(answer[tail..].iter().cloned());
            for line in &lines {
                writeln!(out, "{line}")?;
            }
            self.drawn_lines = lines.len();
        }
        out.flush()?;
        self.last_draw = Some(Instant::now());
        Ok(())
    }

    fn clear_in(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.drawn_lines > 0 {
            // Cursor up over the previous frame, then clear to the end of the screen.
            write!(out, "\x1b[{}A\r\x1b[J", self.drawn_lines)?;
            self.drawn_lines = 0;
        }
        Ok(())
    }

    fn clear(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = self.clear_in(&mut out);
        let _ = out.flush();
    }

    fn done(&mut self, pipeline: &Pipeline, report: &RunReport) -> anyhow::Result<()> {
        self.draw(pipeline, true)?;
        let ms = crate::millis::millis;
        eprintln!(
            "\n{} ({:?}): first token {} ms, total {:.0} ms, critical path {} ({:.0} ms of node time)",
            report.pipeline,
            report.mode,
            report
                .ttft_ms
                .map_or("-".into(), |t| format!("{:.0}", ms(t))),
            ms(report.total_ms),
            report.critical_path_measured.nodes.join(" -> "),
            ms(report.critical_path_measured.length_ms),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(width: usize) -> (Pipeline, Live) {
        let pipeline = pipeline::load("moa").unwrap();
        let mut live = Live::new(&pipeline);
        live.width = width;
        (pipeline, live)
    }

    #[test]
    fn the_answer_wraps_to_the_terminal_width() {
        let (_, mut live) = live(11);
        live.answer = "abcdefghijklmnopqrstuvwxyz\n\nthe end of it all".into();
        assert_eq!(
            live.wrapped_answer(),
            vec![
                "abcdefghij",
                "klmnopqrst",
                "uvwxyz",
                "",
                "the end of",
                "it all"
            ]
        );
    }

    #[test]
    fn agent_lines_show_progress_and_fit_the_width() {
        let (pipeline, mut live) = live(40);
        let analyst = pipeline.find("analyst").unwrap();
        assert!(live.agent_line(&pipeline, analyst).contains("waiting"));
        live.update(&RunEvent::NodeStarted { node: analyst });
        live.update(&RunEvent::NodeDelta {
            node: analyst,
            text: "Hello".into(),
            tokens: 3,
        });
        let line = live.agent_line(&pipeline, analyst);
        assert!(line.contains("3 tok"), "{line}");
        assert!(line.chars().count() < 40, "{line}");
        live.update(&RunEvent::NodeFinished {
            node: analyst,
            cancelled: true,
        });
        assert!(live.agent_line(&pipeline, analyst).contains("cancelled"));
        // Only the output node's text is the answer.
        assert!(live.answer.is_empty());
    }
}
