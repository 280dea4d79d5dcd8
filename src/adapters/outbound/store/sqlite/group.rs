//! Group work on the blocking pool: callers queue items, and one worker at
//! a time takes everything queued and handles it as one batch (one
//! transaction for the queued records, one `fdatasync` for the queued
//! syncs), going on until the queue is empty. Whatever queues while a batch
//! runs goes into the next one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

pub(super) struct Group<T> {
    state: Mutex<State<T>>,
    /// Batches handled so far.
    batches: AtomicUsize,
}

struct State<T> {
    items: Vec<T>,
    /// A worker runs and will take what is queued.
    running: bool,
}

impl<T> Group<T> {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                items: Vec::new(),
                running: false,
            }),
            batches: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`; true when no worker runs and the caller must start
    /// one (with [`Group::work`]).
    pub(super) fn push(&self, item: T) -> bool {
        let mut state = self.lock();
        state.items.push(item);
        !std::mem::replace(&mut state.running, true)
    }

    /// The worker: hands each batch to `handle` until nothing is queued.
    /// If `handle` panics, what is queued is dropped (its waiters hear that
    /// the worker stopped) and the next push starts a new worker.
    pub(super) fn work(&self, mut handle: impl FnMut(Vec<T>)) {
        struct Stopped<'a, T>(&'a Group<T>);
        impl<T> Drop for Stopped<'_, T> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    let mut state = self.0.lock();
                    state.running = false;
                    state.items.clear();
                }
            }
        }
        let _stopped = Stopped(self);
        loop {
            let batch = {
                let mut state = self.lock();
                if state.items.is_empty() {
                    state.running = false;
                    return;
                }
                std::mem::take(&mut state.items)
            };
            self.batches.fetch_add(1, Ordering::Relaxed);
            handle(batch);
        }
    }

    /// Items queued and not yet taken.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether a worker runs.
    #[cfg(test)]
    pub(super) fn running(&self) -> bool {
        self.lock().running
    }

    /// Batches handled so far.
    #[cfg(test)]
    pub(super) fn batches(&self) -> usize {
        self.batches.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;

    #[test]
    fn what_queues_during_a_batch_is_handled_as_the_next_one() {
        let group = Arc::new(Group::new());
        assert!(group.push(0), "the first push starts the worker");
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let worker = {
            let group = Arc::clone(&group);
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                group.work(|batch| {
                    if seen.is_empty() {
                        entered_tx.send(()).expect("entered");
                        release_rx.recv().expect("release");
                    }
                    seen.push(batch);
                });
                seen
            })
        };
        entered.recv().expect("the first batch runs");
        for i in 1..=5 {
            assert!(!group.push(i), "a worker runs: nothing more to start");
        }
        assert_eq!(group.queued(), 5);
        release.send(()).expect("release");
        let seen = worker.join().expect("worker");
        assert_eq!(seen, vec![vec![0], vec![1, 2, 3, 4, 5]]);
        assert_eq!(group.batches(), 2);
        assert!(!group.running(), "the worker stopped on an empty queue");
        assert!(group.push(6), "the next push starts a new worker");
    }

    #[test]
    fn a_panicking_batch_drops_the_queue_and_lets_a_new_worker_start() {
        let group = Arc::new(Group::new());
        assert!(group.push(1));
        let g = Arc::clone(&group);
        let outcome = std::thread::spawn(move || {
            g.work(|_| {
                g.push(2);
                panic!("the batch failed");
            })
        })
        .join();
        assert!(outcome.is_err(), "the worker panicked");
        assert_eq!(group.queued(), 0, "what was queued is dropped");
        assert!(!group.running());
        assert!(group.push(3), "a new worker can start");
    }
}
