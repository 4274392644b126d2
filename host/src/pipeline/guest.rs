//! Where policy calls run: a bounded pool of blocking threads, off the async runtime.
//!
//! A policy call is a plugin's guest code (or a host import it makes, such as a model
//! completion that waits for a whole generation), so it may spin until its deadline. Run on
//! a tokio worker, a few such calls would stop every other request of a server (its health
//! check included). Every call the pipeline makes goes through a [`GuestPool`] instead: it
//! waits asynchronously for one of a bounded number of permits, runs on a blocking thread,
//! and the caller awaits its answer. This room only moves calls between threads; it must not
//! know about wasmtime, plugins or engines.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::policy::PolicyError;

/// Policy calls running at once when the operator does not say (`[sandbox] guest_threads`).
/// A call is normally microseconds, so a handful of threads serve any load; the bound is
/// what matters: a crowd of looping plugins holds at most this many threads (each until its
/// call deadline), never one per request, and the async runtime keeps all of its workers.
pub const DEFAULT_GUEST_THREADS: usize = 8;

/// The bounded pool policy calls run on. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct GuestPool {
    permits: Arc<Semaphore>,
    threads: usize,
}

impl Default for GuestPool {
    fn default() -> Self {
        Self::new(DEFAULT_GUEST_THREADS)
    }
}

impl GuestPool {
    /// A pool running at most `threads` calls at once (at least one).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        Self {
            permits: Arc::new(Semaphore::new(threads)),
            threads,
        }
    }

    /// How many calls may run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls running now (for status and tests).
    pub fn busy(&self) -> usize {
        self.threads - self.permits.available_permits()
    }

    /// Runs `call` on a blocking thread once a permit is free and returns its answer. The
    /// permit travels with the call: a caller that stops waiting (a cancelled run) leaves the
    /// call to finish under its own deadline, still counted against the pool.
    pub async fn run<R: Send + 'static>(
        &self,
        call: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, PolicyError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PolicyError("the policy call pool is closed".into()))?;
        // The caller's span (request, run, node) goes with the call to its thread.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _entered = span.enter();
            call()
        })
        .await
        .map_err(|join| PolicyError(format!("a policy call failed: {join}")))
    }
}

/// A policy instance whose calls run on a [`GuestPool`]: the instance moves to the call's
/// thread and back. A call whose thread failed (a panic) loses the instance; later calls
/// then fail with an error instead of touching a half-updated one.
pub struct Guest<T: ?Sized> {
    pool: Arc<GuestPool>,
    value: Option<Box<T>>,
}

impl<T: ?Sized + Send + 'static> Guest<T> {
    pub fn new(pool: Arc<GuestPool>, value: Box<T>) -> Self {
        Self {
            pool,
            value: Some(value),
        }
    }

    /// Runs `call` on the instance, on the pool.
    pub async fn call<R: Send + 'static>(
        &mut self,
        call: impl FnOnce(&mut T) -> Result<R, PolicyError> + Send + 'static,
    ) -> Result<R, PolicyError> {
        let mut value = self
            .value
            .take()
            .ok_or_else(|| PolicyError("the policy instance was lost by a failed call".into()))?;
        let (value, answer) = self
            .pool
            .run(move || {
                let answer = call(&mut value);
                (value, answer)
            })
            .await?;
        self.value = Some(value);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "current_thread")]
    async fn calls_run_off_the_runtime_and_at_most_the_pool_size_at_once() {
        let pool = Arc::new(GuestPool::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (pool, running, most, gate) =
                    (pool.clone(), running.clone(), most.clone(), gate.clone());
                tokio::spawn(async move {
                    pool.run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        // Blocks its thread until the test releases it: on the one-thread
                        // runtime this would hang the test if calls ran on the runtime.
                        let _ = gate.lock().map(|g| g.recv());
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for _ in 0..4 {
            release.send(()).unwrap();
        }
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2);
        assert_eq!(pool.busy(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_instance_goes_to_its_call_and_comes_back() {
        let pool = Arc::new(GuestPool::new(1));
        let mut guest: Guest<Vec<u32>> = Guest::new(pool, Box::new(Vec::new()));
        guest
            .call(|v| {
                v.push(1);
                Ok(())
            })
            .await
            .unwrap();
        let len = guest.call(|v| Ok(v.len())).await.unwrap();
        assert_eq!(len, 1);
    }
}
