//! Work a connection runs right after its next write: [`AfterWrite`].
//!
//! What is only bookkeeping about an answer (its access-log line, the end
//! of its trace span) need not hold the answer back. Done when the response
//! body ends, it ran before the answer's bytes went out, on every request's
//! critical path: formatting the access-log line alone was about a twentieth
//! of a GetVmInfo's latency on the API socket (BENCHMARKS.md, 2026-12-03).
//! Deferred here, it runs right after the connection's next write, the one
//! that carries the answer, as web servers write their access logs once the
//! response is sent. Counters and histograms stay where they were, so a
//! scrape that follows an answer always counts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::Activity;

/// One piece of deferred work.
pub type Deferred = Box<dyn FnOnce() + Send>;

/// A connection's queue of deferred work, handed to each of its requests in
/// the request's extensions.
#[derive(Clone, Debug)]
pub struct AfterWrite(pub(super) Arc<Activity>);

impl AfterWrite {
    /// Runs `work` right after the connection's next write, or now when the
    /// connection has already ended (nothing would write again).
    pub fn defer(&self, work: Deferred) {
        self.0.after_write.defer(work);
    }
}

/// The queue itself, part of a connection's [`Activity`].
#[derive(Default)]
pub(super) struct Queue {
    /// Set while work waits, so a write with nothing to run takes no lock.
    pending: AtomicBool,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    work: Vec<Deferred>,
    /// The connection ended: work runs where it is deferred.
    closed: bool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Queue {
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        // Work panicking while the lock is held leaves the queue whole.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn defer(&self, work: Deferred) {
        let mut waiting = self.waiting();
        if waiting.closed {
            drop(waiting);
            work();
            return;
        }
        waiting.work.push(work);
        self.pending.store(true, Ordering::Release);
    }

    /// Runs what waits; called after each write.
    pub(super) fn run(&self) {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let work = std::mem::take(&mut self.waiting().work);
        for w in work {
            w();
        }
    }

    /// The connection ended: runs what waits, and from now on work runs
    /// where it is deferred.
    pub(super) fn close(&self) {
        let work = {
            let mut waiting = self.waiting();
            waiting.closed = true;
            std::mem::take(&mut waiting.work)
        };
        self.pending.store(false, Ordering::Release);
        for w in work {
            w();
        }
    }
}
