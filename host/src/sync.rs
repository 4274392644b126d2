//! The one poison-tolerant lock. Every mutex of this crate guards a value each update of
//! which leaves it consistent (one push, swap or whole-value write), so a thread that
//! panicked holding one leaves nothing half-done: the next caller takes the value as it is
//! instead of panicking in turn (one failed request or run must not take the server down for
//! everyone after it). This room holds no state and knows no other room.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// `mutex` locked, even when a thread panicked holding it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_opens() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let held = mutex.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.lock().unwrap();
            panic!("poisons the lock");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
