//! How many tokens to draft, if any: speculation pays only when the tokens it is expected to
//! win are worth more than the extra width of the forward pass.
//!
//! On this CPU a forward over k tokens costs far more than one step (Q4_1, 200-token context,
//! 2 threads: k = 4/8/16 cost 3.0/5.3/9.5 steps), so a draft is a bet. With a per-token
//! acceptance probability `a`, a draft of k tokens yields `(1 - a^(k+1)) / (1 - a)` tokens
//! (accepted prefix plus the model's own token). In a step that already holds `b` tokens the
//! draft turns `b` tokens per `cost(b)` into `b - 1 + yield` per `cost(b + k)`; we draft the k
//! that maximises that ratio, and nothing unless it beats plain decoding by a margin. `a` is
//! estimated per match-length bucket from recent outcomes, starting from a cautious prior.
//! Evidence ages only as new evidence arrives (a verified draft, or a shadow check of a
//! declined one on a plain step), never while speculation is off: a sequence that stopped
//! drafting stays stopped until the free shadow checks show the text being copied again,
//! instead of drifting back to an optimistic prior and paying for probes. On top, a ledger of
//! what recent drafts actually won against plain decoding (on the cost curve) switches
//! drafting off for a cooldown that doubles with every loss in a row, so acceptance that is
//! worse than its estimate (correlated misses, a sampler that penalises repeats) cannot keep
//! a workload below plain speed. This file only decides; it does no I/O and reads no clock.

use serde::{Deserialize, Serialize};

/// Cost of a forward pass over n tokens (logits at every position), in single-step units.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// `(tokens, cost)` points, increasing in tokens, starting at `(1, 1.0)`; linear in
    /// between and extrapolated with the last slope.
    pub points: Vec<(u32, f64)>,
}

impl Default for CostModel {
    /// Measured for the default model (SmolLM2-135M Q4_1) on 2 Zen3 cores, 200-token context.
    fn default() -> Self {
        Self {
            points: vec![(1, 1.0), (4, 3.0), (8, 5.3), (16, 9.5)],
        }
    }
}

/// llama.cpp's `LLAMA_FTYPE_MOSTLY_Q4_0`, `_Q4_1` and `_Q8_0` (GGUF `general.file_type`).
const FILE_TYPE_Q4_0: u32 = 2;
const FILE_TYPE_Q4_1: u32 = 3;
const FILE_TYPE_Q8_0: u32 = 7;

impl CostModel {
    /// The curve measured for a quantization (GGUF `general.file_type`), for the default
    /// model on 2 Zen3 cores; `None` for types not measured. Verification is far cheaper on
    /// Q4_0 and Q8_0 than on Q4_1, so the same acceptance pays for longer drafts there.
    pub fn for_file_type(file_type: u32) -> Option<Self> {
        let points = match file_type {
            FILE_TYPE_Q4_0 => vec![(1, 1.0), (4, 2.3), (8, 4.0), (16, 6.3)],
            FILE_TYPE_Q4_1 => return Some(Self::default()),
            FILE_TYPE_Q8_0 => vec![(1, 1.0), (4, 2.6), (8, 3.3), (16, 4.9)],
            _ => return None,
        };
        Some(Self { points })
    }

    /// A model from measured forward times in seconds (`(tokens, seconds)`, including n = 1).
    /// `None` without a positive single-token time.
    pub fn from_measurements(measured: &[(u32, f64)]) -> Option<Self> {
        let one = measured.iter().find(|(n, _)| *n == 1)?.1;
        if !(one.is_finite() && one > 0.0) {
            return None;
        }
        let mut points: Vec<(u32, f64)> = measured.iter().map(|&(n, s)| (n, s / one)).collect();
        points.sort_by_key(|p| p.0);
        points.dedup_by_key(|p| p.0);
        Some(Self { points })
    }

    /// Cost of a forward over `tokens` tokens relative to one single-token step.
    pub fn cost(&self, tokens: usize) -> f64 {
        let n = tokens as f64;
        let points = &self.points;
        match points.len() {
            0 => n,
            1 => points[0].1 * n / f64::from(points[0].0.max(1)),
            _ => {
                let i = points
                    .windows(2)
                    .position(|w| n <= f64::from(w[1].0))
                    .unwrap_or(points.len() - 2);
                let (x0, y0) = (f64::from(points[i].0), points[i].1);
                let (x1, y1) = (f64::from(points[i + 1].0), points[i + 1].1);
                let slope = (y1 - y0) / (x1 - x0).max(1.0);
                (y0 + slope * (n - x0)).max(0.0)
            }
        }
    }

    /// Expected tokens per unit cost with every draft token accepted, at the best k up to
    /// `max_k`: the ceiling speculation can reach on this hardware.
    pub fn ceiling(&self, max_k: usize) -> (usize, f64) {
        (1..=max_k)
            .map(|k| (k, (k + 1) as f64 / self.cost(k + 1)))
            .fold((0, 1.0), |best, c| if c.1 > best.1 { c } else { best })
    }
}

/// Knobs of the draft-length controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControllerConfig {
    /// Longest draft ever proposed. On Q4_1 each token past ~8 costs about half a step, so
    /// the controller rarely goes this far; on Q8_0 a 32-token forward costs ~9 steps and a
    /// re-emitted block of code pays for it.
    pub max_draft: usize,
    /// Shortest match worth drafting from: one shared token predicts little.
    pub min_match: u32,
    /// Required gain over plain decoding (tokens per unit cost) before drafting, so noise in
    /// the estimates does not make speculation slightly slower than no speculation.
    pub min_gain: f64,
    /// Weight (in observed tokens) of the prior acceptance, so a couple of outcomes do not
    /// swing the estimate to 0 or 1.
    pub prior_weight: f64,
    /// Per-observation decay of the evidence towards the prior (half-life ~14 drafts or
    /// shadow checks; nothing ages while nothing is observed):
    /// agent text alternates between copying and writing, and the estimate must follow.
    pub decay: f64,
    /// Plain decisions a sequence waits after its drafts lost against plain decoding, before
    /// it may draft again; doubled for every further loss in a row.
    pub cooldown: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            max_draft: 32,
            min_match: 2,
            min_gain: 1.05,
            prior_weight: 2.0,
            decay: 0.95,
            cooldown: 16,
        }
    }
}

/// Match-length buckets: a long match predicts its continuation far better than a short one.
const BUCKET_EDGES: [u32; 3] = [4, 8, 16];

/// Prior per-token acceptance for each bucket: for short matches below what pays on the
/// measured cost curve, so novel text does not draft on chance n-gram repeats (the free
/// shadow evidence of plain steps lifts the estimate once the text is being copied); for
/// long matches (copied phrases, re-emitted code, loops) high, as measured on agent text.
const PRIOR_ACCEPTANCE: [f64; 4] = [0.4, 0.6, 0.85, 0.95];

/// How much more the prior weighs in each bucket than `prior_weight`: a long match is
/// strong evidence of its own (novel text almost never repeats 8 tokens), so misses of short
/// matches elsewhere in the sequence must not talk it down quickly.
const PRIOR_STRENGTH: [f64; 4] = [1.0, 1.0, 2.0, 4.0];

fn bucket(match_len: u32) -> usize {
    BUCKET_EDGES.iter().take_while(|&&e| match_len >= e).count()
}

/// Weight of the earlier drafts in the ledger of what drafts won, per verified draft: the
/// last ~5 drafts count, so one lucky copy does not hide a run of losses.
const LEDGER_DECAY: f64 = 0.8;

/// Plain-decoding tokens' worth of time the ledger must have seen spent on drafts before it
/// judges them (about one failed 4-token draft on the default curve), so one short unlucky
/// draft does not stop a sequence.
const LEDGER_MIN_SPENT: f64 = 3.0;

/// Ratio of tokens won to plain-decoding tokens' worth spent above which a sequence that
/// lost before counts as paying again (its next loss restarts the cooldown at its base).
const LEDGER_RECOVERED: f64 = 1.1;

/// Cap on the doublings of the cooldown (16 << 6 = 1024 decisions: a request that keeps
/// losing drafts decodes plainly for most of its length).
const MAX_COOLDOWN_DOUBLINGS: u32 = 6;

/// Decayed evidence of per-token acceptance for matches of one length bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Evidence {
    accepted: f64,
    /// Drafts that ended in a rejection (each is one failed Bernoulli trial).
    rejected: f64,
}

/// Chooses draft lengths for one sequence from match length, recent acceptance and load.
#[derive(Clone, Debug)]
pub struct DraftController {
    config: ControllerConfig,
    cost: CostModel,
    /// Per match-length bucket: short matches fail often even while long ones copy well.
    evidence: [Evidence; 4],
    /// Decayed sums over recent drafts of this sequence's tokens they emitted and of what
    /// plain decoding would have emitted in the time they took (on the cost curve).
    ledger_won: f64,
    ledger_spent: f64,
    /// Losses in a row (drafts emitting less than plain decoding would); each doubles the
    /// next cooldown.
    losses: u32,
    /// Decisions left before drafting may resume.
    cooling: usize,
    /// Width of the step the last draft was chosen for (this sequence's token included).
    last_width: usize,
    /// Decisions that chose a draft, and losses that started a cooldown (for tests and traces).
    drafts_chosen: u64,
    cooldowns: u64,
}

impl DraftController {
    pub fn new(config: ControllerConfig, cost: CostModel) -> Self {
        Self {
            config,
            cost,
            evidence: [Evidence::default(); 4],
            ledger_won: 0.0,
            ledger_spent: 0.0,
            losses: 0,
            cooling: 0,
            last_width: 1,
            drafts_chosen: 0,
            cooldowns: 0,
        }
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Estimated probability that the next draft token of a match this long is accepted.
    pub fn acceptance(&self, match_len: u32) -> f64 {
        let b = bucket(match_len);
        let e = self.evidence[b];
        let w = self.config.prior_weight * PRIOR_STRENGTH[b];
        (e.accepted + w * PRIOR_ACCEPTANCE[b]) / (e.accepted + e.rejected + w)
    }

    /// The draft length to use for a match of `match_len` with `available` tokens on offer,
    /// in a step that already holds `batch_tokens` tokens (this sequence's own included).
    /// 0 means decode plainly.
    pub fn choose(&mut self, match_len: u32, available: usize, batch_tokens: usize) -> usize {
        if self.cooling > 0 {
            self.cooling -= 1;
            return 0;
        }
        if match_len < self.config.min_match {
            return 0;
        }
        let a = self.acceptance(match_len).clamp(0.0, 0.999);
        let b = batch_tokens.max(1);
        let plain = b as f64 / self.cost.cost(b);
        let mut best = (0, plain * self.config.min_gain);
        for k in 1..=available.min(self.config.max_draft) {
            let expected = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
            let rate = (b as f64 - 1.0 + expected) / self.cost.cost(b + k);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        if best.0 > 0 {
            self.last_width = b;
            self.drafts_chosen += 1;
        }
        best.0
    }

    /// Whether drafting is switched off by recent losses.
    pub fn cooling_down(&self) -> bool {
        self.cooling > 0
    }

    /// Decisions that chose to draft, over this controller's life.
    pub fn drafts_chosen(&self) -> u64 {
        self.drafts_chosen
    }

    /// Cooldowns started because drafts lost against plain decoding.
    pub fn cooldowns(&self) -> u64 {
        self.cooldowns
    }

    /// Adds the outcome of one draft (or shadow check), first ageing the old evidence by
    /// one `decay`. Only new evidence ages it: while nothing is checked, it stays put.
    fn observe(&mut self, match_len: u32, accepted: usize, rejected: bool) {
        for e in &mut self.evidence {
            e.accepted *= self.config.decay;
            e.rejected *= self.config.decay;
        }
        let e = &mut self.evidence[bucket(match_len)];
        e.accepted += accepted as f64;
        if rejected {
            e.rejected += 1.0;
        }
    }

    /// What plain decoding would have emitted in the time a draft of `drafted` tokens took:
    /// this sequence's own token, plus the draft's extra width `cost(b + k) - cost(b)` at
    /// the plain rate `b / cost(b)` of a step `b` tokens wide (the other sequences' tokens
    /// are emitted either way).
    fn plain_equivalent(&self, drafted: usize) -> f64 {
        let b = self.last_width.max(1);
        let plain_rate = b as f64 / self.cost.cost(b).max(f64::MIN_POSITIVE);
        1.0 + (self.cost.cost(b + drafted) - self.cost.cost(b)).max(0.0) * plain_rate
    }

    /// Records the outcome of verifying a draft of `drafted` tokens from a match of
    /// `match_len`, of which the first `accepted` were accepted.
    /// Recent drafts that emitted fewer tokens than plain decoding would have in their time
    /// start a cooldown.
    pub fn record(&mut self, match_len: u32, drafted: usize, accepted: usize) {
        self.observe(match_len, accepted, accepted < drafted);
        self.ledger_won = self.ledger_won * LEDGER_DECAY + (accepted + 1) as f64;
        self.ledger_spent = self.ledger_spent * LEDGER_DECAY + self.plain_equivalent(drafted);
        if self.ledger_spent >= LEDGER_MIN_SPENT && self.ledger_won < self.ledger_spent {
            let doublings = self.losses.min(MAX_COOLDOWN_DOUBLINGS);
            self.cooling = self.config.cooldown << doublings;
            self.losses += 1;
            self.cooldowns += 1;
            self.ledger_won = 0.0;
            self.ledger_spent = 0.0;
            tracing::trace!(
                cooling = self.cooling,
                losses = self.losses,
                "drafts lost against plain decoding; drafting off"
            );
        } else if self.ledger_won > self.ledger_spent * LEDGER_RECOVERED {
            self.losses = 0;
        }
    }

    /// Records, for a step decoded without a draft, whether the next token of a declined
    /// draft would have been accepted (one shadow draft is followed token by token until it
    /// misses, so hits and misses count as a real draft's would). Free evidence: a sequence
    /// that entered a copying stretch starts drafting without paying for a probe, and one on
    /// novel text stays off.
    pub fn record_shadow(&mut self, match_len: u32, hit: bool) {
        self.observe(match_len, usize::from(hit), !hit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_interpolates_measured_points() {
        let c = CostModel::default();
        assert_eq!(c.cost(1), 1.0);
        assert!((c.cost(6) - 4.15).abs() < 1e-9);
        assert!((c.cost(24) - 13.7).abs() < 1e-9);
        let (k, ceiling) = c.ceiling(16);
        assert!(
            ceiling < 2.0,
            "Q4_1 cannot reach 2x: best k={k} gives {ceiling}"
        );
    }

    #[test]
    fn cheaper_verification_pays_for_longer_drafts() {
        let q8 = CostModel::for_file_type(FILE_TYPE_Q8_0).unwrap();
        assert!(q8.ceiling(16).1 > CostModel::default().ceiling(16).1);
        assert_eq!(
            CostModel::for_file_type(FILE_TYPE_Q4_1),
            Some(CostModel::default())
        );
        assert!(CostModel::for_file_type(0).is_none());
        let mut on_q41 = DraftController::new(ControllerConfig::default(), CostModel::default());
        let mut on_q8 = DraftController::new(ControllerConfig::default(), q8);
        assert!(on_q8.choose(32, 32, 1) > on_q41.choose(32, 32, 1));
    }

    #[test]
    fn drafts_on_reliable_matches_and_stops_on_unreliable_ones() {
        let mut c = DraftController::new(ControllerConfig::default(), CostModel::default());
        assert!(c.choose(32, 16, 1) > 0, "a long match starts out drafting");
        assert_eq!(c.choose(1, 16, 1), 0, "a one-token match never drafts");
        for _ in 0..20 {
            c.record(32, 8, 0);
        }
        assert_eq!(
            c.choose(32, 16, 1),
            0,
            "repeated rejections switch drafting off"
        );
        for _ in 0..2000 {
            c.choose(0, 0, 1);
        }
        assert_eq!(
            c.choose(32, 16, 1),
            0,
            "evidence does not age without new evidence, so drafting stays off"
        );
        for _ in 0..40 {
            c.record_shadow(32, true);
        }
        assert!(
            c.choose(32, 16, 1) > 0,
            "free shadow hits switch drafting back on"
        );
    }

    /// A sequence whose drafts stop being accepted (a sampler penalising repeats, text that
    /// paraphrases what it matches) after a long run of full acceptance, which keeps the
    /// estimate high: the ledger stops it after a few losing drafts, and the probes that
    /// follow come ever more rarely.
    #[test]
    fn collapsed_acceptance_backs_off_to_no_drafting() {
        let mut c = DraftController::new(ControllerConfig::default(), CostModel::default());
        for _ in 0..40 {
            let k = c.choose(32, 16, 1);
            assert!(k > 0, "a copying sequence drafts");
            c.record(32, k, k);
        }
        let before = c.drafts_chosen();
        let mut late_drafts = 0;
        for decision in 0..1000 {
            let k = c.choose(32, 16, 1);
            if k > 0 {
                c.record(32, k, 0);
                late_drafts += usize::from(decision >= 500);
            }
        }
        let after_collapse = c.drafts_chosen() - before;
        assert!(
            after_collapse <= 10,
            "{after_collapse} drafts after the collapse"
        );
        // Each losing probe doubles the wait for the next one.
        assert!(
            late_drafts <= 1,
            "{late_drafts} drafts in the last 500 decisions"
        );
    }

    /// Drafts that lose against plain decoding even though the acceptance estimate says they
    /// pay (misses correlated with match length): the ledger stops drafting for a cooldown
    /// that doubles with every further loss, so the losing probes thin out.
    #[test]
    fn losing_drafts_start_a_doubling_cooldown() {
        let mut c = DraftController::new(ControllerConfig::default(), CostModel::default());
        let mut drafts_at = Vec::new();
        for decision in 0..2000 {
            let k = c.choose(32, 16, 1);
            if k > 0 {
                drafts_at.push(decision);
                // One token accepted and, as shadow checks between drafts keep finding,
                // the estimate stays high: on its own it would keep drafting.
                c.record(32, k, 1);
                for _ in 0..4 {
                    c.record_shadow(32, true);
                }
            }
        }
        assert!(c.cooldowns() >= 4, "{} cooldowns", c.cooldowns());
        let gaps: Vec<usize> = drafts_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().any(|&g| g >= 256),
            "later probes come ever more rarely: {gaps:?}"
        );
        assert!(drafts_at.len() < 16, "{} drafts", drafts_at.len());
    }

    #[test]
    fn winning_drafts_never_cool_down() {
        let mut c = DraftController::new(ControllerConfig::default(), CostModel::default());
        for _ in 0..500 {
            let k = c.choose(32, 16, 1);
            assert!(k > 0);
            c.record(32, k, k);
        }
        assert_eq!(c.cooldowns(), 0);
        assert!(!c.cooling_down());
    }

    #[test]
    fn busy_engine_drafts_less() {
        let mut c = DraftController::new(ControllerConfig::default(), CostModel::default());
        for _ in 0..20 {
            c.record(32, 4, 3);
            c.record(32, 4, 4);
        }
        let alone = c.choose(32, 16, 1);
        // A step already holding a 64-token prefill chunk: extra width is no longer cheap
        // relative to what the step produces.
        let busy = c.choose(32, 16, 64);
        assert!(alone > 0);
        assert!(busy < alone, "alone {alone}, busy {busy}");
    }
}
