//! A guard alone: one stream of chunks (`--chunk`, or the prompt in three) through the
//! host's own guard chain, so the window, its edits and its overflow follow the server's
//! rules. Each push and the final flush print the guard's verdict and what left the window.
//! The window itself is never printed: it holds exactly what the guard may be redacting.

use anyhow::{Context, bail};

use super::{Args, DEFAULT_CHUNKS, Target, chunks, print_call, print_input, print_output, time};
use crate::engine::estimate_tokens;
use crate::guard::{
    GuardChain, GuardEvent, GuardSession, OnFailure, Outcome, Stage, StreamInfo, Verdict,
};
use crate::policy::PolicyError;

pub(super) fn call(target: &Target<'_>, args: &Args) -> anyhow::Result<()> {
    let pieces: Vec<&str> = if args.chunks.is_empty() {
        chunks(&args.prompt, DEFAULT_CHUNKS)
    } else {
        args.chunks.iter().map(String::as_str).collect()
    };
    let info = StreamInfo {
        node_id: "answer".into(),
        model: "default".into(),
        to_client: true,
    };
    let session = target.provider.guard(target.plugin, target.config, &info)?;
    print_output(format_args!(
        "guard on {}'s stream, window {} bytes",
        info.node_id,
        session.window_bytes()
    ));
    // Fail closed, as a guard does unless its operator opened it: a failure ends the call.
    let mut chain = GuardChain::new(vec![Stage::new(
        target.plugin,
        Box::new(Printed(session)),
        OnFailure::Close,
    )]);
    let mut released = String::new();
    for (i, piece) in pieces.iter().enumerate() {
        print_input(format_args!("chunk {piece:?} ({} bytes)", piece.len()));
        let outcome = chain.push(piece, estimate_tokens(piece).get());
        if report(outcome, &mut released).context("push failed")? {
            let left = pieces.len() - i - 1;
            if left > 0 {
                println!("note          {left} chunk(s) after the stop not fed");
            }
            return Ok(());
        }
    }
    if !report(chain.finish(), &mut released).context("finish failed")? {
        println!("released      {released:?}");
    }
    Ok(())
}

/// Prints what left the chain and its events; true when the guard stopped the stream. A
/// guard that failed (a trap, a limit, a malformed verdict) is the command's error.
fn report(outcome: Outcome, released: &mut String) -> anyhow::Result<bool> {
    for event in &outcome.events {
        match event {
            GuardEvent::Failed { error, .. } => bail!("{error}"),
            GuardEvent::Overflowed { bytes, .. } => println!(
                "note          the window was full: {bytes} byte(s) left without a verdict"
            ),
            GuardEvent::Redacted { .. } | GuardEvent::Stopped { .. } => {}
        }
    }
    if !outcome.released.is_empty() {
        println!("  released    {:?}", outcome.released);
        released.push_str(&outcome.released);
    }
    if let Some(reason) = outcome.stopped {
        println!("stopped       {reason}");
        println!("released      {released:?}");
        return Ok(true);
    }
    Ok(false)
}

/// The plugin's session, printing each call it answers and its verdict.
struct Printed(Box<dyn GuardSession>);

impl Printed {
    fn answer(
        name: &str,
        call: impl FnOnce() -> Result<Verdict, PolicyError>,
    ) -> Result<Verdict, PolicyError> {
        let (verdict, elapsed) = time(call);
        print_call(name, elapsed);
        match &verdict {
            Ok(verdict) => print_output(describe(verdict)),
            Err(error) => print_output(format_args!("failed: {error}")),
        }
        verdict
    }
}

impl GuardSession for Printed {
    fn window_bytes(&self) -> usize {
        self.0.window_bytes()
    }

    fn push(
        &mut self,
        window: &str,
        new_bytes: usize,
        tokens: u32,
    ) -> Result<Verdict, PolicyError> {
        print_input(format_args!(
            "window of {} bytes, {new_bytes} new, {tokens} token(s)",
            window.len()
        ));
        Self::answer("push", || self.0.push(window, new_bytes, tokens))
    }

    fn finish(&mut self, window: &str) -> Result<Verdict, PolicyError> {
        print_input(format_args!("end of stream, {} bytes held", window.len()));
        Self::answer("finish", || self.0.finish(window))
    }
}

/// A verdict in words, with its edits' spans and replacements (never the text they cover).
fn describe(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Release(n) => format!("release {n} byte(s)"),
        Verdict::Redact { edits, release } => {
            let spans: Vec<String> = edits
                .iter()
                .map(|e| format!("{}..{} -> {:?}", e.start, e.end, e.text))
                .collect();
            format!("redact {}, release {release} byte(s)", spans.join(", "))
        }
        Verdict::Stop(reason) => format!("stop: {reason}"),
    }
}
