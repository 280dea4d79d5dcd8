//! Changes to one named file in a directory, told by the kernel (inotify)
//! instead of found by polling. One inotify instance serves the whole
//! process (the default per-user limit is 128 instances, far fewer than a
//! host's VMs); each [`Subscription`] follows one file. The file itself is
//! watched when it exists, so writes to its neighbours (a VMM's log and
//! console, which change far more often) do not even wake the reader;
//! until it exists its directory is watched, filtered by the file's name,
//! and a subscriber moves to the file once it is there
//! ([`Subscription::on_file`]), or again when the file was replaced
//! ([`Subscription::watching`]).
//!
//! The instance is read by a thread of its own, blocking in `read`, so it
//! works the same from any tokio runtime (tests run many) and costs nothing
//! until a file changes; after each batch it pauses [`COALESCE`], so a
//! burst of writes wakes it, and each subscriber, about once. A subscriber waits on a [`Notify`]: a change
//! that comes while it is busy leaves a permit, so none is missed. When the
//! kernel's queue overflows, every subscriber is told. Where inotify cannot
//! be had (no instance, or the watch limit reached) [`FileChanges::shared`]
//! or [`FileChanges::subscribe`] fails, and the caller polls instead.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::sync::Notify;

/// What a file watch reports: the file written, truncated, removed or
/// renamed (a removed file's watch then ends with `IGNORED`).
const FILE_WATCHED: WatchFlags = WatchFlags::MODIFY
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF);

/// What a directory watch reports: a name being created, written, removed
/// or renamed in or out.
const DIR_WATCHED: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO);

/// How long the reader pauses after a batch of events before it reads
/// again, so that a burst of writes (a VMM writes each event in two, and
/// several events at a boot) is told once: the kernel merges repeated
/// events that wait in its queue.
const COALESCE: Duration = Duration::from_millis(2);

/// One subscriber of a watch.
struct Subscriber {
    id: u64,
    /// On a directory's watch, the name listened to; `None` on the file's own.
    name: Option<OsString>,
    notify: Arc<Notify>,
}

/// The process's inotify instance and who listens to which watch.
pub struct FileChanges {
    fd: OwnedFd,
    /// Watch descriptor → its subscribers.
    watches: Mutex<HashMap<i32, Vec<Subscriber>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for FileChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileChanges")
            .field("watches", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl FileChanges {
    /// The process-wide instance, made (with its reader thread) on first
    /// use; `None` when inotify is not available, and then for good.
    pub fn shared() -> Option<&'static FileChanges> {
        static SHARED: OnceLock<Option<&'static FileChanges>> = OnceLock::new();
        *SHARED.get_or_init(|| match FileChanges::start() {
            Ok(changes) => Some(changes),
            Err(e) => {
                tracing::warn!(error = %e, "inotify is unavailable; VMM event files are polled");
                None
            }
        })
    }

    /// A new instance, leaked (it lives as long as the process), read by a
    /// thread of its own.
    fn start() -> std::io::Result<&'static FileChanges> {
        let fd = inotify::init(CreateFlags::CLOEXEC)?;
        let changes: &'static FileChanges = Box::leak(Box::new(FileChanges {
            fd,
            watches: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }));
        std::thread::Builder::new()
            .name("vmcp-inotify".into())
            .spawn(move || changes.read_forever())?;
        Ok(changes)
    }

    /// Tells, from now on, of every change to `name` in `dir`: through a
    /// watch of the file if it exists, else of the directory.
    pub fn subscribe(&'static self, dir: &Path, name: &OsStr) -> std::io::Result<Subscription> {
        let notify = Arc::new(Notify::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Held across the watch's creation, so the reader cannot see an
        // event of the new watch before its subscriber is listed.
        let mut watches = self.lock();
        let (wd, name) = match inotify::add_watch(&self.fd, dir.join(name), FILE_WATCHED) {
            Ok(wd) => (wd, None),
            Err(rustix::io::Errno::NOENT) => (
                inotify::add_watch(&self.fd, dir, DIR_WATCHED)?,
                Some(name.to_owned()),
            ),
            Err(e) => return Err(e.into()),
        };
        let on_file = name.is_none();
        watches.entry(wd).or_default().push(Subscriber {
            id,
            name,
            notify: Arc::clone(&notify),
        });
        Ok(Subscription {
            changes: self,
            wd,
            id,
            on_file,
            notify,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Vec<Subscriber>>> {
        self.watches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads events until the instance fails (then subscribers fall back
    /// on their own polling).
    fn read_forever(&self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        loop {
            match reader.next() {
                Ok(event) => {
                    self.tell(event.wd(), event.events(), event.file_name());
                    if reader.is_buffer_empty() {
                        std::thread::sleep(COALESCE);
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the inotify reader stopped; VMM event files are read once a second from now on");
                    return;
                }
            }
        }
    }

    /// Wakes whoever listens to `name` on watch `wd` (everyone, when the
    /// queue overflowed: changes may have been lost).
    fn tell(&self, wd: i32, events: ReadFlags, name: Option<&std::ffi::CStr>) {
        let mut watches = self.lock();
        if events.contains(ReadFlags::QUEUE_OVERFLOW) {
            watches
                .values()
                .flatten()
                .for_each(|s| s.notify.notify_one());
            return;
        }
        if events.contains(ReadFlags::IGNORED) {
            // The watch is gone (its file or directory was removed): tell
            // its subscribers, who find the file gone, and forget it.
            if let Some(subs) = watches.remove(&wd) {
                subs.iter().for_each(|s| s.notify.notify_one());
            }
            return;
        }
        let Some(subs) = watches.get(&wd) else {
            return;
        };
        subs.iter()
            .filter(|s| match (&s.name, name) {
                (None, _) => true,
                (Some(listened), Some(name)) => listened.as_bytes() == name.to_bytes(),
                (Some(_), None) => false,
            })
            .for_each(|s| s.notify.notify_one());
    }
}

/// Changes to one file, told until dropped (which ends the watch once its
/// last subscriber is gone).
#[derive(Debug)]
pub struct Subscription {
    changes: &'static FileChanges,
    wd: i32,
    id: u64,
    on_file: bool,
    notify: Arc<Notify>,
}

impl Subscription {
    /// Returns once the file changed since the last return (at once if it
    /// did while nobody waited).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Whether the file itself is watched (else its directory is, because
    /// the file did not exist when subscribing).
    pub fn on_file(&self) -> bool {
        self.on_file
    }

    /// Whether the watch still holds: a removed file (or directory) ends it.
    pub fn watching(&self) -> bool {
        self.changes
            .lock()
            .get(&self.wd)
            .is_some_and(|subs| subs.iter().any(|s| s.id == self.id))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watches = self.changes.lock();
        let Some(subs) = watches.get_mut(&self.wd) else {
            return;
        };
        subs.retain(|s| s.id != self.id);
        if subs.is_empty() {
            watches.remove(&self.wd);
            // Fails only if the kernel already dropped the watch.
            let _ = inotify::remove_watch(&self.changes.fd, self.wd);
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn shared() -> &'static FileChanges {
        FileChanges::shared().expect("inotify works here")
    }

    async fn told(sub: &Subscription, within: Duration) -> bool {
        tokio::time::timeout(within, sub.changed()).await.is_ok()
    }

    /// Waits (at most 5 s) until `sub`'s watch has ended.
    async fn ends(sub: &Subscription, what: &str) {
        let ended = async {
            while sub.watching() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect(what);
    }

    /// Waits a little, then takes any change already told.
    async fn settle(sub: &Subscription) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = told(sub, Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn an_existing_file_is_watched_itself_and_its_neighbours_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("events.json");
        std::fs::write(&file, b"").expect("create");
        let sub = shared()
            .subscribe(dir.path(), OsStr::new("events.json"))
            .expect("subscribe");
        assert!(sub.on_file() && sub.watching());
        std::fs::write(dir.path().join("serial.log"), b"console output").expect("write");
        assert!(
            !told(&sub, Duration::from_millis(200)).await,
            "another file's change wakes no one"
        );
        std::fs::write(&file, b"{}").expect("write");
        assert!(told(&sub, Duration::from_secs(5)).await, "written");
        settle(&sub).await;
        // Told while nobody waits: kept for the next wait (however late
        // a loaded host lets the reader run, the change is not lost).
        std::fs::remove_file(&file).expect("remove");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(told(&sub, Duration::from_secs(5)).await, "removed");
        ends(&sub, "a removed file's watch ends").await;
    }

    #[tokio::test]
    async fn a_missing_file_is_awaited_in_its_directory_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = shared()
            .subscribe(dir.path(), OsStr::new("events.json"))
            .expect("subscribe");
        assert!(!sub.on_file() && sub.watching());
        std::fs::write(dir.path().join("serial.log"), b"console output").expect("write");
        assert!(
            !told(&sub, Duration::from_millis(200)).await,
            "another name wakes no one"
        );
        std::fs::write(dir.path().join("events.json"), b"{}").expect("create");
        assert!(told(&sub, Duration::from_secs(5)).await, "created");
        let moved = shared()
            .subscribe(dir.path(), OsStr::new("events.json"))
            .expect("subscribe again");
        assert!(moved.on_file(), "once it exists, the file itself");
    }

    #[tokio::test]
    async fn two_subscribers_of_one_directory_share_a_watch_until_both_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = shared()
            .subscribe(dir.path(), OsStr::new("a"))
            .expect("subscribe a");
        let b = shared()
            .subscribe(dir.path(), OsStr::new("b"))
            .expect("subscribe b");
        assert_eq!(a.wd, b.wd, "one watch for the directory");
        std::fs::write(dir.path().join("b"), b"x").expect("write");
        assert!(told(&b, Duration::from_secs(5)).await);
        assert!(!told(&a, Duration::from_millis(100)).await, "a is not b");
        drop(b);
        std::fs::write(dir.path().join("a"), b"x").expect("write");
        assert!(told(&a, Duration::from_secs(5)).await, "a still watches");
        let dir_watch = a.wd;
        drop(a);
        assert!(
            !shared().lock().contains_key(&dir_watch),
            "the directory's watch ended with its last subscriber"
        );
    }

    #[tokio::test]
    async fn a_removed_directory_ends_its_watch_and_says_so() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("vm");
        std::fs::create_dir(&dir).expect("mkdir");
        let sub = shared()
            .subscribe(&dir, OsStr::new("events.json"))
            .expect("subscribe");
        std::fs::remove_dir(&dir).expect("rmdir");
        assert!(told(&sub, Duration::from_secs(5)).await, "told of the end");
        ends(&sub, "the watch is forgotten").await;
    }
}
