//! Confidence intervals for judged comparisons: Wilson score intervals for the share of
//! wins, ties and losses (closed form, good at small n and near 0 or 1), and a percentile
//! bootstrap for the score "win + tie/2", whose per-prompt values (1, 0.5, 0) are not a
//! binomial count. The bootstrap's resampling is seeded, so a report is reproducible.

use serde::Serialize;

use crate::speculate::SplitMix64;

/// z for a two-sided 95% interval.
pub const Z_95: f64 = 1.959_963_984_540_054;
/// Bootstrap resamples: enough that the 2.5% and 97.5% quantiles move by well under a
/// percentage point between seeds at the prompt counts used here.
pub const BOOTSTRAP_RESAMPLES: usize = 4000;
const BOOTSTRAP_SEED: u64 = 0x5EED_CA5E;

/// A share and its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Interval {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// Wilson score interval of `successes` out of `n` (`z` standard normal quantile). For
/// `n` 0 the whole range [0, 1] around 0.
pub fn wilson(successes: usize, n: usize, z: f64) -> Interval {
    if n == 0 {
        return Interval {
            value: 0.0,
            low: 0.0,
            high: 1.0,
        };
    }
    let n_f = n as f64;
    let p = successes as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    Interval {
        value: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    }
}

/// The mean of `values` with a 95% percentile-bootstrap interval.
pub fn bootstrap_mean(values: &[f64]) -> Interval {
    if values.is_empty() {
        return Interval {
            value: 0.0,
            low: 0.0,
            high: 1.0,
        };
    }
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = SplitMix64::new(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let sum: f64 = (0..n)
                .map(|_| values[(rng.next_u64() % n as u64) as usize])
                .sum();
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    Interval {
        value: mean,
        low: at(0.025),
        high: at(0.975),
    }
}

/// One score per outcome, 1 a win, 0.5 a tie and 0 a loss: their mean is win + tie/2.
pub fn win_tie_loss_scores(wins: usize, ties: usize, losses: usize) -> Vec<f64> {
    std::iter::repeat_n(1.0, wins)
        .chain(std::iter::repeat_n(0.5, ties))
        .chain(std::iter::repeat_n(0.0, losses))
        .collect()
}

/// Judged outcomes of one variant against a baseline, one per prompt.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// Prompts whose verdicts could not be read (never guessed; not in the shares).
    pub unparseable: usize,
    /// Prompts where both orders gave the same verdict (a judge with position bias
    /// contradicts itself and so gives ties).
    pub consistent: usize,
}

/// Shares of a [`Tally`] with 95% intervals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TallySummary {
    pub judged: usize,
    pub win: Interval,
    pub tie: Interval,
    pub loss: Interval,
    /// Win + tie/2: at least 0.45 is the staircase's quality target against layered.
    pub score: Interval,
    /// Share of judged pairs whose two orders agreed. Wins and losses come only from
    /// these, so at a low share `score` is mostly position-bias ties and says little.
    pub consistent: Interval,
    /// Win + tie/2 over the consistent pairs alone (ties there are two agreed ties).
    pub consistent_score: Interval,
}

impl Tally {
    pub fn judged(&self) -> usize {
        self.wins + self.ties + self.losses
    }

    pub fn summary(&self) -> TallySummary {
        let n = self.judged();
        let scores = win_tie_loss_scores(self.wins, self.ties, self.losses);
        // Under MT-Bench's rule every win and loss is consistent; the rest of the
        // consistent pairs are agreed ties.
        let agreed_ties = self.consistent.saturating_sub(self.wins + self.losses);
        let consistent_scores = win_tie_loss_scores(self.wins, agreed_ties, self.losses);
        TallySummary {
            judged: n,
            win: wilson(self.wins, n, Z_95),
            tie: wilson(self.ties, n, Z_95),
            loss: wilson(self.losses, n, Z_95),
            score: bootstrap_mean(&scores),
            consistent: wilson(self.consistent, n, Z_95),
            consistent_score: bootstrap_mean(&consistent_scores),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_matches_textbook_values() {
        // 8 of 10 at 95%: (0.4902, 0.9433), e.g. Newcombe (1998) method 3.
        let i = wilson(8, 10, Z_95);
        assert!(
            close(i.low, 0.4902, 1e-4) && close(i.high, 0.9433, 1e-4),
            "{i:?}"
        );
        // 0 of 10: lower bound 0, upper z^2 / (n + z^2).
        let i = wilson(0, 10, Z_95);
        assert_eq!(i.low, 0.0);
        assert!(
            close(i.high, Z_95 * Z_95 / (10.0 + Z_95 * Z_95), 1e-12),
            "{i:?}"
        );
        // All successes mirror no successes.
        let j = wilson(10, 10, Z_95);
        assert!(close(j.low, 1.0 - i.high, 1e-12) && close(j.high, 1.0, 1e-12));
        // An empty tally says nothing.
        assert_eq!(wilson(0, 0, Z_95).high, 1.0);
    }

    #[test]
    fn wilson_agrees_with_the_normal_interval_for_large_n() {
        let (k, n) = (6000, 10_000);
        let i = wilson(k, n, Z_95);
        let p = 0.6;
        let half = Z_95 * (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            close(i.low, p - half, 2e-4) && close(i.high, p + half, 2e-4),
            "{i:?}"
        );
    }

    #[test]
    fn bootstrap_of_win_loss_data_matches_the_closed_form() {
        // Synthetic wins and losses, no ties: the score is a binomial share, so its
        // bootstrap interval must match p +- z sqrt(p(1-p)/n).
        let (wins, n) = (240, 400);
        let values: Vec<f64> = (0..n).map(|i| if i < wins { 1.0 } else { 0.0 }).collect();
        let i = bootstrap_mean(&values);
        let p = wins as f64 / n as f64;
        let half = Z_95 * (p * (1.0 - p) / n as f64).sqrt();
        assert!(close(i.value, p, 1e-12));
        assert!(
            close(i.low, p - half, 0.01) && close(i.high, p + half, 0.01),
            "{i:?} vs +-{half}"
        );
    }

    #[test]
    fn ties_count_half() {
        let tally = Tally {
            wins: 2,
            ties: 4,
            losses: 4,
            ..Tally::default()
        };
        let s = tally.summary();
        assert_eq!(s.judged, 10);
        assert!(close(s.score.value, 0.4, 1e-12));
        assert!(s.score.low < 0.4 && s.score.high > 0.4);
        assert!(close(s.win.value, 0.2, 1e-12));
    }

    #[test]
    fn the_consistent_share_and_score_leave_position_bias_ties_out() {
        // 10 pairs: 2 wins, 1 loss, 1 agreed tie (4 consistent), 6 position-bias ties.
        let tally = Tally {
            wins: 2,
            ties: 7,
            losses: 1,
            consistent: 4,
            ..Tally::default()
        };
        let s = tally.summary();
        assert!(close(s.score.value, 0.55, 1e-12));
        assert!(close(s.consistent.value, 0.4, 1e-12));
        // (2 + 0.5) / 4 over the pairs the judge could decide.
        assert!(close(s.consistent_score.value, 0.625, 1e-12));
        // A judge that never agrees with itself: every pair a tie, nothing to score.
        let blind = Tally {
            ties: 10,
            ..Tally::default()
        }
        .summary();
        assert!(close(blind.score.value, 0.5, 1e-12));
        assert_eq!(blind.consistent.value, 0.0);
        assert_eq!(
            (blind.consistent_score.low, blind.consistent_score.high),
            (0.0, 1.0)
        );
    }
}
