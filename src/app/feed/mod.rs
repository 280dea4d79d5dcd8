//! The host's change feed: every recorded change of a VM gets the next
//! host-wide revision, goes into a bounded history, and fans out to the
//! watchers whose filter it matches.
//!
//! Ordering is the feed's whole job. An owner records a change with a
//! ticket ([`ChangeFeed::record`]): it takes the next revision, writes the
//! record with it, publishes its view, then commits the change. Owners do
//! this at the same time (their store writes overlap, so 32 VMs starting
//! at once do not write their records one after another), and the feed
//! settles commits in revision order: a change is published to readers and
//! watchers only when every earlier revision has been committed (or its
//! ticket dropped). So a reader that sees revision `r`
//! ([`ChangeFeed::revision`]) already sees every view up to `r` (ListVms
//! reads the revision first, then the views: a list may hold changes newer
//! than its revision, which a watch from that revision replays; clients
//! apply changes as upserts by revision, so a replay is harmless, and
//! nothing is ever skipped), and watchers get changes in revision order.
//! Each VM's own records reach the store in its order (its owner writes
//! one at a time); the store keeps the highest revision written, which a
//! restart continues after.
//!
//! A watcher is a bounded queue. A commit never waits for a watcher: a
//! watcher whose queue is full is dropped from the feed, and its stream,
//! after yielding what it had, ends with `resource_exhausted` naming the
//! revision to resume from. History is in memory: after a restart it starts
//! empty at the store's revision, so a client that saw everything resumes
//! seamlessly, and one that did not is told to list again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::domain::{VmError, VmId, VmSnapshot, VmState};
use crate::ports::{
    Telemetry, TelemetryEvent, WatchEvent, WatchEventKind, WatchQuery, WatchStream,
};

/// Watch limits and timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSettings {
    /// Changes kept for resuming (`UNKEY_VMCP_WATCH_HISTORY`).
    pub history: usize,
    /// Changes queued per watcher before it is dropped (`UNKEY_VMCP_WATCH_BUFFER`).
    pub buffer: usize,
    /// Watchers open at once (`UNKEY_VMCP_MAX_WATCHERS`).
    pub max_watchers: usize,
    /// Interval of heartbeats on a quiet stream (`UNKEY_VMCP_WATCH_HEARTBEAT_SECONDS`).
    pub heartbeat: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            history: 4096,
            buffer: 1024,
            max_watchers: 1024,
            heartbeat: Duration::from_secs(15),
        }
    }
}

/// One recorded change.
#[derive(Debug)]
pub struct Change {
    /// Its host-wide revision.
    pub revision: u64,
    /// Added, changed or deleted.
    pub kind: WatchEventKind,
    /// The VM after the change (as it was last, for a delete).
    pub vm: Arc<VmSnapshot>,
    /// The VM's state before the change (None for an add).
    pub before: Option<VmState>,
}

/// Which changes a watcher wants.
#[derive(Debug, Clone, Default)]
struct Filter {
    ids: BTreeSet<VmId>,
    states: Vec<VmState>,
}

impl Filter {
    fn of(query: &WatchQuery) -> Self {
        Self {
            ids: query.vm_ids.iter().cloned().collect(),
            states: query.states.clone(),
        }
    }

    fn wants_vm(&self, id: &VmId) -> bool {
        self.ids.is_empty() || self.ids.contains(id)
    }

    fn wants_state(&self, state: VmState) -> bool {
        self.states.is_empty() || self.states.contains(&state)
    }

    /// A change into or out of a wanted state is sent, so that a client
    /// that mirrors "the VMs in these states" sees a VM leave.
    fn matches(&self, change: &Change) -> bool {
        self.wants_vm(&change.vm.id)
            && (self.wants_state(change.vm.state)
                || change.before.is_some_and(|s| self.wants_state(s)))
    }
}

struct Subscriber {
    tx: mpsc::Sender<Arc<Change>>,
    filter: Filter,
    overflowed: Arc<AtomicBool>,
}

struct Inner {
    /// The revision of the last settled change: every one up to it is
    /// committed (or its ticket was dropped).
    revision: u64,
    /// The last revision handed out by [`ChangeFeed::record`].
    issued: u64,
    /// Settled out of order, waiting for the revisions before them (a
    /// dropped ticket settles as `None`).
    waiting: BTreeMap<u64, Option<Arc<Change>>>,
    /// A resume from any revision at or after this one is complete.
    floor: u64,
    history: VecDeque<Arc<Change>>,
    subscribers: Vec<Subscriber>,
    closed: bool,
}

/// The change feed (one per VMCP).
pub struct ChangeFeed {
    inner: Mutex<Inner>,
    /// The revision of the last committed change, for lock-free reads.
    published: AtomicU64,
    watchers: AtomicUsize,
    closed: AtomicBool,
    settings: WatchSettings,
    telemetry: Arc<dyn Telemetry>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("revision", &self.revision())
            .field("watchers", &self.watchers())
            .field("settings", &self.settings)
            .finish()
    }
}

/// A change being recorded: a ticket for the next revision. Committing it
/// settles that revision; dropping it uncommitted settles it as no change,
/// so a cancelled owner never holds up the feed.
pub struct Recording<'a> {
    feed: &'a ChangeFeed,
    revision: u64,
    settled: bool,
}

impl std::fmt::Debug for Recording<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl Recording<'_> {
    /// The revision the change gets.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Commits the change: once every earlier revision is settled, into the
    /// history and every matching watcher's queue. A watcher whose queue is
    /// full is dropped, never waited for.
    pub fn commit(mut self, kind: WatchEventKind, vm: Arc<VmSnapshot>, before: Option<VmState>) {
        let change = Arc::new(Change {
            revision: self.revision,
            kind,
            vm,
            before,
        });
        self.settled = true;
        self.feed.settle(self.revision, Some(change));
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.feed.settle(self.revision, None);
        }
    }
}

impl ChangeFeed {
    /// A feed that continues after `revision` (the store's highest).
    pub fn new(revision: u64, settings: WatchSettings, telemetry: Arc<dyn Telemetry>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                revision,
                issued: revision,
                waiting: BTreeMap::new(),
                floor: revision,
                history: VecDeque::new(),
                subscribers: Vec::new(),
                closed: false,
            }),
            published: AtomicU64::new(revision),
            watchers: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            settings,
            telemetry,
        })
    }

    /// Continues after `revision` when it is newer than the feed's (the
    /// store is read after the feed is built, before any change).
    pub fn resume_after(&self, revision: u64) {
        let mut inner = self.lock();
        if revision > inner.revision && inner.history.is_empty() && inner.issued == inner.revision {
            inner.revision = revision;
            inner.issued = revision;
            inner.floor = revision;
            self.published.store(revision, Ordering::Release);
        }
    }

    /// The revision of the last committed change.
    pub fn revision(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Watchers open now.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    /// The settings.
    pub fn settings(&self) -> WatchSettings {
        self.settings
    }

    /// Starts recording a change: a ticket for the next revision (never
    /// waits for other changes being recorded).
    pub fn record(&self) -> Recording<'_> {
        let mut inner = self.lock();
        inner.issued += 1;
        Recording {
            feed: self,
            revision: inner.issued,
            settled: false,
        }
    }

    /// The feed's state; never held across an await.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Settles `revision` with its change (`None`: no change), then
    /// publishes every change whose earlier revisions are all settled.
    fn settle(&self, revision: u64, change: Option<Arc<Change>>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.waiting.insert(revision, change);
        let before = inner.revision;
        while let Some(change) = inner.waiting.remove(&(inner.revision + 1)) {
            inner.revision += 1;
            if let Some(change) = change {
                self.publish(inner, &change);
            }
        }
        if inner.revision != before {
            // After the sends: a reader that sees this revision finds the change queued.
            self.published.store(inner.revision, Ordering::Release);
        }
    }

    /// Puts a settled change into the history and every matching watcher's queue.
    fn publish(&self, inner: &mut Inner, change: &Arc<Change>) {
        inner.history.push_back(Arc::clone(change));
        while inner.history.len() > self.settings.history.max(1) {
            if let Some(old) = inner.history.pop_front() {
                inner.floor = old.revision;
            }
        }
        let telemetry = &*self.telemetry;
        inner.subscribers.retain(|s| {
            if !s.filter.matches(change) {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(Arc::clone(change)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.overflowed.store(true, Ordering::Release);
                    telemetry.record(TelemetryEvent::WatchDropped { reason: "overflow" });
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Whether [`ChangeFeed::close`] was called (other streams end then too).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends every stream (server shutdown): each ends, after what it had
    /// queued, with `unavailable` naming the revision to resume from; new
    /// watches are refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut inner = self.lock();
        inner.closed = true;
        inner.subscribers.clear();
    }

    /// Opens a watch. `current` lists the VMs as they are for
    /// `send_initial` (called with the feed held: it holds every change up
    /// to the synced revision, and may hold newer ones still settling, which
    /// the stream then repeats; clients apply changes as upserts).
    pub fn subscribe(
        self: &Arc<Self>,
        query: WatchQuery,
        current: impl FnOnce() -> Vec<Arc<VmSnapshot>>,
    ) -> Result<WatchStream, VmError> {
        if query.send_initial && query.since_revision.is_some() {
            return Err(VmError::InvalidArgument(crate::domain::VmConfigError::new(
                "since_revision",
                "cannot be combined with send_initial (the initial list replaces a resume)",
            )));
        }
        let slot = WatcherSlot::take(self)?;
        let filter = Filter::of(&query);
        let mut inner = self.lock();
        if inner.closed {
            return Err(VmError::Unavailable(
                "VMCP is shutting down; watch again when it is back".into(),
            ));
        }
        let mut first = VecDeque::new();
        if let Some(since) = query.since_revision {
            if since < inner.floor || since > inner.revision {
                let why = if since > inner.revision {
                    "is newer than this host's revision"
                } else {
                    "is older than the history this VMCP keeps"
                };
                return Err(VmError::OutOfRange(format!(
                    "since_revision {since} {why} (resumable: {} to {}); list the VMs again and watch from the list's revision",
                    inner.floor, inner.revision
                )));
            }
            first.extend(
                inner
                    .history
                    .iter()
                    .filter(|c| c.revision > since && filter.matches(c))
                    .map(|c| event_of(c)),
            );
        } else if query.send_initial {
            first.extend(
                current()
                    .into_iter()
                    .filter(|vm| filter.wants_vm(&vm.id) && filter.wants_state(vm.state))
                    .map(|vm| WatchEvent {
                        kind: WatchEventKind::Added,
                        revision: vm.revision,
                        vm: Some(vm),
                    }),
            );
        }
        first.push_back(WatchEvent {
            kind: WatchEventKind::Synced,
            vm: None,
            revision: inner.revision,
        });
        let (tx, rx) = mpsc::channel(self.settings.buffer.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        inner.subscribers.push(Subscriber {
            tx,
            filter,
            overflowed: Arc::clone(&overflowed),
        });
        let last = inner.revision;
        drop(inner);
        let stream = Subscription {
            feed: Arc::clone(self),
            first,
            rx,
            overflowed,
            last,
            ended: false,
            _slot: slot,
        };
        Ok(Box::pin(futures_util::stream::unfold(
            stream,
            |mut s| async move {
                let item = s.next().await?;
                Some((item, s))
            },
        )))
    }
}

fn event_of(change: &Change) -> WatchEvent {
    WatchEvent {
        kind: change.kind,
        vm: Some(Arc::clone(&change.vm)),
        revision: change.revision,
    }
}

/// One open watcher, counted while it lives.
struct WatcherSlot {
    feed: Arc<ChangeFeed>,
}

impl WatcherSlot {
    fn take(feed: &Arc<ChangeFeed>) -> Result<Self, VmError> {
        let max = feed.settings.max_watchers;
        feed.watchers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| {
                VmError::ResourceExhausted(format!(
                    "{max} watchers are open (UNKEY_VMCP_MAX_WATCHERS); close one or retry later"
                ))
            })?;
        feed.telemetry
            .record(TelemetryEvent::WatchersOpen { delta: 1 });
        Ok(Self {
            feed: Arc::clone(feed),
        })
    }
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        self.feed.watchers.fetch_sub(1, Ordering::AcqRel);
        self.feed
            .telemetry
            .record(TelemetryEvent::WatchersOpen { delta: -1 });
    }
}

struct Subscription {
    feed: Arc<ChangeFeed>,
    /// Replayed or initial events, then the synced marker.
    first: VecDeque<WatchEvent>,
    rx: mpsc::Receiver<Arc<Change>>,
    overflowed: Arc<AtomicBool>,
    /// The revision a client has everything up to, after what was yielded.
    last: u64,
    ended: bool,
    _slot: WatcherSlot,
}

impl Subscription {
    async fn next(&mut self) -> Option<Result<WatchEvent, VmError>> {
        let event = self.next_event().await?;
        if let Ok(e) = &event {
            self.last = self.last.max(e.revision);
            self.feed.telemetry.record(TelemetryEvent::WatchSent {
                kind: e.kind.as_str(),
            });
        }
        Some(event)
    }

    async fn next_event(&mut self) -> Option<Result<WatchEvent, VmError>> {
        if let Some(e) = self.first.pop_front() {
            return Some(Ok(e));
        }
        if self.ended {
            return None;
        }
        let heartbeat = self.feed.settings.heartbeat;
        tokio::select! {
            biased;
            change = self.rx.recv() => match change {
                Some(c) => Some(Ok(event_of(&c))),
                None => {
                    self.ended = true;
                    Some(Err(self.why_ended()))
                }
            },
            () = tokio::time::sleep(heartbeat) => {
                // The revision first, then the queue: a change up to that
                // revision is already queued, so it is sent before any
                // heartbeat that claims it.
                let revision = self.feed.revision();
                match self.rx.try_recv() {
                    Ok(c) => Some(Ok(event_of(&c))),
                    Err(_) => Some(Ok(WatchEvent {
                        kind: WatchEventKind::Heartbeat,
                        vm: None,
                        revision: revision.max(self.last),
                    })),
                }
            }
        }
    }

    fn why_ended(&self) -> VmError {
        if self.overflowed.load(Ordering::Acquire) {
            VmError::ResourceExhausted(format!(
                "this watcher fell more than {} changes behind and was dropped; watch again with since_revision={}",
                self.feed.settings.buffer, self.last
            ))
        } else {
            VmError::Unavailable(format!(
                "VMCP is shutting down; watch again with since_revision={} when it is back",
                self.last
            ))
        }
    }
}

#[cfg(test)]
mod tests;
