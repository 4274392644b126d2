//! The bounded queue: at most `max_running` runs at once, at most `queue` more waiting;
//! past that a request is refused at once (429) instead of waiting without bound.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

pub(crate) struct Admission {
    /// Running plus waiting.
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    capacity: usize,
    max_running: usize,
}

/// A request's place: in the queue until [`Ticket::start`] returns.
pub(crate) struct Ticket {
    _admitted: OwnedSemaphorePermit,
    running: Arc<Semaphore>,
}

/// Held while a run runs.
pub(crate) struct Running {
    _admitted: OwnedSemaphorePermit,
    _running: OwnedSemaphorePermit,
}

impl Admission {
    pub(crate) fn new(max_running: usize, queue: usize) -> Self {
        let max_running = max_running.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(max_running + queue)),
            running: Arc::new(Semaphore::new(max_running)),
            capacity: max_running + queue,
            max_running,
        }
    }

    /// A place in the queue, or 429 when it is full.
    pub(crate) fn admit(&self) -> Result<Ticket, ApiError> {
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::overloaded())?;
        Ok(Ticket {
            _admitted: admitted,
            running: self.running.clone(),
        })
    }

    /// Runs now running, and requests waiting for a slot.
    pub(crate) fn depth(&self) -> (usize, usize) {
        let admitted = self.capacity - self.admitted.available_permits();
        let running = self.max_running - self.running.available_permits();
        (running, admitted.saturating_sub(running))
    }
}

impl Ticket {
    /// Waits for a run slot.
    pub(crate) async fn start(self) -> Running {
        let running = self
            .running
            .acquire_owned()
            .await
            .expect("the admission semaphore is never closed");
        Running {
            _admitted: self._admitted,
            _running: running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_the_queue_requests_are_refused_and_a_freed_place_is_reused() {
        let admission = Admission::new(1, 1);
        let first = admission.admit().unwrap().start().await;
        let second = admission.admit().unwrap();
        assert_eq!(admission.depth(), (1, 1));
        assert_eq!(admission.admit().err().unwrap().status, 429);
        drop(first);
        let _second = second.start().await;
        assert_eq!(admission.depth(), (1, 0));
        assert!(admission.admit().is_ok());
    }
}
