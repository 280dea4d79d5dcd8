//! Cloud Hypervisor's event monitor, watched. Every `cloud-hypervisor` VMCP
//! starts writes its events to `<runtime dir>/events.json`
//! (`--event-monitor path=…`): a regular file rather than a FIFO, so the
//! VMM never blocks on (or dies with) a reader while VMCP is down. CH writes
//! one pretty-printed JSON object per event, back to back, e.g.
//! `{"timestamp":{…},"source":"vm","event":"paused","properties":null}`,
//! also for changes another client made directly on the VMM's socket.
//!
//! The watcher tails the file and, after each batch of new `vm/*` events
//! that ends with a finished step (`paused`, not `pausing`),
//! re-reads `vm.info` and reports the state the VMM gives as
//! [`VmmEvent::StateChanged`] (the event names what happened; the state is
//! the VMM's word afterwards, so a batch is one read and never stale). Events
//! that arrived during that read are newer than the batch, and the state read
//! may already be theirs: the newest then becomes the reason and the state is
//! read again, so a reason always names what led to the state it comes with.
//! The kernel says when the file changes (inotify, through
//! [`FileChanges`]): a change reaches the owner within a `vm.info` round
//! trip (about 0.1–0.4 ms on CH v53), and an idle VM costs one look at the
//! file every [`BACKSTOP`]. Without inotify the file is polled every
//! [`POLL`], which cost about 0.6 ms of CPU per second per idle VM here.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::adapters::outbound::vmm::Watch;
use crate::adapters::outbound::vmm::file_changes::{FileChanges, Subscription};
use crate::ports::VmmEvent;

use super::client::ChApi;

/// The event file in a VM's runtime directory.
pub const EVENTS_FILE: &str = "events.json";
/// How often the event file is read when the kernel cannot tell its changes.
pub const POLL: Duration = Duration::from_millis(50);
/// How often the event file is read anyway when the kernel tells its changes.
pub const BACKSTOP: Duration = Duration::from_secs(1);

/// One event as CH writes it (timestamp and properties are not needed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Event {
    /// `vmm` or `vm` (also device sources such as `virtio-device`).
    pub source: String,
    /// What happened: `booted`, `paused`, `resumed`, `shutdown`, …
    pub event: String,
}

/// Takes every complete event off the front of `buf`, leaving an object
/// still being written for the next read. Objects that are JSON but not
/// events are skipped; bytes that are not JSON at all are dropped so the
/// stream can resynchronise on the next object.
pub fn drain_events(buf: &mut Vec<u8>) -> Vec<Event> {
    let mut events = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
    let consumed = loop {
        match stream.next() {
            Some(Ok(value)) => {
                if let Ok(event) = serde_json::from_value::<Event>(value) {
                    events.push(event);
                }
            }
            // Only whitespace is left, or a partial object: keep it.
            None => break stream.byte_offset(),
            Some(Err(e)) if e.is_eof() => break stream.byte_offset(),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "unreadable Cloud Hypervisor event stream; skipping it");
                break buf.len();
            }
        }
    };
    buf.drain(..consumed);
    events
}

/// What was appended to `path` since `offset`, the new offset, and whether
/// the file was started over (shorter than `offset`: read from the start).
/// A `stat` comes first, so the usual poll with nothing new opens nothing.
fn read_from(path: &Path, offset: u64) -> std::io::Result<(Vec<u8>, u64, bool)> {
    let len = std::fs::metadata(path)?.len();
    if len == offset {
        return Ok((Vec::new(), offset, false));
    }
    let restarted = len < offset;
    let from = if restarted { 0 } else { offset };
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let end = from + bytes.len() as u64;
    Ok((bytes, end, restarted))
}

/// Reads what was appended to `path` since `offset` onto `pending`,
/// advancing `offset`, and returns the newest complete `vm` event in it.
fn newest_vm_event(
    path: &Path,
    offset: &mut u64,
    pending: &mut Vec<u8>,
) -> std::io::Result<Option<Event>> {
    let (bytes, end, restarted) = read_from(path, *offset)?;
    if restarted {
        pending.clear();
    }
    *offset = end;
    pending.extend_from_slice(&bytes);
    Ok(drain_events(pending)
        .into_iter()
        .rev()
        .find(|e| e.source == "vm"))
}

/// Whether CH's `event` names a step still under way (`pausing`,
/// `resuming`, `booting`, …): its outcome (`paused`, …) follows as an
/// event of its own, so the state is read then, once. A step that fails
/// leaves the state as it was, and the periodic sample confirms it.
fn in_progress(event: &str) -> bool {
    event.ends_with("ing")
}

/// Changes to the VM's event file, told by the kernel; `None` (the file is
/// polled) when they cannot be.
fn subscribe(w: &Watch) -> Option<Subscription> {
    let changes = FileChanges::shared()?;
    match changes.subscribe(w.runtime.path(), std::ffi::OsStr::new(EVENTS_FILE)) {
        Ok(subscription) => Some(subscription),
        Err(e) => {
            tracing::debug!(vm_id = %w.vm_id, error = %e, "cannot watch the event file; polling it");
            None
        }
    }
}

/// Tails the VM's event file until the task is ended (by the supervision
/// layer, with the process or the handle) or the owner goes away.
pub async fn watch(w: Watch) {
    let path = w.runtime.path().join(EVENTS_FILE);
    // An adopted VMM's past events were seen by the VMCP that started it.
    let mut offset = if w.fresh {
        0
    } else {
        std::fs::metadata(&path).map_or(0, |m| m.len())
    };
    let mut pending = Vec::new();
    let mut changes = subscribe(&w);
    let mut tick = tokio::time::interval(if changes.is_some() { BACKSTOP } else { POLL });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match &changes {
            Some(changes) => tokio::select! {
                _ = tick.tick() => {}
                () = changes.changed() => {}
            },
            None => {
                tick.tick().await;
            }
        }
        // Follow the file itself once it exists, and again once replaced.
        if changes
            .as_ref()
            .is_some_and(|c| !c.on_file() || !c.watching())
            && let Some(fresh) = subscribe(&w)
        {
            changes = Some(fresh);
        }
        let mut last = match newest_vm_event(&path, &mut offset, &mut pending) {
            Ok(Some(last)) => last,
            Ok(None) => continue,
            // Not created yet (or a VMM started without a monitor): look again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::debug!(vm_id = %w.vm_id, error = %e, "cannot read the event file");
                continue;
            }
        };
        // The state is read after the events that prompted it; events that
        // came meanwhile are newer than `last`, and the state read may already
        // be theirs (a pause made right after a boot): read the state again
        // with the newest as the reason, so that a reason names what the VM
        // went through to reach the state it comes with.
        let read = loop {
            if in_progress(&last.event) {
                break None;
            }
            let state = ChApi::new(&w.http, &w.socket).state().await;
            match newest_vm_event(&path, &mut offset, &mut pending) {
                Ok(Some(newest)) => last = newest,
                _ => break Some(state),
            }
        };
        let Some(state) = read else {
            continue;
        };
        let reason = format!("{}/{}", last.source, last.event);
        match state {
            Ok(state) => {
                let event = VmmEvent::StateChanged {
                    pid: w.pid,
                    state,
                    reason,
                };
                if w.events.send(event).is_err() {
                    return;
                }
            }
            // E.g. `vm/shutdown` while the VMM exits: the reaper tells that.
            Err(e) => {
                tracing::debug!(vm_id = %w.vm_id, %reason, error = %e, "no state after a VMM event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two events as CH v53 writes them: pretty-printed, back to back.
    const TWO: &str = r#"{
  "timestamp": {
    "secs": 0,
    "nanos": 315741983
  },
  "source": "vm",
  "event": "pausing",
  "properties": null
}{
  "timestamp": {
    "secs": 0,
    "nanos": 315800000
  },
  "source": "vm",
  "event": "paused",
  "properties": null
}"#;

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| format!("{}/{}", e.source, e.event))
            .collect()
    }

    #[test]
    fn steps_under_way_wait_for_their_outcome() {
        for event in [
            "booting",
            "pausing",
            "resuming",
            "rebooting",
            "resizing",
            "restoring",
        ] {
            assert!(in_progress(event), "{event}");
        }
        for event in [
            "booted", "paused", "resumed", "rebooted", "shutdown", "deleted",
        ] {
            assert!(!in_progress(event), "{event}");
        }
    }

    #[test]
    fn back_to_back_objects_are_all_read() {
        let mut buf = TWO.as_bytes().to_vec();
        assert_eq!(names(&drain_events(&mut buf)), ["vm/pausing", "vm/paused"]);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_object_waits_for_the_rest() {
        let split = TWO.len() - 20;
        let mut buf = TWO.as_bytes()[..split].to_vec();
        assert_eq!(names(&drain_events(&mut buf)), ["vm/pausing"]);
        assert!(!buf.is_empty(), "the partial second object is kept");
        buf.extend_from_slice(&TWO.as_bytes()[split..]);
        assert_eq!(names(&drain_events(&mut buf)), ["vm/paused"]);
        assert!(buf.is_empty());
    }

    #[test]
    fn non_events_are_skipped_and_garbage_dropped() {
        let mut buf = br#"{"other": 1}{"source":"vmm","event":"starting"}"#.to_vec();
        assert_eq!(names(&drain_events(&mut buf)), ["vmm/starting"]);
        let mut garbage = b"not json {".to_vec();
        assert!(drain_events(&mut garbage).is_empty());
        assert!(garbage.is_empty(), "resynchronises on the next write");
    }

    #[test]
    fn reading_follows_appends_and_restarts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join(EVENTS_FILE);
        std::fs::write(&p, b"abc").expect("write");
        let (bytes, end, restarted) = read_from(&p, 0).expect("read");
        assert_eq!((bytes.as_slice(), end, restarted), (&b"abc"[..], 3, false));
        std::fs::write(&p, b"abcdef").expect("write");
        let (bytes, end, _) = read_from(&p, 3).expect("read");
        assert_eq!((bytes.as_slice(), end), (&b"def"[..], 6));
        std::fs::write(&p, b"xy").expect("truncated");
        let (bytes, end, restarted) = read_from(&p, 6).expect("read");
        assert_eq!((bytes.as_slice(), end, restarted), (&b"xy"[..], 2, true));
    }
}

#[cfg(test)]
mod race_tests {
    use super::*;
    use crate::adapters::outbound::vmm::process::RuntimeDir;
    use crate::adapters::outbound::vmm::uds_http::UdsClient;
    use crate::domain::{VmId, VmState};
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn event(name: &str) -> String {
        format!(
            r#"{{"timestamp":{{"secs":0,"nanos":1}},"source":"vm","event":"{name}","properties":null}}"#
        )
    }

    /// A VMM on `listener` whose every `vm.info` answers `Paused`; before
    /// its first answer it appends a pause's events to `events`, as if
    /// another client paused the VM just before the watcher's read.
    async fn pausing_vmm(listener: tokio::net::UnixListener, events: std::path::PathBuf) {
        let first = Arc::new(AtomicBool::new(true));
        while let Ok((stream, _)) = listener.accept().await {
            let (first, events) = (first.clone(), events.clone());
            let svc = service_fn(move |_: http::Request<hyper::body::Incoming>| {
                if first.swap(false, Ordering::SeqCst) {
                    let mut file = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&events)
                        .unwrap();
                    let pause = event("pausing") + &event("paused");
                    file.write_all(pause.as_bytes()).unwrap();
                }
                let body = Full::new(Bytes::from_static(br#"{"state":"Paused"}"#));
                async move { http::Response::builder().status(200).body(body) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    }

    /// The state read after a boot's event is already the pause's that came
    /// meanwhile: it is reported with the pause as its reason, not the boot.
    #[tokio::test]
    async fn a_state_read_after_newer_events_comes_with_the_newest_as_its_reason() {
        let root = tempfile::tempdir().unwrap();
        let id = VmId::parse("raced").unwrap();
        let runtime = RuntimeDir::new(root.path(), &id);
        runtime.prepare().unwrap();
        let events_file = runtime.path().join(EVENTS_FILE);
        std::fs::write(&events_file, event("booting") + &event("booted")).unwrap();
        let socket = runtime.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let vmm = tokio::spawn(pausing_vmm(listener, events_file));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch(Watch {
            vm_id: id,
            pid: 7,
            socket,
            runtime,
            http: UdsClient::new(Duration::from_secs(1)),
            events: tx,
            fresh: true,
        }));
        let reported = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a state change within 5 s")
            .expect("the watcher runs");
        watcher.abort();
        vmm.abort();
        let VmmEvent::StateChanged { pid, state, reason } = reported else {
            panic!("expected a state change, got {reported:?}");
        };
        assert_eq!((pid, state), (7, VmState::Paused));
        assert_eq!(reason, "vm/paused");
    }
}
