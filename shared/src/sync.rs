//! A mutex that a panic cannot poison.
//!
//! Slots share locks (the lease map, the ack window, the breaker, the metrics). A panic in one
//! pipeline while it held such a lock would poison a `std::sync::Mutex` and turn every later
//! `lock()` into another panic, one message costing the worker. The guarded data here is
//! always left consistent by the code that holds the lock (no lock is held across a call into
//! a handler), so the lock is taken back after a panic instead.

use std::sync::{MutexGuard, PoisonError};

/// `std::sync::Mutex` whose `lock` ignores poisoning (see the module doc).
#[derive(Debug, Default)]
pub struct Mutex<T: ?Sized>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    /// A new unlocked mutex.
    pub const fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }

    /// The value, consuming the mutex.
    pub fn into_inner(self) -> T {
        self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Locks, waiting for another holder; never fails.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks if free now.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_locked_leaves_the_mutex_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock();
            *g = 2;
            panic!("while holding the lock");
        })
        .join();
        assert_eq!(*m.lock(), 2);
        *m.lock() += 1;
        assert_eq!(*m.try_lock().unwrap(), 3);
    }
}
