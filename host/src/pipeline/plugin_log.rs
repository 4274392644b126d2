//! Plugin log lines in the run that wrote them. A plugin's `host.log` lines are `tracing`
//! events (target [`PLUGIN_LOG_TARGET`]) inside the `run` and `node` spans of the call that
//! wrote them: the guest pool carries the caller's span to its thread. [`RunLogLayer`] finds
//! those spans and hands each line to the run [`attach`]ed under that run id, which records
//! it as a [`super::RunEvent::PluginLog`]. So `run`'s terminal view, the server's live view
//! and the run report show what each node's plugin said, whatever level stderr logs at.
//! Without the layer (a library user's own subscriber) runs simply get no lines.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The target of a plugin's `host.log` lines.
pub const PLUGIN_LOG_TARGET: &str = "staircase::plugin::host_imports";

/// One line a plugin logged while a node of a run called it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PluginLine {
    /// The node's id (as in the pipeline file).
    #[serde(skip)]
    pub node: String,
    pub plugin: String,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
}

type Sinks = Mutex<HashMap<String, mpsc::UnboundedSender<PluginLine>>>;

fn sinks() -> &'static Sinks {
    static SINKS: OnceLock<Sinks> = OnceLock::new();
    SINKS.get_or_init(Default::default)
}

/// A run's place among the runs that receive their plugins' lines; dropped when it ends.
pub struct Attached {
    run_id: String,
}

impl Drop for Attached {
    fn drop(&mut self) {
        crate::sync::lock(sinks()).remove(&self.run_id);
    }
}

/// The lines plugins write inside the `run` span of `run_id` until the guard is dropped.
pub fn attach(run_id: String) -> (Attached, mpsc::UnboundedReceiver<PluginLine>) {
    let (tx, rx) = mpsc::unbounded_channel();
    crate::sync::lock(sinks()).insert(run_id.clone(), tx);
    (Attached { run_id }, rx)
}

/// Routes plugin log lines to their runs. Install it beside the log output with
/// [`RunLogLayer::interest`] as its filter, so it sees the lines the log filter drops.
pub struct RunLogLayer;

impl RunLogLayer {
    /// What the layer reads: the `run` and `node` spans and the plugins' lines.
    pub fn interest(metadata: &Metadata<'_>) -> bool {
        (metadata.is_span() && matches!(metadata.name(), "run" | "node"))
            || metadata.target() == PLUGIN_LOG_TARGET
    }
}

/// The run id of a `run` span.
struct RunSpan(String);
/// The node id of a `node` span.
struct NodeSpan(String);

/// One field of a span or an event, as text.
struct FieldText {
    name: &'static str,
    value: Option<String>,
}

impl FieldText {
    fn of(name: &'static str) -> Self {
        Self { name, value: None }
    }
}

impl Visit for FieldText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.name {
            self.value = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        // `%value` fields and messages debug-print as their text.
        if field.name() == self.name {
            self.value = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for RunLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let field = match attrs.metadata().name() {
            "run" => "run_id",
            "node" => "id",
            _ => return,
        };
        let mut text = FieldText::of(field);
        attrs.record(&mut text);
        let (Some(value), Some(span)) = (text.value, ctx.span(id)) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if field == "run_id" {
            extensions.insert(RunSpan(value));
        } else {
            extensions.insert(NodeSpan(value));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != PLUGIN_LOG_TARGET {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let (mut run, mut node) = (None, None);
        for span in scope {
            let extensions = span.extensions();
            if node.is_none() {
                node = extensions.get::<NodeSpan>().map(|n| n.0.clone());
            }
            if let Some(r) = extensions.get::<RunSpan>() {
                run = Some(r.0.clone());
                break;
            }
        }
        let (Some(run), Some(node)) = (run, node) else {
            return;
        };
        let Some(sink) = crate::sync::lock(sinks()).get(&run).cloned() else {
            return;
        };
        let (mut plugin, mut message) = (FieldText::of("plugin"), FieldText::of("message"));
        event.record(&mut plugin);
        event.record(&mut message);
        let _ = sink.send(PluginLine {
            node,
            plugin: plugin.value.unwrap_or_default(),
            level: event.metadata().level().as_str().to_ascii_lowercase(),
            message: message.value.unwrap_or_default(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;

    #[test]
    fn a_plugins_line_reaches_the_run_and_node_it_was_written_in() {
        let subscriber = tracing_subscriber::registry()
            .with(RunLogLayer.with_filter(filter_fn(RunLogLayer::interest)));
        let (attached, mut lines) = attach("r1".into());
        tracing::subscriber::with_default(subscriber, || {
            let _run = tracing::info_span!("run", run_id = "r1").entered();
            tracing::info!(target: PLUGIN_LOG_TARGET, plugin = "p", "outside any node");
            let _node = tracing::info_span!("node", id = "a").entered();
            tracing::debug!(target: PLUGIN_LOG_TARGET, plugin = %"p", "hello {}", 7);
            tracing::info!(target: "elsewhere", plugin = "p", "not a plugin's line");
            let _other = tracing::info_span!("run", run_id = "r2").entered();
            tracing::info!(target: PLUGIN_LOG_TARGET, plugin = "p", "another run's");
        });
        let line = lines.try_recv().expect("one line");
        assert_eq!(
            line,
            PluginLine {
                node: "a".into(),
                plugin: "p".into(),
                level: "debug".into(),
                message: "hello 7".into(),
            }
        );
        assert!(lines.try_recv().is_err(), "only the node's line of run r1");
        drop(attached);
        assert!(crate::sync::lock(sinks()).get("r1").is_none());
    }
}
