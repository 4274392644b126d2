//! An aggregator alone: a session opened on the prompt and its proposers, then a scripted
//! run of pushes, finishes and answers, with `next-step` asked at the start and after each
//! event, as the pipeline runtime asks it. No model runs, so a step is shown, not generated;
//! a script's `answered` events stand in for what the model would have written.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::{
    Args, DEFAULT_CHUNKS, Target, chunks, print_input, print_messages, print_output, timed,
    upstream_pairs,
};
use crate::engine::{ChatMessage, Role};
use crate::policy::{AggregatorSession, Demand, Source, Step, StreamMode};

/// The proposers' answers when no `--upstream` is given: two short ones that agree.
const DEFAULT_UPSTREAM: [(&str, &str); 2] = [
    (
        "analyst",
        "Two plus two is four: add two to two and you get 4.",
    ),
    (
        "checker",
        "Counting on from 2 by two more gives 4, so the answer is 4.",
    ),
];

/// A run to feed an aggregator (`--script FILE`), for example
/// `{"prompt": "...", "proposers": ["a", "b"], "events": [{"push": {"from": "a", "text":
/// "chunk"}}, {"finish": "a"}, {"answered": "text"}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    /// The user's message (default: `--prompt`).
    #[serde(default)]
    prompt: Option<String>,
    /// How the pipeline runs the aggregator (default: `--mode`, else staircase).
    #[serde(default)]
    mode: Option<StreamMode>,
    /// The sources that will stream, in the session's order.
    proposers: Vec<Proposer>,
    events: Vec<Event>,
}

/// A source: its id alone (also its label), or both.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Proposer {
    Id(String),
    Labelled { id: String, label: String },
}

impl From<Proposer> for Source {
    fn from(proposer: Proposer) -> Self {
        match proposer {
            Proposer::Id(id) => Source {
                label: id.clone(),
                id,
            },
            Proposer::Labelled { id, label } => Source { id, label },
        }
    }
}

/// One thing the host tells the session.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Event {
    /// A chunk of a proposer's answer.
    Push { from: String, text: String },
    /// The proposer has no more output.
    Finish(String),
    /// The aggregator's own answer grew by this text (what its model wrote for a step).
    Answered(String),
}

pub(super) fn call(target: &Target<'_>, args: &Args) -> anyhow::Result<()> {
    let script = match &args.script {
        Some(path) => read_script(path)?,
        None => default_script(args)?,
    };
    let prompt = script.prompt.unwrap_or_else(|| args.prompt.clone());
    let mode = script.mode.or(args.mode).unwrap_or(StreamMode::Staircase);
    let sources: Vec<Source> = script.proposers.into_iter().map(Source::from).collect();
    let conversation = [ChatMessage::new(Role::User, prompt)];
    print_input(format_args!(
        "{mode} run of {:?}, sources {}",
        conversation[0].content,
        sources
            .iter()
            .map(|s| format!("{} ({})", s.id, s.label))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut session = timed("open", || {
        target
            .provider
            .aggregator(target.plugin, target.config, &conversation, &sources, mode)
    })?;
    let mut finished = BTreeSet::new();
    let mut final_step = next_step(session.as_mut())?;
    let mut events = script.events.into_iter();
    while !final_step {
        let Some(event) = events.next() else {
            break;
        };
        match event {
            Event::Push { from, text } => {
                if finished.contains(&from) {
                    // The runtime drops a released or finished source's later chunks.
                    print_input(format_args!(
                        "{from}: {text:?} (dropped: {from} is finished)"
                    ));
                    continue;
                }
                print_input(format_args!("{from}: {text:?}"));
                let demand = timed("push", || session.push(&from, &text))?;
                print_output(match demand {
                    Demand::More => "more",
                    Demand::Enough => "enough (the runtime cancels the source and finishes it)",
                });
                if demand == Demand::Enough {
                    finish(session.as_mut(), &from, &mut finished)?;
                }
            }
            Event::Finish(id) => {
                if finished.contains(&id) {
                    print_input(format_args!("{id} (already finished)"));
                    continue;
                }
                finish(session.as_mut(), &id, &mut finished)?;
            }
            Event::Answered(text) => {
                print_input(format_args!("{text:?}"));
                timed("answered", || session.answered(&text))?;
            }
        }
        final_step = next_step(session.as_mut())?;
    }
    let skipped = events.count();
    if skipped > 0 {
        println!("note          {skipped} event(s) after the final step not fed");
    }
    if !final_step {
        if sources.iter().all(|s| finished.contains(&s.id)) {
            bail!(
                "no final step after every source finished: a pipeline run of {} fails here",
                target.plugin
            );
        }
        println!("note          the script ended before the final step");
    }
    Ok(())
}

/// Tells the session a source ended.
fn finish(
    session: &mut dyn AggregatorSession,
    id: &str,
    finished: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    print_input(id);
    timed("finish", || session.finish(id))?;
    finished.insert(id.to_string());
    Ok(())
}

/// Asks for the step to run now and prints it; true when it is the final one.
fn next_step(session: &mut dyn AggregatorSession) -> anyhow::Result<bool> {
    let step = timed("next-step", || session.next_step())?;
    let Some(Step {
        messages,
        max_tokens,
        is_final,
    }) = step
    else {
        print_output("none");
        return Ok(false);
    };
    let what = match (is_final, max_tokens) {
        (true, 0) => "final step, until the model stops".to_string(),
        (true, n) => format!("final step, at most {n} tokens"),
        (false, 0) => "warm-up step (prefill only)".to_string(),
        (false, n) => format!("step of {n} tokens"),
    };
    print_output(format_args!("{what}, {} message(s):", messages.len()));
    print_messages(&messages);
    Ok(is_final)
}

fn read_script(path: &Path) -> anyhow::Result<Script> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the script {}", path.display()))?;
    parse_script(&text).with_context(|| format!("{} is not an aggregator script", path.display()))
}

/// A script, if every event names one of its proposers (the runtime never feeds others).
fn parse_script(text: &str) -> anyhow::Result<Script> {
    let script: Script = serde_json::from_str(text)?;
    let ids: BTreeSet<&str> = script
        .proposers
        .iter()
        .map(|p| match p {
            Proposer::Id(id) | Proposer::Labelled { id, .. } => id.as_str(),
        })
        .collect();
    if ids.len() != script.proposers.len() {
        bail!("two proposers share an id");
    }
    for (i, event) in script.events.iter().enumerate() {
        let id = match event {
            Event::Push { from, .. } => from,
            Event::Finish(id) => id,
            Event::Answered(_) => continue,
        };
        if !ids.contains(id.as_str()) {
            bail!("event {i} names {id:?}, which is not a proposer");
        }
    }
    Ok(script)
}

/// Each `--upstream` answer (or two default ones) in a few chunks, interleaved as parallel
/// proposers would stream them, then each finished.
fn default_script(args: &Args) -> anyhow::Result<Script> {
    let mut answers = upstream_pairs(args)?;
    if answers.is_empty() {
        answers = DEFAULT_UPSTREAM
            .iter()
            .map(|(label, text)| (label.to_string(), text.to_string()))
            .collect();
    }
    let proposers: Vec<Proposer> = answers
        .iter()
        .enumerate()
        .map(|(i, (label, _))| Proposer::Labelled {
            id: format!("upstream-{i}"),
            label: label.clone(),
        })
        .collect();
    let pieces: Vec<Vec<&str>> = answers
        .iter()
        .map(|(_, text)| chunks(text, DEFAULT_CHUNKS))
        .collect();
    let mut events = Vec::new();
    for round in 0..DEFAULT_CHUNKS {
        for (i, answer) in pieces.iter().enumerate() {
            if let Some(text) = answer.get(round) {
                events.push(Event::Push {
                    from: format!("upstream-{i}"),
                    text: text.to_string(),
                });
            }
        }
    }
    events.extend((0..answers.len()).map(|i| Event::Finish(format!("upstream-{i}"))));
    Ok(Script {
        prompt: None,
        mode: None,
        proposers,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_reads_proposers_with_or_without_labels_and_every_event_kind() {
        let script = parse_script(
            r#"{"prompt": "Hi", "mode": "layered", "proposers": ["a", {"id": "b", "label": "checker"}],
                "events": [{"push": {"from": "a", "text": "x"}}, {"finish": "a"}, {"answered": "y"}]}"#,
        )
        .unwrap();
        assert_eq!(script.mode, Some(StreamMode::Layered));
        let sources: Vec<Source> = script.proposers.into_iter().map(Source::from).collect();
        assert_eq!(sources[0].label, "a");
        assert_eq!(sources[1].label, "checker");
        assert!(matches!(&script.events[..], [
            Event::Push { from, text },
            Event::Finish(finished),
            Event::Answered(answer),
        ] if from == "a" && text == "x" && finished == "a" && answer == "y"));
    }

    #[test]
    fn a_script_naming_an_unknown_proposer_is_refused() {
        let error = parse_script(r#"{"proposers": ["a"], "events": [{"finish": "b"}]}"#)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("event 0 names \"b\", which is not a proposer")
        );
        assert!(parse_script(r#"{"proposers": ["a", "a"], "events": []}"#).is_err());
        assert!(parse_script(r#"{"proposers": [], "events": [], "extra": 1}"#).is_err());
    }
}
