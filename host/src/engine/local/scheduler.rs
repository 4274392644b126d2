//! What the local engine runs each step: the order queued requests are admitted in, when a
//! request waits for another's prefill, and the shape of the step's batch (every decoding
//! sequence's inputs first, then a bounded slice of prefill). Decisions over plain numbers,
//! unit-tested without a model; the engine loop carries them out.
//! This room must not touch llama.cpp, the KV cache or a request's stream.

use crate::engine::Priority;
use crate::token::TokenId;

/// New prefix tokens a queued request must share with a prompt still prefilling before it
/// waits for that prefill instead of repeating it: below this, waiting costs more than it saves.
pub(super) const MIN_SHARED_PREFILL: usize = 16;

/// Times later requests may be admitted past a queued one the KV cache has no room for yet
/// before nothing behind it is admitted: small requests keep flowing past a long one (one
/// `max_tokens` 8192 request must not stall everyone), and the long one still gets the room
/// once this many have overtaken it (the running ones drain, and none take their place).
pub(super) const MAX_OVERTAKES: u32 = 16;

/// A queued item with its arrival order and how often later ones were admitted past it.
struct Entry<T> {
    order: u64,
    overtaken: u32,
    item: T,
}

/// Requests waiting for admission: higher priority first, then arrival order.
pub(super) struct Queue<T> {
    items: Vec<Entry<T>>,
    next_order: u64,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            next_order: 0,
        }
    }
}

impl<T> Queue<T> {
    /// Queues `item` behind everything of its priority or higher; returns its arrival order.
    pub fn push(
        &mut self,
        priority: Priority,
        item: T,
        priority_of: impl Fn(&T) -> Priority,
    ) -> u64 {
        let order = self.next_order;
        self.next_order += 1;
        let at = self
            .items
            .partition_point(|e| priority_of(&e.item) >= priority);
        self.items.insert(
            at,
            Entry {
                order,
                overtaken: 0,
                item,
            },
        );
        order
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn get(&self, at: usize) -> Option<&T> {
        self.items.get(at).map(|e| &e.item)
    }

    /// Takes the item at `at` with its arrival order.
    pub fn remove(&mut self, at: usize) -> (u64, T) {
        let entry = self.items.remove(at);
        (entry.order, entry.item)
    }

    pub fn retain(&mut self, keep: impl Fn(&T) -> bool) {
        self.items.retain(|e| keep(&e.item));
    }
}

/// One pass of admission over the queue, front to back. The engine loop asks the KV cache
/// about the request at [`Admitting::at`] and reports the answer here; this keeps the rule
/// that a request without room lets smaller ones past it, at most [`MAX_OVERTAKES`] times.
#[derive(Default)]
pub(super) struct Admitting {
    /// The queue position being considered.
    pub at: usize,
    /// Positions passed over for lack of room in this pass (all before `at`).
    no_room: Vec<usize>,
}

impl Admitting {
    /// Passes over the request at `at` for a reason other than room (it waits for a
    /// shared prefill).
    pub fn skip(&mut self) {
        self.at += 1;
    }

    /// The KV cache has no room for the request at `at` now. Returns whether later requests
    /// may still be admitted in this pass: not once it has been overtaken often enough.
    pub fn no_room<T>(&mut self, queue: &Queue<T>) -> bool {
        let overtaken = queue.items.get(self.at).map_or(0, |e| e.overtaken);
        if overtaken >= MAX_OVERTAKES {
            return false;
        }
        self.no_room.push(self.at);
        self.at += 1;
        true
    }

    /// Takes the request at `at` for admission, counting it against every request it passes.
    pub fn take<T>(&mut self, queue: &mut Queue<T>) -> (u64, T) {
        for &i in &self.no_room {
            queue.items[i].overtaken += 1;
        }
        queue.remove(self.at)
    }
}

/// Whether a queued prompt should wait for a running prefill instead of being admitted:
/// the longest prefix it shares with a prompt still prefilling (`prefilling`) beats what the
/// cache holds for it by [`MIN_SHARED_PREFILL`] tokens. Requests that begin alike (samples
/// of one prompt, agents given one long document) would otherwise prefill the same prefix
/// side by side; the later one waits, and copies the prefix once that prefill completes.
/// `cached_len` is asked only when a prefill shares enough, so the usual request costs no
/// cache lookup.
pub(super) fn waits_for_shared_prefill<'a>(
    prefilling: impl Iterator<Item = &'a [TokenId]>,
    tokens: &[TokenId],
    cached_len: impl FnOnce(usize) -> usize,
) -> bool {
    let usable = tokens.len().saturating_sub(1);
    let shared = prefilling
        .map(|prompt| {
            prompt
                .iter()
                .zip(&tokens[..usable])
                .take_while(|(a, b)| a == b)
                .count()
        })
        .max()
        .unwrap_or(0);
    shared >= MIN_SHARED_PREFILL && shared >= cached_len(usable) + MIN_SHARED_PREFILL
}

/// What one running sequence asks of a step.
#[derive(Clone, Copy, Debug)]
pub(super) struct Demand {
    pub priority: Priority,
    /// Admission order: ties of priority go to the earlier request.
    pub order: u64,
    /// Prompt tokens not yet prefilled; 0 once the sequence decodes.
    pub prefill_left: usize,
    /// Inputs of a decode step (its last token plus drafts); ignored while prefilling.
    pub decode_inputs: usize,
}

/// One sequence's share of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Planned {
    /// Index into the demands.
    pub index: usize,
    /// Batch index of its first input.
    pub first: i32,
    pub inputs: usize,
    pub prefill: bool,
}

/// Whether a background-class request may be admitted now: only while no foreground
/// request runs or waits, so it never takes a slot or KV room a foreground one could use.
pub(super) fn admits_background(foreground_running: bool, foreground_queued: bool) -> bool {
    !foreground_running && !foreground_queued
}

/// The step's batch, in priority order: the decode inputs of every decoding sequence that
/// fits, then prefill. While others decode, prefill takes at most `prefill_chunk` tokens per
/// waiting prompt, so their token rate stays steady while one prompt is absorbed, and a
/// burst of prompts is absorbed in a few wide steps instead of trickling in one chunk a
/// step behind every decode; a prompt that outranks every decoding sequence
/// (the critical path) takes the whole rest of the batch instead. Background sequences
/// ([`Priority::BACKGROUND`]) are left out of any step that has foreground work: paused,
/// their KV kept, they go on once the foreground is done.
pub(super) fn plan_step(
    demands: &[Demand],
    batch_tokens: usize,
    prefill_chunk: usize,
) -> Vec<Planned> {
    let foreground = demands.iter().any(|d| !d.priority.is_background());
    let mut order: Vec<usize> = (0..demands.len())
        .filter(|&i| !(foreground && demands[i].priority.is_background()))
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(demands[i].priority), demands[i].order));
    let mut budget = batch_tokens;
    let mut first = 0;
    let mut plan = Vec::with_capacity(order.len());
    for &index in &order {
        let demand = &demands[index];
        if demand.prefill_left > 0 || demand.decode_inputs > budget {
            continue;
        }
        plan.push(Planned {
            index,
            first,
            inputs: demand.decode_inputs,
            prefill: false,
        });
        budget -= demand.decode_inputs;
        first += demand.decode_inputs as i32;
    }
    let top_decoding = plan.iter().map(|p| demands[p.index].priority).max();
    let outranks = |demand: &Demand| top_decoding.is_none_or(|top| demand.priority > top);
    // A chunk per waiting prompt: sixteen requests arriving together must not trickle in
    // one chunk a step behind the first few decoders (every decode step then carries a
    // chunk, and the last prompt waits for all the others).
    let waiting = order
        .iter()
        .filter(|&&i| demands[i].prefill_left > 0 && !outranks(&demands[i]))
        .count();
    let mut chunk_left = prefill_chunk.saturating_mul(waiting);
    for &index in &order {
        let demand = &demands[index];
        if demand.prefill_left == 0 {
            continue;
        }
        let outranks = outranks(demand);
        let allowance = if outranks {
            budget
        } else {
            budget.min(chunk_left)
        };
        let take = demand.prefill_left.min(allowance);
        if take == 0 {
            continue;
        }
        plan.push(Planned {
            index,
            first,
            inputs: take,
            prefill: true,
        });
        budget -= take;
        first += take as i32;
        if !outranks {
            chunk_left -= take;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoding(priority: i32, order: u64, inputs: usize) -> Demand {
        Demand {
            priority: Priority(priority),
            order,
            prefill_left: 0,
            decode_inputs: inputs,
        }
    }

    fn prefilling(priority: i32, order: u64, left: usize) -> Demand {
        Demand {
            priority: Priority(priority),
            order,
            prefill_left: left,
            decode_inputs: 1,
        }
    }

    #[test]
    fn the_queue_serves_priority_then_arrival() {
        let mut queue = Queue::default();
        for (name, priority) in [("a", 0), ("b", 5), ("c", 0), ("d", 5)] {
            queue.push(Priority(priority), (name, Priority(priority)), |item| {
                item.1
            });
        }
        let names: Vec<&str> = (0..queue.len()).map(|i| queue.get(i).unwrap().0).collect();
        assert_eq!(names, ["b", "d", "a", "c"]);
        assert_eq!(queue.remove(0).0, 1, "arrival order is kept with the item");
    }

    /// The engine loop's admission pass over a queue of `(prompt, max_tokens)` requests, on
    /// the fake KV cache with `reserved` cells held by running sequences; returns what was
    /// admitted, in order.
    fn admit_pass(
        queue: &mut Queue<(usize, usize)>,
        kv: &mut super::super::kv::KvManager,
        ops: &mut super::super::kv::tests::FakeKv,
        mut reserved: usize,
    ) -> Vec<(usize, usize)> {
        let mut admitted = Vec::new();
        let mut pass = Admitting::default();
        while let Some(&(prompt, max_tokens)) = queue.get(pass.at) {
            let tokens = super::super::kv::tests::tokens(prompt as i32);
            match kv.admit(
                ops,
                &super::super::kv::tests::ns(),
                &tokens,
                max_tokens,
                reserved,
            ) {
                Some(admission) => {
                    reserved += admission.reserved_cells;
                    admitted.push(pass.take(queue).1);
                }
                None if pass.no_room(queue) => {}
                None => break,
            }
        }
        admitted
    }

    #[test]
    fn a_request_too_big_for_the_room_now_lets_smaller_ones_past_a_bounded_number_of_times() {
        use super::super::kv::{KvManager, tests::FakeKv};
        let (mut kv, mut ops) = (KvManager::new(64, None, 1000), FakeKv::default());
        let mut queue = Queue::default();
        let big = (10, 10_000);
        queue.push(Priority(0), big, |_| Priority(0));
        queue.push(Priority(0), (10, 20), |_| Priority(0));
        // 500 cells are held by running sequences: the big one (1000 cells) waits, the
        // small one behind it is admitted first.
        assert_eq!(admit_pass(&mut queue, &mut kv, &mut ops, 500), [(10, 20)]);
        assert_eq!(queue.get(0), Some(&big));
        // Smaller ones keep passing it, MAX_OVERTAKES times in all (one more was above)...
        for _ in 1..MAX_OVERTAKES {
            queue.push(Priority(0), (10, 20), |_| Priority(0));
            assert_eq!(admit_pass(&mut queue, &mut kv, &mut ops, 500).len(), 1);
        }
        // ...then it holds the line until the running ones have freed the room.
        queue.push(Priority(0), (10, 20), |_| Priority(0));
        assert!(admit_pass(&mut queue, &mut kv, &mut ops, 500).is_empty());
        assert_eq!(queue.len(), 2);
        let mut kv = KvManager::new(64, None, 1000);
        assert_eq!(
            admit_pass(&mut queue, &mut kv, &mut ops, 0),
            [big],
            "with the room free it goes first; the small one then waits for its room"
        );
    }

    #[test]
    fn decodes_come_first_and_prefill_is_chunked_beside_them() {
        let demands = [prefilling(0, 0, 500), decoding(0, 1, 3), decoding(0, 2, 1)];
        let plan = plan_step(&demands, 512, 64);
        assert_eq!(
            plan,
            [
                Planned {
                    index: 1,
                    first: 0,
                    inputs: 3,
                    prefill: false
                },
                Planned {
                    index: 2,
                    first: 3,
                    inputs: 1,
                    prefill: false
                },
                Planned {
                    index: 0,
                    first: 4,
                    inputs: 64,
                    prefill: true
                },
            ]
        );
    }

    /// Sixteen requests at once: after the first prompts, the rest must not come in one
    /// chunk a step (each step of the first decoders would carry a chunk for ~50 steps).
    #[test]
    fn a_burst_of_prompts_gets_a_chunk_each_beside_the_decodes() {
        let mut demands = vec![decoding(0, 0, 1), decoding(0, 1, 1)];
        demands.extend((2..16).map(|order| prefilling(0, order, 200)));
        let plan = plan_step(&demands, 512, 64);
        let prefill: usize = plan.iter().filter(|p| p.prefill).map(|p| p.inputs).sum();
        assert_eq!(prefill, 510, "the batch is filled: {plan:?}");
        assert_eq!(plan.iter().filter(|p| p.prefill).count(), 3);
        // Two prompts waiting beside a decode: a chunk each, no more.
        let demands = [
            decoding(0, 0, 1),
            prefilling(0, 1, 500),
            prefilling(0, 2, 500),
        ];
        let plan = plan_step(&demands, 512, 64);
        let prefill: usize = plan.iter().filter(|p| p.prefill).map(|p| p.inputs).sum();
        assert_eq!(prefill, 128);
    }

    #[test]
    fn a_prompt_that_outranks_every_decode_takes_the_rest_of_the_batch() {
        let demands = [
            decoding(0, 0, 1),
            prefilling(10, 1, 1000),
            prefilling(0, 2, 100),
        ];
        let plan = plan_step(&demands, 512, 64);
        assert_eq!(
            plan[1],
            Planned {
                index: 1,
                first: 1,
                inputs: 511,
                prefill: true
            }
        );
        assert_eq!(plan.len(), 2, "nothing is left for the low-priority prompt");
        // Alone, a prompt takes the whole batch.
        let plan = plan_step(&[prefilling(0, 0, 1000)], 512, 64);
        assert_eq!(plan[0].inputs, 512);
    }

    #[test]
    fn a_decode_that_does_not_fit_waits_and_higher_priority_goes_first() {
        let demands = [decoding(0, 0, 6), decoding(3, 1, 4)];
        let plan = plan_step(&demands, 8, 64);
        assert_eq!(
            plan,
            [Planned {
                index: 1,
                first: 0,
                inputs: 4,
                prefill: false
            }]
        );
    }

    #[test]
    fn background_sequences_are_paused_while_any_foreground_one_runs() {
        let background = Priority::BACKGROUND.0;
        let demands = [
            decoding(background, 0, 1),
            prefilling(0, 1, 40),
            prefilling(background, 2, 40),
        ];
        let plan = plan_step(&demands, 512, 64);
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert_eq!(plan[0].index, 1);
        // A decoding foreground sequence pauses them too.
        let plan = plan_step(&[decoding(background, 0, 1), decoding(0, 1, 1)], 512, 64);
        assert_eq!(plan.iter().map(|p| p.index).collect::<Vec<_>>(), [1]);
        // Alone, background work runs as any other.
        let plan = plan_step(
            &[decoding(background, 0, 1), prefilling(background, 1, 40)],
            512,
            64,
        );
        assert_eq!(plan.len(), 2);
        assert!(admits_background(false, false));
        assert!(!admits_background(true, false) && !admits_background(false, true));
    }

    #[test]
    fn a_request_waits_only_for_a_prefill_that_shares_more_than_the_cache_holds() {
        let document: Vec<TokenId> = (0..64).map(TokenId).collect();
        let mut request = document.clone();
        request.extend([TokenId(900), TokenId(901)]);
        let running = [document.as_slice()];
        assert!(waits_for_shared_prefill(
            running.into_iter(),
            &request,
            |_| 0
        ));
        assert!(!waits_for_shared_prefill(
            running.into_iter(),
            &request,
            |_| 60
        ));
        let short = [&document[..MIN_SHARED_PREFILL - 1]];
        let mut asked = false;
        assert!(!waits_for_shared_prefill(
            short.into_iter(),
            &request,
            |_| {
                asked = true;
                0
            }
        ));
        assert!(
            !asked,
            "the cache is not asked when no prefill shares enough"
        );
    }
}
