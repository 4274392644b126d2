//! Per-instance resource limits: wasmtime's `StoreLimits` for memory, tables and
//! instances, remembering a refused memory growth so the trap that follows is reported as
//! out-of-memory; the log budget of an instance; the compile budget of a component.
//! Deadlines are the epoch ticker's job (`runtime.rs`), not this file's.

use super::runtime::POOL_MEMORIES_PER_COMPONENT;

/// Tables and instances one plugin instance may create: generous for componentize-py and
/// StarlingMonkey output, small enough to stop a guest that creates them in a loop.
const MAX_TABLES: usize = 64;
const MAX_INSTANCES: usize = 256;
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// wasmtime's `StoreLimits` (table elements, instances, tables, memories), one memory cap
/// over all of an instance's linear memories together (wasmtime's own is per memory, and a
/// component may have many), and a record of whether a memory growth was refused, so a trap
/// after a refusal is reported as out-of-memory rather than as the guest's abort.
pub(crate) struct Limiter {
    limits: wasmtime::StoreLimits,
    pub(crate) memory_refused: bool,
    /// Bytes of every memory of the store together, and the cap on them.
    memory_used: usize,
    memory_cap: usize,
}

impl Limiter {
    pub(crate) fn new(memory_bytes: usize) -> Self {
        Self {
            memory_used: 0,
            memory_cap: memory_bytes,
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .table_elements(MAX_TABLE_ELEMENTS)
                .instances(MAX_INSTANCES)
                .tables(MAX_TABLES)
                .memories(POOL_MEMORIES_PER_COMPONENT as usize)
                .build(),
            memory_refused: false,
        }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A memory is created growing from 0, so the sum counts every memory's whole size.
        let extra = desired.saturating_sub(current);
        let fits = self
            .memory_used
            .checked_add(extra)
            .is_some_and(|total| total <= self.memory_cap);
        let ok = fits && self.limits.memory_growing(current, desired, maximum)?;
        if ok {
            self.memory_used += extra;
        }
        self.memory_refused |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// How much a plugin may write to the host's log (the `log` import). Over a budget, lines
/// are dropped and counted, and one summary line reports them when the instance ends, so a
/// flooding plugin costs the log a bounded number of lines, never a growing buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimits {
    /// Longest line; longer ones are cut ([`super::clip`]).
    pub line_bytes: usize,
    /// Lines and bytes one call may log: a policy call on the path of every chunk has
    /// little to say.
    pub lines_per_call: u32,
    pub bytes_per_call: usize,
    /// Lines and bytes one instance may log over its life (one run).
    pub lines_per_run: u32,
    pub bytes_per_run: usize,
}

/// A line is for a human: 4 KiB holds any message worth reading.
pub const DEFAULT_LOG_LINE_BYTES: usize = 4096;
/// A call that logs more than 32 lines is looping, not reporting.
pub const DEFAULT_LOG_LINES_PER_CALL: u32 = 32;
pub const DEFAULT_LOG_BYTES_PER_CALL: usize = 16 << 10;
/// A run's worth of diagnostics from one plugin: a screenful or two of lines.
pub const DEFAULT_LOG_LINES_PER_RUN: u32 = 1000;
pub const DEFAULT_LOG_BYTES_PER_RUN: usize = 256 << 10;

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            line_bytes: DEFAULT_LOG_LINE_BYTES,
            lines_per_call: DEFAULT_LOG_LINES_PER_CALL,
            bytes_per_call: DEFAULT_LOG_BYTES_PER_CALL,
            lines_per_run: DEFAULT_LOG_LINES_PER_RUN,
            bytes_per_run: DEFAULT_LOG_BYTES_PER_RUN,
        }
    }
}

/// One instance's use of its log budget.
pub(crate) struct LogBudget {
    limits: LogLimits,
    plugin: super::PluginRef,
    call_lines: u32,
    call_bytes: usize,
    run_lines: u32,
    run_bytes: usize,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl LogBudget {
    pub(crate) fn new(limits: LogLimits, plugin: super::PluginRef) -> Self {
        Self {
            limits,
            plugin,
            call_lines: 0,
            call_bytes: 0,
            run_lines: 0,
            run_bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    /// A new call starts: its own budget is whole again.
    pub(crate) fn new_call(&mut self) {
        self.call_lines = 0;
        self.call_bytes = 0;
    }

    /// Whether a line of `bytes` (already cut to the line limit) may be written; a refused
    /// line is counted.
    pub(crate) fn admit(&mut self, bytes: usize) -> bool {
        let l = &self.limits;
        let fits = self.call_lines < l.lines_per_call
            && self.call_bytes + bytes <= l.bytes_per_call
            && self.run_lines < l.lines_per_run
            && self.run_bytes + bytes <= l.bytes_per_run;
        if fits {
            self.call_lines += 1;
            self.call_bytes += bytes;
            self.run_lines += 1;
            self.run_bytes += bytes;
        } else {
            self.dropped_lines += 1;
            self.dropped_bytes += bytes as u64;
        }
        fits
    }

    pub(crate) fn line_bytes(&self) -> usize {
        self.limits.line_bytes
    }

    #[cfg(test)]
    pub(crate) fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }
}

impl Drop for LogBudget {
    /// The one summary line of what was dropped.
    fn drop(&mut self) {
        if self.dropped_lines > 0 {
            let l = &self.limits;
            tracing::warn!(
                plugin = %self.plugin,
                dropped_lines = self.dropped_lines,
                dropped_bytes = self.dropped_bytes,
                "log lines over the plugin's budget were dropped (budget: {} lines or {} bytes per call, {} lines or {} bytes per run)",
                l.lines_per_call,
                l.bytes_per_call,
                l.lines_per_run,
                l.bytes_per_run
            );
        }
    }
}

/// How long compiling a component may take: a base plus a share per MiB of component, since
/// honest compile time grows with size (an 18 MiB Python component compiles in about 20 s
/// on a quiet 2-core machine, and took over 45 s beside other builds, about 2.5 s per MiB)
/// while a compile bomb is small and slow (a 252 KB component that took 22 s). The budget
/// covers waiting: cranelift cannot be interrupted, so a compile over it is abandoned (its
/// result discarded, never cached) and the plugin refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompileBudget {
    pub base: std::time::Duration,
    pub per_mib: std::time::Duration,
}

/// 10 s: the built-in Rust policies compile in well under a second.
pub const DEFAULT_COMPILE_BASE: std::time::Duration = std::time::Duration::from_secs(10);
/// 8 s per MiB: three times the Python component's rate on a busy machine (150 s for it),
/// and still 12 s for the 252 KB compile bomb.
pub const DEFAULT_COMPILE_PER_MIB: std::time::Duration = std::time::Duration::from_secs(8);

impl Default for CompileBudget {
    fn default() -> Self {
        Self {
            base: DEFAULT_COMPILE_BASE,
            per_mib: DEFAULT_COMPILE_PER_MIB,
        }
    }
}

impl CompileBudget {
    /// The budget of a component of `bytes`.
    pub fn for_size(&self, bytes: usize) -> std::time::Duration {
        self.base + self.per_mib.mul_f64(bytes as f64 / f64::from(1u32 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> super::super::PluginRef {
        super::super::PluginRef {
            name: "p".into(),
            version: "1".into(),
        }
    }

    #[test]
    fn the_log_budget_drops_and_counts_lines_over_it() {
        let limits = LogLimits {
            lines_per_call: 2,
            lines_per_run: 3,
            ..LogLimits::default()
        };
        let mut budget = LogBudget::new(limits, plugin());
        assert!(budget.admit(10) && budget.admit(10));
        assert!(!budget.admit(10), "third line of a call");
        budget.new_call();
        assert!(budget.admit(10));
        assert!(!budget.admit(10), "fourth line of a run");
        assert_eq!(budget.dropped_lines(), 2);
        let mut bytes = LogBudget::new(LogLimits::default(), plugin());
        assert!(!bytes.admit(DEFAULT_LOG_BYTES_PER_CALL + 1));
    }

    #[test]
    fn the_memory_cap_counts_every_memory_together() {
        use wasmtime::ResourceLimiter;
        let mut limiter = Limiter::new(100);
        assert!(
            limiter.memory_growing(0, 60, None).unwrap(),
            "a first memory"
        );
        assert!(
            !limiter.memory_growing(0, 60, None).unwrap(),
            "a second memory over the shared cap"
        );
        assert!(limiter.memory_refused);
        assert!(
            limiter.memory_growing(60, 100, None).unwrap(),
            "up to the cap"
        );
        assert!(!limiter.memory_growing(100, 101, None).unwrap());
    }

    #[test]
    fn the_compile_budget_grows_with_size() {
        let budget = CompileBudget::default();
        assert_eq!(budget.for_size(0), DEFAULT_COMPILE_BASE);
        assert_eq!(
            budget.for_size(40 << 20),
            DEFAULT_COMPILE_BASE + DEFAULT_COMPILE_PER_MIB * 40
        );
    }
}
