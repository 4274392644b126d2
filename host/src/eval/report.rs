//! An evaluation as people read it: a table of every variant's figures, and an SVG of
//! quality against time to first token, one point per variant. Quality on the chart is the
//! judged score against the layered baseline (win + tie/2, with its 95% interval) when the
//! run was judged, else the share of answers that are not degenerate.

use std::fmt::Write;

use super::runner::{EvalReport, VariantSummary};
use super::stats::Interval;
use crate::trace::svg::{escape, x_tick_labels};

const JUDGED_HEADER: &str = "judged vs baseline: W/T/L (unread), win+tie/2 [95% CI], \
                             orders agreed, win+tie/2 of those; weighted score [95% CI]";

fn percent(interval: Option<&Interval>) -> String {
    interval.map_or_else(
        || "-".to_string(),
        |i| {
            format!(
                "{:.0}% [{:.0}-{:.0}%]",
                100.0 * i.value,
                100.0 * i.low,
                100.0 * i.high
            )
        },
    )
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// The quality axis of a variant: (value, low, high): the rated win + tie/2 where there is
/// one (the judge method a small judge passes its check with), else the judged win + tie/2,
/// else the share of answers that are not degenerate.
pub fn quality(s: &VariantSummary) -> (f64, f64, f64) {
    // A judge whose engine gave no rating falls through to its verdicts.
    if let Some(r) = s.rated.as_ref().filter(|r| r.higher + r.ties + r.lower > 0) {
        return (r.score.value, r.score.low, r.score.high);
    }
    match &s.judged {
        Some(j) if j.judged > 0 => (j.score.value, j.score.low, j.score.high),
        _ => {
            let ok = if s.answers == 0 {
                0.0
            } else {
                1.0 - s.degenerate as f64 / s.answers as f64
            };
            (ok, ok, ok)
        }
    }
}

impl EvalReport {
    /// The table printed by the CLI.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} prompts on {}; baseline {}; answers up to {} tokens, proposers {}",
            self.prompts.len(),
            self.model,
            self.baseline,
            self.answer_tokens,
            self.proposer_tokens
                .map_or_else(|| "as in the file".to_string(), |t| format!("{t} tokens")),
        );
        let _ = writeln!(
            out,
            "{:<34} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6} {:>22}  {}",
            "variant",
            "1st in",
            "1st step",
            "TTFT ms",
            "/layer.",
            "degen.",
            "said2x",
            "dist-2",
            "words",
            "cut mid",
            "F1 lay",
            "F1 sgl",
            "rating",
            "rated H/T/L, w+t/2",
            JUDGED_HEADER,
        );
        for s in &self.summaries {
            let judged = match &s.judged {
                Some(j) => format!(
                    "{}/{}/{} ({}), {}, {}/{}, {}; {}",
                    s.tally.wins,
                    s.tally.ties,
                    s.tally.losses,
                    s.tally.unparseable,
                    percent(Some(&j.score)),
                    s.tally.consistent,
                    j.judged,
                    percent((s.tally.consistent > 0).then_some(&j.consistent_score)),
                    percent(s.weighted_score.as_ref()),
                ),
                None => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "{:<34} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6.2} {:>6.0} {:>7} {:>6} {:>6} {:>6} {:>22}  {}",
                s.variant,
                opt(s.mean_first_input_token_ms, 0),
                opt(s.mean_first_step_ms, 0),
                opt(s.mean_ttft_ms, 0),
                opt(s.ttft_over_layered, 3),
                format!("{}/{}", s.degenerate, s.answers),
                format!("{}/{}", s.repeated_span, s.answers),
                s.mean_distinct_2,
                s.mean_words,
                s.limit_mid_sentence,
                opt(s.mean_f1_layered, 2),
                opt(s.mean_f1_single, 2),
                opt(s.mean_rating.map(|r| r.value), 2),
                s.rated.as_ref().map_or_else(
                    || "-".to_string(),
                    |r| format!(
                        "{}/{}/{}, {:.0}% [{:.0}-{:.0}%]",
                        r.higher,
                        r.ties,
                        r.lower,
                        100.0 * r.score.value,
                        100.0 * r.score.low,
                        100.0 * r.score.high
                    )
                ),
                judged
            );
        }
        let _ = writeln!(
            out,
            "1st in: first token of any proposer; 1st step: the answering node's first step \
             starts; both ms since the run began; said2x: answers saying a span of {} words \
             twice verbatim (counted in degen.){}",
            crate::eval::metrics::DEGENERATE_SPAN,
            self.judge
                .as_ref()
                .map_or_else(String::new, |j| format!(". Judge: {j}")),
        );
        if let Some(check) = &self.judge_check {
            let t = &check.tally;
            let _ = writeln!(
                out,
                "Judge check, the baseline's answer against a looped copy of its opening: \
                 rated higher in {}/{} ({}); pairwise W/T/L {}/{}/{} ({} unread), preferred in \
                 {}, orders agreed {}/{}, weighted score {}. A method that does not prefer the \
                 real answer nearly always cannot rank two real ones: read its figures above \
                 with this in mind.",
                check.rated_higher,
                check.rated,
                percent(Some(&check.rated_higher_share)),
                t.wins,
                t.ties,
                t.losses,
                t.unparseable,
                percent(Some(&check.summary.win)),
                t.consistent,
                t.judged(),
                percent(check.weighted_score.as_ref()),
            );
        }
        out
    }

    /// Quality against TTFT (relative to the baseline), one point per variant.
    pub fn svg(&self) -> String {
        let (width, height) = (960.0, 480.0);
        let (left, right, top, bottom) = (70.0, 400.0, 40.0, 60.0);
        let (plot_w, plot_h) = (width - left - right, height - top - bottom);
        let points: Vec<(&VariantSummary, f64)> = self
            .summaries
            .iter()
            .filter_map(|s| s.mean_ttft_ms.map(|t| (s, t)))
            .collect();
        let max_ttft = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.05;
        let x = |ttft: f64| left + plot_w * ttft / max_ttft;
        let y = |q: f64| top + plot_h * (1.0 - q.clamp(0.0, 1.0));
        let rated = self.summaries.iter().any(|s| s.rated.is_some());
        let judged = self.summaries.iter().any(|s| s.judged.is_some());
        let y_label = if rated {
            "rated win + tie/2 vs the layered baseline (95% CI)"
        } else if judged {
            "judged win + tie/2 vs the layered baseline (95% CI)"
        } else {
            "answers not degenerate"
        };
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="10" y="22" font-size="14" font-weight="bold">Quality vs time to first token: {} prompts on {}</text>"#,
            self.prompts.len(),
            escape(&self.model)
        );
        // Axes, ticks and grid.
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#333"/>"##,
            top + plot_h,
            left + plot_w,
            top + plot_h,
            top + plot_h
        );
        for i in 0..=4 {
            let q = f64::from(i) / 4.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
                y(q),
                left + plot_w,
                y(q),
                left - 6.0,
                y(q) + 4.0,
                100.0 * q
            );
        }
        x_tick_labels(&mut svg, max_ttft, x, top + plot_h + 16.0);
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">mean time to first answer token, ms</text><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">{y_label}</text>"##,
            left + plot_w / 2.0,
            height - 20.0,
            top + plot_h / 2.0,
            top + plot_h / 2.0
        );
        if judged {
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#d62728">45% target</text>"##,
                y(0.45),
                left + plot_w,
                y(0.45),
                left + plot_w + 4.0,
                y(0.45) + 4.0
            );
        }
        for (i, (s, ttft)) in points.iter().enumerate() {
            let (q, low, high) = quality(s);
            let (px, py) = (x(*ttft), y(q));
            let colour = [
                "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
            ][i % 6];
            let _ = writeln!(
                svg,
                r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{colour}"/><circle cx="{px:.1}" cy="{py:.1}" r="5" fill="{colour}"/>"##,
                y(high),
                y(low)
            );
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{colour}"/><text x="{:.1}" y="{:.1}">{} ({:.0} ms, {:.0}%)</text>"##,
                left + plot_w + 20.0,
                top + 20.0 + 18.0 * i as f64,
                left + plot_w + 30.0,
                top + 24.0 + 18.0 * i as f64,
                escape(&s.variant),
                ttft,
                100.0 * q
            );
        }
        let _ = writeln!(svg, "</svg>");
        svg
    }
}
