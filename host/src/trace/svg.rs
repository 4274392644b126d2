//! The staircase chart: one lane per node, time left to right. In each lane a bar shows when
//! the node worked and a rising step line its output handed downstream chunk by chunk (the
//! "staircase"); aggregator steps are blue boxes on the bar, first tokens dots, cancellations
//! crosses. Lanes on the critical path are drawn in red. Drawn from a Chrome trace alone.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use super::chrome::ChromeTrace;

const WIDTH: f64 = 1000.0;
const LABEL_WIDTH: f64 = 150.0;
const RIGHT_MARGIN: f64 = 30.0;
const LANE_HEIGHT: f64 = 56.0;
const TOP: f64 = 44.0;
const AXIS_HEIGHT: f64 = 36.0;
const BAR_HEIGHT: f64 = 8.0;
const CRITICAL_COLOUR: &str = "#d62728";
const NORMAL_COLOUR: &str = "#4c566a";
const STEP_COLOUR: &str = "#1f77b4";

/// Why a trace cannot be drawn.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the trace has no node events (category `node`), so there is nothing to draw")]
    Empty,
}

#[derive(Default)]
struct Lane {
    name: String,
    span: Option<(f64, f64)>,
    critical: bool,
    cancelled: bool,
    first_token: Option<f64>,
    /// Start, end, final, tokens.
    steps: Vec<(f64, f64, bool, f64)>,
    chunks: Vec<(f64, f64)>,
}

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick spacing of 1, 2 or 5 times a power of ten giving about six ticks.
pub(crate) fn tick_step(total_us: f64) -> f64 {
    let raw = (total_us / 6.0).max(1.0);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// Labels under an x axis from 0 to `max` at [`tick_step`] spacing, each at `x(value)` and
/// height `y` (the scatter plots of `eval` and `tune`).
pub(crate) fn x_tick_labels(svg: &mut String, max: f64, x: impl Fn(f64) -> f64, y: f64) {
    let step = tick_step(max);
    let mut tick = 0.0;
    while tick <= max {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{y:.1}" text-anchor="middle">{tick:.0}</text>"##,
            x(tick)
        );
        tick += step;
    }
}

fn format_time(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.1} s", us / 1e6)
    } else {
        format!("{:.0} ms", us / 1e3)
    }
}

/// The chart of `trace` as an SVG document.
pub fn render(trace: &ChromeTrace) -> Result<String, RenderError> {
    let names = trace.lane_names();
    let mut lanes: BTreeMap<u32, Lane> = BTreeMap::new();
    for event in &trace.trace_events {
        if event.ph == "M" {
            continue;
        }
        let lane = lanes.entry(event.tid).or_insert_with(|| Lane {
            name: names
                .get(&event.tid)
                .cloned()
                .unwrap_or_else(|| event.name.clone()),
            ..Lane::default()
        });
        let end = event.ts + event.dur.unwrap_or(0.0);
        match (event.ph.as_str(), event.cat.as_str()) {
            ("X", "node") => {
                lane.span = Some((event.ts, end));
                lane.critical = event.args.get("critical").and_then(Value::as_bool) == Some(true);
                lane.cancelled = event.args.get("cancelled").and_then(Value::as_bool) == Some(true);
            }
            ("X", "step") => {
                let is_final = event.args.get("final").and_then(Value::as_bool) == Some(true);
                let tokens = event
                    .args
                    .get("tokens")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0);
                lane.steps.push((event.ts, end, is_final, tokens));
            }
            ("i", "token") => lane.first_token = Some(event.ts),
            ("i", "chunk") => {
                let total = event
                    .args
                    .get("total_tokens")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0);
                lane.chunks.push((event.ts, total));
            }
            _ => {}
        }
    }
    lanes.retain(|_, lane| lane.span.is_some());
    for lane in lanes.values_mut() {
        lane.steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        // A node that hands nothing downstream (the answer) shows its own output growing,
        // step by step, as its staircase.
        if lane.chunks.is_empty() && lane.steps.len() > 1 {
            let mut total = 0.0;
            for step in &lane.steps {
                total += step.3;
                lane.chunks.push((step.1, total));
            }
        }
    }
    if lanes.is_empty() {
        return Err(RenderError::Empty);
    }
    let t_end = lanes
        .values()
        .filter_map(|l| l.span.map(|s| s.1))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let plot = WIDTH - LABEL_WIDTH - RIGHT_MARGIN;
    let x = |t: f64| LABEL_WIDTH + plot * t / t_end;
    let height = TOP + LANE_HEIGHT * lanes.len() as f64 + AXIS_HEIGHT;

    let mut svg = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">Staircase timeline</text><text x="{}" y="20" fill="{CRITICAL_COLOUR}">red: critical path</text><text x="{}" y="20" fill="{STEP_COLOUR}">blue: generation steps</text>"#,
        LABEL_WIDTH + 200.0,
        LABEL_WIDTH + 340.0
    );

    for (row, lane) in lanes.values().enumerate() {
        let top = TOP + LANE_HEIGHT * row as f64;
        let bottom = top + LANE_HEIGHT - 10.0;
        let colour = if lane.critical {
            CRITICAL_COLOUR
        } else {
            NORMAL_COLOUR
        };
        if row % 2 == 1 {
            let _ = writeln!(
                svg,
                r##"<rect x="0" y="{top}" width="{WIDTH}" height="{LANE_HEIGHT}" fill="#f4f5f7"/>"##
            );
        }
        let weight = if lane.critical { "bold" } else { "normal" };
        let suffix = if lane.cancelled { " (cancelled)" } else { "" };
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{}" fill="{colour}" font-weight="{weight}">{}{suffix}</text>"#,
            top + LANE_HEIGHT / 2.0 + 4.0,
            escape(&lane.name)
        );
        if let Some((start, end)) = lane.span {
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{BAR_HEIGHT}" fill="{colour}" fill-opacity="0.35" stroke="{colour}"/>"#,
                x(start),
                bottom - BAR_HEIGHT,
                (x(end) - x(start)).max(1.0)
            );
            // The staircase: output handed downstream so far, rising at each chunk.
            let mut chunks = lane.chunks.clone();
            chunks.sort_by(|a, b| a.0.total_cmp(&b.0));
            chunks.dedup();
            let max_tokens = chunks.iter().map(|c| c.1).fold(0.0f64, f64::max);
            if max_tokens > 0.0 {
                let rise = LANE_HEIGHT - 22.0;
                let y = |tokens: f64| bottom - BAR_HEIGHT - rise * tokens / max_tokens;
                let mut points = format!("{:.1},{:.1}", x(start), y(0.0));
                let mut level = 0.0;
                for (t, total) in &chunks {
                    let _ = write!(
                        points,
                        " {:.1},{:.1} {:.1},{:.1}",
                        x(*t),
                        y(level),
                        x(*t),
                        y(*total)
                    );
                    level = *total;
                }
                let _ = write!(points, " {:.1},{:.1}", x(end), y(level));
                let _ = writeln!(
                    svg,
                    r#"<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>"#
                );
            }
            if lane.cancelled {
                let (cx, cy) = (x(end), bottom - BAR_HEIGHT / 2.0);
                let _ = writeln!(
                    svg,
                    r#"<path d="M{:.1},{:.1} l8,8 m0,-8 l-8,8" stroke="black" stroke-width="2"/>"#,
                    cx - 4.0,
                    cy - 4.0
                );
            }
        }
        // One step is the whole generation: nothing to show beyond the bar.
        let steps: &[_] = if lane.steps.len() > 1 {
            &lane.steps
        } else {
            &[]
        };
        for (start, end, is_final, _) in steps {
            let opacity = if *is_final { 0.9 } else { 0.6 };
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{BAR_HEIGHT}" fill="{STEP_COLOUR}" fill-opacity="{opacity}" stroke="white" stroke-width="0.5"/>"#,
                x(*start),
                bottom - BAR_HEIGHT,
                (x(*end) - x(*start)).max(1.0)
            );
        }
        if let Some(t) = lane.first_token {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="black"/>"#,
                x(t),
                bottom - BAR_HEIGHT / 2.0
            );
        }
    }

    let axis_y = TOP + LANE_HEIGHT * lanes.len() as f64 + 4.0;
    let _ = writeln!(
        svg,
        r#"<line x1="{LABEL_WIDTH}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="black"/>"#,
        LABEL_WIDTH + plot
    );
    let step = tick_step(t_end);
    let mut t = 0.0;
    while t <= t_end + 1e-9 {
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" y1="{axis_y}" x2="{0:.1}" y2="{1}" stroke="black"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"#,
            x(t),
            axis_y + 5.0,
            axis_y + 18.0,
            format_time(t)
        );
        t += step;
    }
    let _ = writeln!(svg, "</svg>");
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{EventKind, Timeline};
    use super::*;

    fn sample() -> Timeline {
        let timeline = Timeline::new(vec!["proposer <a>".into(), "final".into()]);
        let ms = Duration::from_millis;
        timeline.record_at(ms(0), 0, EventKind::Start);
        timeline.record_at(ms(20), 0, EventKind::FirstToken);
        for (i, total) in [8u32, 24, 56].iter().enumerate() {
            timeline.record_at(
                ms(100 * (i as u64 + 1)),
                0,
                EventKind::Chunk {
                    to: "final".into(),
                    tokens: 8,
                    total_tokens: *total,
                },
            );
        }
        timeline.record_at(ms(300), 0, EventKind::End { tokens: 56 });
        timeline.record_at(ms(110), 1, EventKind::Start);
        timeline.record_at(
            ms(200),
            1,
            EventKind::Step {
                index: 0,
                started: ms(110),
                tokens: 16,
                prompt_tokens: 90,
                cached_prompt_tokens: 0,
                is_final: false,
            },
        );
        timeline.record_at(ms(400), 1, EventKind::End { tokens: 30 });
        timeline
    }

    #[test]
    fn trace_round_trips_through_chrome_json_and_renders() {
        let trace = ChromeTrace::from_timeline(&sample(), &[0, 1]);
        let json = trace.to_json();
        let value: Value = serde_json::from_str(&json).unwrap();
        let events = value["traceEvents"].as_array().unwrap();
        assert!(
            events
                .iter()
                .all(|e| e["ph"].is_string() && e["ts"].is_number())
        );
        let node = events
            .iter()
            .find(|e| e["cat"] == "node" && e["tid"] == 1)
            .unwrap();
        assert_eq!(node["dur"].as_f64(), Some(300_000.0));
        assert_eq!(node["args"]["critical"], true);

        let parsed = ChromeTrace::from_json(&json).unwrap();
        assert_eq!(parsed, trace);
        let svg = render(&parsed).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("proposer &lt;a&gt;"), "lane names are escaped");
        assert_eq!(
            svg.matches("<polyline").count(),
            1,
            "one staircase: the proposer's"
        );
        assert!(svg.contains(CRITICAL_COLOUR));
    }

    #[test]
    fn an_empty_trace_is_refused() {
        assert!(matches!(
            render(&ChromeTrace::default()),
            Err(RenderError::Empty)
        ));
        assert!(ChromeTrace::from_json("{\"nope\": 1}").is_err());
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(6_000_000.0), 1_000_000.0);
        assert_eq!(tick_step(1_100_000.0), 200_000.0);
    }
}
