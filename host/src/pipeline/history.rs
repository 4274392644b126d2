//! Conversation memory off the critical path: a node whose conversation is over its
//! `history_tokens` budget answers with the history as it is (or with a compressed form
//! that is ready), while its `history_compressor` plugin shortens the history on a blocking
//! thread; the next turn, whose conversation begins with this one, uses the compressed form
//! once it is ready. Compressions are cached by a hash of the messages they replace (and the
//! plugin and budget), so every node of a pipeline, and every later turn, shares one.
//!
//! Compression is block-wise, so the prompt's beginning stays the same from turn to turn and
//! the engine's prefix cache keeps serving it: a history over budget is compressed to half
//! the budget ([`COMPACT_SHARE`]), and later turns append their messages raw behind that
//! compressed block, unchanged, until the whole is over budget again; only then is the block
//! (with the raw tail) compressed anew. That one change of the prompt's beginning is paid in
//! the background too: before a compression is offered to a turn, the node that started it
//! prefills its prompt into the engine's prefix cache (a [`Warm`]). Compressors and warm-ups
//! run as background-class engine work (`CompressorPolicy::run_in_background`,
//! `Priority::BACKGROUND`), which a local engine steps only while no foreground request
//! needs it, and are billed to the run that started them (`CompressorPolicy::bill_to`): its
//! tenant's namespace, and its usage (or, once the run has ended, its tenant's quota).
//!
//! Compressions run on a few threads of their own ([`DEFAULT_COMPRESSION_THREADS`]; more
//! wait in a queue), never one thread per conversation, and the log of events keeps the
//! latest [`MAX_LOG_EVENTS`].
//!
//! Nothing here is awaited by a run: `prepare` only looks up and queues. Every step gets a
//! sequence number from one counter, so tests check what happened before what without
//! reading a clock. This room must not touch wasmtime or an engine.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::engine::{CacheNamespace, ChatMessage, Role};
use crate::policy::{ModelAccount, PolicyProvider};

/// Compressions kept; beyond it the oldest finished ones go (a server's sessions come and
/// go, and a compressed history is worth one later turn).
const MAX_ENTRIES: usize = 256;

/// The share of the budget a compression aims at (1/N). The rest is room for raw turns to
/// be appended behind the compressed block before the next compression: each compression
/// changes the prompt's beginning once (one prefix-cache miss), and the turns in between
/// keep it byte-identical.
pub const COMPACT_SHARE: u32 = 2;

/// Compressions running at once when the operator does not say (`[sandbox]
/// compression_threads`): each may call a model for a whole generation, as background work
/// the engine steps only when idle, so more at once only queue inside the engine; two keep
/// one slow compressor from holding up every other conversation's.
pub const DEFAULT_COMPRESSION_THREADS: usize = 2;

/// Events the memory keeps for reports and tests; older ones go (a server runs for weeks).
pub const MAX_LOG_EVENTS: usize = 4096;

/// A queued compression.
type Job = Box<dyn FnOnce() + Send>;

/// The compressions waiting, and the threads running them (at most `max`; a thread ends
/// when the queue is empty, so an idle memory holds none).
struct Workers {
    queue: VecDeque<Job>,
    threads: usize,
    max: usize,
}

/// What identifies one compression: whose it is (a server's tenant: no tenant uses, or
/// learns of, another's compression), the plugin, the budget, and the hash of the messages
/// it replaces.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    namespace: CacheNamespace,
    plugin: String,
    budget: u32,
    hash: [u8; 32],
}

enum State {
    Running,
    Ready(Vec<ChatMessage>),
    Failed,
}

struct Entry {
    state: State,
    /// The entry's age, for eviction.
    seq: u64,
}

/// One thing the memory did, with its place in the order of everything it did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HistoryEvent {
    pub seq: u64,
    /// Whose compression it is (a run reports only its own namespace's).
    #[serde(skip)]
    pub namespace: CacheNamespace,
    /// When it happened (a run's timeline places it on its compression lane).
    #[serde(skip)]
    pub at: Instant,
    pub plugin: String,
    /// Messages of the history the compression replaces.
    pub messages: usize,
    pub kind: HistoryEventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum HistoryEventKind {
    /// A compression of `tokens` tokens of history began in the background.
    Started { tokens: u32 },
    /// It is ready, `tokens` long.
    Finished { tokens: u32 },
    /// It failed (or timed out); runs keep answering with the full history.
    Failed { reason: String },
}

/// What a node answers with, and what the memory did for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HistoryUse {
    /// Messages of the conversation a ready compression replaced (0: the full history).
    pub replaced_messages: usize,
    /// Tokens of the conversation as it came, and as the node got it.
    pub tokens_full: u32,
    pub tokens_used: u32,
    /// The sequence number of the compression used, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_seq: Option<u64>,
    /// A compression of this turn's history began now (for the next turn).
    pub started: bool,
    /// When the node's first token went out, in the memory's order of events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_token_seq: Option<u64>,
}

/// Counts tokens of a text as the node's model does.
pub type TokenCount = Arc<dyn Fn(&str) -> u32 + Send + Sync>;

/// Prefills the prompt a node would send for a conversation into its engine's prefix cache,
/// as background work, and returns when that is done (or failed: a warm-up is only a hint).
pub type Warm = Arc<dyn Fn(&[ChatMessage]) + Send + Sync>;

/// Holds a compression back until the node that started it has sent its first token
/// ([`StartGate::open`], or dropping the gate): even the compressor's own CPU work (a
/// truncating compressor tokenizes the history many times) then never competes with it.
pub struct StartGate(Arc<(Mutex<bool>, Condvar)>);

impl StartGate {
    fn new() -> (Self, Arc<(Mutex<bool>, Condvar)>) {
        let shared = Arc::new((Mutex::new(false), Condvar::new()));
        (Self(shared.clone()), shared)
    }

    pub fn open(&self) {
        let (open, changed) = &*self.0;
        *crate::sync::lock(open) = true;
        changed.notify_all();
    }
}

impl Drop for StartGate {
    fn drop(&mut self) {
        self.open();
    }
}

/// Waits until the gate of `shared` is open.
fn wait_open(shared: &(Mutex<bool>, Condvar)) {
    let (open, changed) = shared;
    let guard = crate::sync::lock(open);
    let _open = changed
        .wait_while(guard, |open| !*open)
        .unwrap_or_else(|p| p.into_inner());
}

/// The compressed histories of one runner, shared by its runs.
pub struct HistoryCache {
    inner: Mutex<Inner>,
    changed: Condvar,
    seq: AtomicU64,
    workers: Mutex<Workers>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// The sequence number of each ready compression, by key (what runs report as used).
    finished_at: HashMap<Key, u64>,
    log: Vec<HistoryEvent>,
    running: usize,
}

impl HistoryCache {
    pub fn new() -> Arc<Self> {
        Self::with_threads(DEFAULT_COMPRESSION_THREADS)
    }

    /// A memory running at most `threads` compressions at once (at least one).
    pub fn with_threads(threads: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            changed: Condvar::new(),
            seq: AtomicU64::new(0),
            workers: Mutex::new(Workers {
                queue: VecDeque::new(),
                threads: 0,
                max: threads.max(1),
            }),
        })
    }

    /// Queues `job`, starting a worker thread when fewer than the maximum run.
    fn submit(self: &Arc<Self>, job: Job) -> std::io::Result<()> {
        let mut workers = crate::sync::lock(&self.workers);
        workers.queue.push_back(job);
        if workers.threads >= workers.max {
            return Ok(());
        }
        workers.threads += 1;
        drop(workers);
        let cache = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("history-compress".into())
            .spawn(move || {
                while let Some(job) = cache.upgrade().and_then(|c| c.next_job()) {
                    job();
                }
            });
        if let Err(error) = spawned {
            let mut workers = crate::sync::lock(&self.workers);
            workers.threads -= 1;
            // Nobody will run it: take it back (the caller reports the failure).
            workers.queue.pop_back();
            return Err(error);
        }
        Ok(())
    }

    /// The next queued job, or `None` (and one worker fewer) when the queue is empty.
    fn next_job(&self) -> Option<Job> {
        let mut workers = crate::sync::lock(&self.workers);
        let job = workers.queue.pop_front();
        if job.is_none() {
            workers.threads -= 1;
        }
        job
    }

    /// The next number in the memory's order of events (a node's first token takes one).
    pub fn mark(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    /// Everything the memory did, in order.
    pub fn events(&self) -> Vec<HistoryEvent> {
        self.lock().log.clone()
    }

    /// Waits until no compression is running, at most `timeout`; false if one still is.
    /// Tests use it between turns instead of sleeping.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |i| i.running > 0)
            .unwrap_or_else(|p| p.into_inner());
        inner.running == 0
    }

    /// The conversation a node with `plugin` and `budget` answers with: `conversation` with
    /// its longest prefix that has a ready compression replaced by it (the same block every
    /// turn until a newer one is ready). When that is over `budget`, a compression of it to
    /// `budget / COMPACT_SHARE` starts in the background (unless one of the same history is
    /// running or done), keyed by the whole `conversation`; it begins once the returned gate
    /// opens, and with a `warm` it is offered only once its prompt is cached. Never waits.
    #[allow(clippy::too_many_arguments)] // one call site, each argument a different concern
    pub fn prepare(
        self: &Arc<Self>,
        account: &ModelAccount,
        plugin: &str,
        budget: u32,
        conversation: &[ChatMessage],
        count: &TokenCount,
        policies: &Arc<dyn PolicyProvider>,
        warm: Option<Warm>,
    ) -> (Vec<ChatMessage>, HistoryUse, Option<StartGate>) {
        let namespace = &account.namespace;
        let tokens_of =
            |messages: &[ChatMessage]| -> u32 { messages.iter().map(|m| count(&m.content)).sum() };
        let keys = prefix_keys(namespace, plugin, budget, conversation);
        let mut used = HistoryUse {
            tokens_full: tokens_of(conversation),
            ..HistoryUse::default()
        };
        let mut inner = self.lock();
        let mut effective = conversation.to_vec();
        for (len, key) in keys.iter().enumerate().rev() {
            if let Some(Entry {
                state: State::Ready(messages),
                ..
            }) = inner.entries.get(key)
            {
                let replaced = len + 1;
                effective = messages.clone();
                effective.extend_from_slice(&conversation[replaced..]);
                used.replaced_messages = replaced;
                used.compression_seq = inner.finished_at.get(key).copied();
                break;
            }
        }
        used.tokens_used = tokens_of(&effective);
        let Some(whole) = keys.last() else {
            return (effective, used, None);
        };
        if used.tokens_used <= budget || inner.entries.contains_key(whole) {
            return (effective, used, None);
        }
        let seq = self.mark();
        inner.entries.insert(
            whole.clone(),
            Entry {
                state: State::Running,
                seq,
            },
        );
        inner.running += 1;
        push_event(
            &mut inner,
            HistoryEvent {
                seq,
                namespace: namespace.clone(),
                at: Instant::now(),
                plugin: plugin.to_string(),
                messages: conversation.len(),
                kind: HistoryEventKind::Started {
                    tokens: used.tokens_used,
                },
            },
        );
        evict(&mut inner);
        drop(inner);
        used.started = true;

        let cache = self.clone();
        let policies = policies.clone();
        let key = whole.clone();
        let owner = namespace.clone();
        let account = account.clone();
        let history = effective.clone();
        let messages = conversation.len();
        let plugin = plugin.to_string();
        let count = count.clone();
        let (gate, gate_shared) = StartGate::new();
        let spawned = self.submit(Box::new(move || {
                wait_open(&gate_shared);
                let target = (budget / COMPACT_SHARE).max(1);
                let result = policies.compressor(&plugin).and_then(|mut compressor| {
                    compressor.run_in_background();
                    // The tenant whose conversation it is pays, in its own namespace.
                    compressor.bill_to(&account);
                    compressor.compress(&history, target)
                });
                if let (Ok(compressed), Some(warm)) = (&result, &warm) {
                    warm(compressed);
                }
                let seq = cache.mark();
                let mut inner = cache.lock();
                let kind = match result {
                    Ok(compressed) => {
                        let tokens = compressed.iter().map(|m| count(&m.content)).sum();
                        inner.finished_at.insert(key.clone(), seq);
                        inner.entries.insert(
                            key,
                            Entry {
                                state: State::Ready(compressed),
                                seq,
                            },
                        );
                        HistoryEventKind::Finished { tokens }
                    }
                    Err(error) => {
                        let reason = error.to_string();
                        tracing::warn!(%plugin, %reason, "history compression failed; runs keep the full history");
                        inner.entries.insert(
                            key,
                            Entry {
                                state: State::Failed,
                                seq,
                            },
                        );
                        HistoryEventKind::Failed { reason }
                    }
                };
                push_event(&mut inner, HistoryEvent {
                    seq,
                    namespace: owner,
                    at: Instant::now(),
                    plugin,
                    messages,
                    kind,
                });
                inner.running -= 1;
                drop(inner);
                cache.changed.notify_all();
            }));
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a history compression");
            let mut inner = self.lock();
            inner.running -= 1;
            inner.entries.remove(whole);
        }
        (effective, used, Some(gate))
    }
}

/// Logs `event`, forgetting the oldest beyond [`MAX_LOG_EVENTS`].
fn push_event(inner: &mut Inner, event: HistoryEvent) {
    if inner.log.len() >= MAX_LOG_EVENTS {
        let excess = inner.log.len() + 1 - MAX_LOG_EVENTS;
        inner.log.drain(..excess);
    }
    inner.log.push(event);
}

/// Drops the oldest finished entries beyond [`MAX_ENTRIES`].
fn evict(inner: &mut Inner) {
    while inner.entries.len() > MAX_ENTRIES {
        let oldest = inner
            .entries
            .iter()
            .filter(|(_, e)| !matches!(e.state, State::Running))
            .min_by_key(|(_, e)| e.seq)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(key) => {
                inner.entries.remove(&key);
                inner.finished_at.remove(&key);
            }
            None => break,
        }
    }
}

/// The key of every prefix of `conversation` (index i: its first i + 1 messages), from one
/// running hash.
fn prefix_keys(
    namespace: &CacheNamespace,
    plugin: &str,
    budget: u32,
    conversation: &[ChatMessage],
) -> Vec<Key> {
    let mut hasher = Sha256::new();
    hasher.update(plugin.as_bytes());
    hasher.update(budget.to_le_bytes());
    conversation
        .iter()
        .map(|message| {
            let role: u8 = match message.role {
                Role::System => 0,
                Role::User => 1,
                Role::Assistant => 2,
            };
            hasher.update([role]);
            hasher.update((message.content.len() as u64).to_le_bytes());
            hasher.update(message.content.as_bytes());
            Key {
                namespace: namespace.clone(),
                plugin: plugin.to_string(),
                budget,
                hash: hasher.clone().finalize().into(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Usage;
    use crate::policy::{
        AggregatorSession, CompressorPolicy, LateCharge, PluginConfig, PluginKind, PolicyError,
        RolePolicy, RouterPolicy, Source, StreamMode, UsageMeter,
    };

    /// A compressor that "calls a model" of 15 tokens on whatever account it was billed to,
    /// and notes that account's namespace.
    struct Billed {
        seen: Arc<Mutex<Option<CacheNamespace>>>,
    }

    struct BilledCompressor {
        account: ModelAccount,
        seen: Arc<Mutex<Option<CacheNamespace>>>,
    }

    impl CompressorPolicy for BilledCompressor {
        fn compress(
            &mut self,
            _history: &[ChatMessage],
            _budget_tokens: u32,
        ) -> Result<Vec<ChatMessage>, PolicyError> {
            self.account.meter.record(&Usage {
                prompt_tokens: 10,
                cached_prompt_tokens: 0,
                completion_tokens: 5,
            });
            *self.seen.lock().unwrap() = Some(self.account.namespace.clone());
            Ok(vec![ChatMessage::new(Role::System, "short")])
        }

        fn bill_to(&mut self, account: &ModelAccount) {
            self.account = account.clone();
        }
    }

    impl PolicyProvider for Billed {
        fn role(&self, _: &str, _: &PluginConfig) -> Result<Box<dyn RolePolicy>, PolicyError> {
            Err(PolicyError("no roles".into()))
        }
        fn aggregator(
            &self,
            _: &str,
            _: &PluginConfig,
            _: &[ChatMessage],
            _: &[Source],
            _: StreamMode,
        ) -> Result<Box<dyn AggregatorSession>, PolicyError> {
            Err(PolicyError("no aggregators".into()))
        }
        fn compressor(&self, _: &str) -> Result<Box<dyn CompressorPolicy>, PolicyError> {
            Ok(Box::new(BilledCompressor {
                account: ModelAccount::default(),
                seen: self.seen.clone(),
            }))
        }
        fn router(&self, _: &str, _: &PluginConfig) -> Result<Box<dyn RouterPolicy>, PolicyError> {
            Err(PolicyError("no routers".into()))
        }
        fn guard(
            &self,
            _: &str,
            _: &PluginConfig,
            _: &crate::guard::StreamInfo,
        ) -> Result<Box<dyn crate::guard::GuardSession>, PolicyError> {
            Err(PolicyError("no guards".into()))
        }
        fn kind_of(&self, _: &str) -> Option<PluginKind> {
            Some(PluginKind::Compressor)
        }
    }

    #[test]
    fn a_background_compression_is_billed_to_the_tenant_that_started_it() {
        let seen = Arc::new(Mutex::new(None));
        let policies: Arc<dyn PolicyProvider> = Arc::new(Billed { seen: seen.clone() });
        let charged = Arc::new(AtomicU64::new(0));
        let quota = charged.clone();
        let meter = UsageMeter::new(Some(LateCharge::new(move |tokens| {
            quota.fetch_add(tokens, Ordering::SeqCst);
        })));
        let account = ModelAccount {
            namespace: CacheNamespace::new("tenant-a"),
            meter: meter.clone(),
        };
        let count: TokenCount = Arc::new(|text: &str| text.len() as u32);
        let conversation = [
            ChatMessage::new(Role::User, "a long first question"),
            ChatMessage::new(Role::Assistant, "a long first answer"),
        ];
        let cache = HistoryCache::new();
        let (_, used, gate) =
            cache.prepare(&account, "c", 10, &conversation, &count, &policies, None);
        assert!(used.started);
        // The run ends before its compression begins: the compression outlives it.
        assert_eq!(meter.close(), Usage::default());
        drop(gate);
        assert!(cache.wait_idle(Duration::from_secs(60)));
        assert_eq!(*seen.lock().unwrap(), Some(CacheNamespace::new("tenant-a")));
        assert_eq!(
            charged.load(Ordering::SeqCst),
            15,
            "the tenant's quota pays"
        );
    }

    #[test]
    fn prefixes_hash_apart_and_a_longer_conversation_extends_them() {
        let a = [
            ChatMessage::new(Role::User, "hi"),
            ChatMessage::new(Role::Assistant, "hello"),
        ];
        let keys = prefix_keys(&CacheNamespace::default(), "p", 8, &a);
        let longer = prefix_keys(
            &CacheNamespace::default(),
            "p",
            8,
            &[a[0].clone(), a[1].clone(), a[0].clone()],
        );
        assert_eq!(keys[..], longer[..2]);
        assert_ne!(keys[0], keys[1]);
        assert_ne!(
            prefix_keys(&CacheNamespace::default(), "q", 8, &a)[1],
            keys[1]
        );
        assert_ne!(
            prefix_keys(&CacheNamespace::default(), "p", 9, &a)[1],
            keys[1]
        );
    }
}
