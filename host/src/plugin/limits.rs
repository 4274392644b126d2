//! Per-instance resource limits: wasmtime's `StoreLimits` for memory, tables and
//! instances, remembering a refused memory growth so the trap that follows is reported as
//! out-of-memory. Deadlines are the epoch ticker's job (`runtime.rs`), not this file's.

use super::runtime::POOL_MEMORIES_PER_COMPONENT;

/// Tables and instances one plugin instance may create: generous for componentize-py and
/// StarlingMonkey output, small enough to stop a guest that creates them in a loop.
const MAX_TABLES: usize = 64;
const MAX_INSTANCES: usize = 256;
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// wasmtime's `StoreLimits` (memory, table elements, instances, tables, memories), plus a
/// record of whether a memory growth was refused, so a trap after a refusal is reported as
/// out-of-memory rather than as the guest's abort.
pub(crate) struct Limiter {
    limits: wasmtime::StoreLimits,
    pub(crate) memory_refused: bool,
}

impl Limiter {
    pub(crate) fn new(memory_bytes: usize) -> Self {
        Self {
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
        let ok = self.limits.memory_growing(current, desired, maximum)?;
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
