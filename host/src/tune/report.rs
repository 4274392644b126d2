//! A tuning run as people read it: the measured latencies, the predicted Pareto front, the
//! shortlist with predicted against measured critical paths and `eval` quality, and an SVG
//! of quality against critical path and against time to first token.

use std::fmt::Write;

use super::{Holdout, TuneReport};
use crate::eval::runner::{JudgeCheck, VariantSummary};
use crate::eval::stats::Interval;
use crate::trace::svg::{escape, x_tick_labels};

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// `value [low, high]`, with a third digit: 12.5 of 28 is 0.446, not the 0.45 a target
/// might read into two.
pub fn interval(i: Interval) -> String {
    format!("{:.3} [{:.3}, {:.3}]", i.value, i.low, i.high)
}

/// The quality lines of `tuned` against `hand_written`, the baseline of both summaries.
pub fn versus(tuned: &VariantSummary, hand_written: &VariantSummary) -> String {
    let (t, h) = (tuned, hand_written);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  TTFT / hand-written {}, degenerate {} vs {} of {}",
        opt(t.ttft_over_layered, 2),
        t.degenerate,
        h.degenerate,
        t.answers
    );
    if let Some(r) = &t.rated {
        let _ = writeln!(
            out,
            "  rated higher/tie/lower {}/{}/{} (unrated {}): higher + ties/2 {} (equal judged quality: at least 0.45)",
            r.higher,
            r.ties,
            r.lower,
            r.unrated,
            interval(r.score)
        );
    }
    if let (Some(mt), Some(mh)) = (t.mean_rating, h.mean_rating) {
        let _ = writeln!(
            out,
            "  mean rating (1-9) {} vs {}",
            interval(mt),
            interval(mh)
        );
    }
    // Wins and losses come only from pairs whose two orders agreed; the rest are
    // position-bias ties.
    if let Some(j) = &t.judged {
        let _ = writeln!(
            out,
            "  pairwise judge: {} pairs, orders agreed {}, win+tie/2 over agreed pairs {:.3}, probability-weighted {}",
            j.judged,
            interval(j.consistent),
            j.consistent_score.value,
            t.weighted_score.map_or("-".into(), interval)
        );
    }
    out
}

/// The judge check's line: how often the judge preferred the hand-written answer to a
/// looped copy of it.
pub fn judge_check_line(check: &JudgeCheck) -> String {
    format!(
        "  judge check: the hand-written answer rated above a looped copy of it {} of {}, preferred in pairs {} of {}\n",
        check.rated_higher, check.rated, check.tally.wins, check.summary.judged
    )
}

impl Holdout {
    /// The chosen variant against the hand-written pipeline, prompts the choice never saw.
    fn lines(&self) -> String {
        let mut out = format!(
            "\nheld out: {} prompts the choice never saw, {} against the hand-written pipeline:\n",
            self.prompts, self.tuned.variant
        );
        out.push_str(&versus(&self.tuned, &self.hand_written));
        if let Some(check) = &self.judge_check {
            out.push_str(&judge_check_line(check));
        }
        out
    }
}

impl TuneReport {
    /// The table printed by the CLI.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "latencies measured on this host (ms per token):");
        for (model, l) in &self.latencies.models {
            let _ = writeln!(
                out,
                "  {model:<12} decode {:.2}, prefill {:.2}, +{:.2} per other sequence",
                crate::millis::millis(l.solo.decode_per_token),
                crate::millis::millis(l.solo.prefill_per_token),
                crate::millis::millis(l.per_extra_sequence)
            );
        }
        let scales: Vec<String> = self
            .measured
            .decode_scale
            .iter()
            .map(|(m, s)| format!("{m} x{s:.2}"))
            .collect();
        let lengths: Vec<String> = self
            .measured
            .lengths
            .iter()
            .map(|(id, n)| format!("{id} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "calibrated on the hand-written run: sharing cost per other sequence {} (in the run over the probes); tokens of nodes that stopped early: {}",
            if scales.is_empty() {
                "-".into()
            } else {
                scales.join(", ")
            },
            if lengths.is_empty() {
                "-".into()
            } else {
                lengths.join(", ")
            },
        );
        let _ = writeln!(
            out,
            "calibration: the hand-written run took {:.2}x its predicted critical path; the search ran on a budget of {:.0} ms",
            self.calibration,
            self.budget_ms / self.calibration
        );
        let _ = writeln!(
            out,
            "\nsearch: {} of {} variants scored on the critical-path model; predicted Pareto front (prior quality vs critical path):",
            self.evaluated, self.space_size
        );
        for p in &self.front {
            let _ = writeln!(
                out,
                "  {:>8.0} ms  ttft {:>7.0} ms  prior {:.2}  {}",
                p.predicted_critical_path_ms, p.predicted_ttft_ms, p.prior, p.description
            );
        }
        let _ = writeln!(
            out,
            "\nshortlist, run for real (budget {:.0} ms):\n{:<16} {:>10} {:>10} {:>6} {:>9} {:>9} {:>8} {:>6}  variant",
            self.budget_ms,
            "name",
            "pred. cp",
            "meas. cp",
            "ratio",
            "ttft",
            "total",
            "quality",
            "degen."
        );
        for c in &self.checked {
            let _ = writeln!(
                out,
                "{:<16} {:>10.0} {:>10.0} {:>6.2} {:>9} {:>9.0} {:>8} {:>6}  {}{}",
                c.name,
                c.predicted_critical_path_ms,
                c.measured_critical_path_ms,
                c.prediction_ratio,
                opt(c.ttft_ms, 0),
                c.total_ms,
                opt(c.quality, 2),
                c.eval
                    .as_ref()
                    .map_or("-".into(), |s| s.degenerate.to_string()),
                if c.hand_written {
                    "(hand-written) "
                } else {
                    ""
                },
                c.description
            );
        }
        if self.checked.iter().any(|c| c.quality.is_some()) {
            let _ = writeln!(
                out,
                "quality: against the hand-written pipeline's answers (its own 0.50): rated higher + ties/2, else judged win + tie/2, else the share not degenerate"
            );
        }
        if let Some((low, high)) = self.prediction_range() {
            let tolerance = super::PREDICTION_TOLERANCE;
            let _ = writeln!(
                out,
                "prediction: predicted / measured critical path of the tuned variants {low:.2}-{high:.2} ({} the stated {:.2}-{tolerance:.2})",
                if low >= 1.0 / tolerance && high <= tolerance {
                    "within"
                } else {
                    "outside"
                },
                1.0 / tolerance
            );
        }
        if let Some(h) = &self.holdout {
            out.push_str(&h.lines());
        }
        let _ = writeln!(
            out,
            "\nchosen: {}{}",
            self.chosen,
            if self.met_budget {
                String::new()
            } else {
                format!(
                    " (no variant meets the budget of {:.0} ms; this is the fastest)",
                    self.budget_ms
                )
            }
        );
        out
    }

    /// The lowest and highest predicted over measured critical path of the tuned variants
    /// run (the hand-written one calibrated the prediction, so it is left out).
    pub fn prediction_range(&self) -> Option<(f64, f64)> {
        let ratios: Vec<f64> = self
            .checked
            .iter()
            .filter(|c| !c.hand_written && c.prediction_ratio > 0.0)
            .map(|c| c.prediction_ratio)
            .collect();
        let low = ratios.iter().copied().reduce(f64::min)?;
        let high = ratios.iter().copied().reduce(f64::max)?;
        Some((low, high))
    }

    /// Two panels: quality against critical path, and against TTFT. Front points (prior
    /// quality, predicted) in grey; shortlisted variants (eval quality, measured) in colour.
    pub fn svg(&self) -> String {
        let (panel_w, height) = (460.0, 420.0);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#,
            2.0 * panel_w + 260.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="10" y="22" font-size="14" font-weight="bold">staircase tune {}: budget {:.0} ms</text>"#,
            escape(&self.base),
            self.budget_ms
        );
        let max_prior = self.front.iter().map(|p| p.prior).fold(1e-9f64, f64::max);
        let front_cp: Vec<(f64, f64)> = self
            .front
            .iter()
            .map(|p| (p.predicted_critical_path_ms, p.prior / max_prior))
            .collect();
        let front_ttft: Vec<(f64, f64)> = self
            .front
            .iter()
            .map(|p| (p.predicted_ttft_ms, p.prior / max_prior))
            .collect();
        let checked_cp: Vec<(f64, f64)> = self
            .checked
            .iter()
            .map(|c| {
                (
                    c.measured_critical_path_ms,
                    c.quality.unwrap_or(c.prior / max_prior),
                )
            })
            .collect();
        let checked_ttft: Vec<(f64, f64)> = self
            .checked
            .iter()
            .map(|c| {
                (
                    c.ttft_ms.unwrap_or(0.0),
                    c.quality.unwrap_or(c.prior / max_prior),
                )
            })
            .collect();
        panel(
            &mut svg,
            0.0,
            panel_w,
            height,
            "critical path, ms",
            &front_cp,
            &checked_cp,
            Some(self.budget_ms),
        );
        panel(
            &mut svg,
            panel_w,
            panel_w,
            height,
            "time to first token, ms",
            &front_ttft,
            &checked_ttft,
            None,
        );
        for (i, c) in self.checked.iter().enumerate() {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{}"/><text x="{:.1}" y="{:.1}">{}{}</text>"##,
                2.0 * panel_w + 20.0,
                60.0 + 18.0 * i as f64,
                colour(i),
                2.0 * panel_w + 30.0,
                64.0 + 18.0 * i as f64,
                escape(&c.name),
                if c.name == self.chosen {
                    " (chosen)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#999">grey: predicted front (prior)</text>"##,
            2.0 * panel_w + 20.0,
            64.0 + 18.0 * self.checked.len() as f64
        );
        let _ = writeln!(svg, "</svg>");
        svg
    }
}

fn colour(i: usize) -> &'static str {
    [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
    ][i % 6]
}

/// One scatter panel at horizontal offset `x0`: y is quality in [0, 1].
#[allow(clippy::too_many_arguments)]
fn panel(
    svg: &mut String,
    x0: f64,
    width: f64,
    height: f64,
    x_label: &str,
    grey: &[(f64, f64)],
    coloured: &[(f64, f64)],
    budget: Option<f64>,
) {
    let (left, right, top, bottom) = (x0 + 60.0, 20.0, 40.0, 50.0);
    let (plot_w, plot_h) = (width - 60.0 - right, height - top - bottom);
    let max_x = grey
        .iter()
        .chain(coloured)
        .map(|p| p.0)
        .chain(budget)
        .fold(1.0f64, f64::max)
        * 1.05;
    let x = |v: f64| left + plot_w * v / max_x;
    let y = |q: f64| top + plot_h * (1.0 - q.clamp(0.0, 1.0));
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#333"/>"##,
        top + plot_h,
        left + plot_w,
        top + plot_h,
        top + plot_h
    );
    x_tick_labels(svg, max_x, x, top + plot_h + 16.0);
    for i in 0..=4 {
        let q = f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{q:.2}</text>"##,
            left - 6.0,
            y(q) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{x_label}</text><text x="{:.1}" y="{:.1}" transform="rotate(-90 {:.1} {:.1})" text-anchor="middle">quality</text>"##,
        left + plot_w / 2.0,
        height - 15.0,
        x0 + 16.0,
        top + plot_h / 2.0,
        x0 + 16.0,
        top + plot_h / 2.0
    );
    if let Some(b) = budget {
        let _ = writeln!(
            svg,
            r##"<line x1="{:.1}" y1="{top}" x2="{:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#d62728">budget</text>"##,
            x(b),
            x(b),
            top + plot_h,
            x(b) + 4.0,
            top + 12.0
        );
    }
    let mut line = String::new();
    for &(px, q) in grey {
        let _ = write!(line, "{:.1},{:.1} ", x(px), y(q));
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#bbb"/>"##,
            x(px),
            y(q)
        );
    }
    let _ = writeln!(
        svg,
        r##"<polyline points="{line}" fill="none" stroke="#bbb"/>"##
    );
    for (i, &(px, q)) in coloured.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{}"/>"##,
            x(px),
            y(q),
            colour(i)
        );
    }
}
