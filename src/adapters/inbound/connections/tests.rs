//! Tests of connection hygiene: the gate, the refusal log, and driving
//! connections through header and idle timeouts and graceful shutdown.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::drive::{H2_PREFACE, Proto};
use super::*;

#[test]
fn the_gate_caps_per_client_and_in_total_and_frees_on_drop() {
    let gate = Arc::new(ConnectionGate::new(3, 2));
    let a: IpAddr = "10.0.0.1".parse().expect("ip");
    let b: IpAddr = "10.0.0.2".parse().expect("ip");
    let c: IpAddr = "10.0.0.3".parse().expect("ip");
    let a1 = gate.admit(a).expect("a1");
    let a2 = gate.admit(a).expect("a2");
    assert_eq!(gate.admit(a).err(), Some(Refusal::PerClient));
    // The same address written as IPv4-mapped IPv6 is the same client.
    let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
    assert_eq!(gate.admit(mapped).err(), Some(Refusal::PerClient));
    let b1 = gate.admit(b).expect("b1");
    assert_eq!(gate.admit(c).err(), Some(Refusal::Total));
    assert_eq!(gate.open(), 3);
    drop(a1);
    assert_eq!(gate.open(), 2);
    let c1 = gate.admit(c).expect("c1 after a1 left");
    drop((a2, b1, c1));
    assert_eq!(gate.open(), 0);
    assert!(
        gate.per_client.lock().expect("lock").is_empty(),
        "no entry left behind"
    );
}

#[test]
fn refusals_are_logged_at_most_once_per_interval() {
    let t0 = Instant::now();
    let mut log = RefusalLog::new(Duration::from_secs(10));
    assert_eq!(log.note(t0), Some(1), "the first refusal is logged");
    for i in 1..=500u64 {
        assert_eq!(log.note(t0 + Duration::from_millis(i)), None);
    }
    assert_eq!(
        log.note(t0 + Duration::from_secs(10)),
        Some(501),
        "the next line counts the refusals in between"
    );
    assert_eq!(log.note(t0 + Duration::from_secs(11)), None);
}

#[tokio::test]
async fn deadlines_follow_heads_requests_and_idleness() {
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let a = Activity::new();
    let start = a.started;
    assert_eq!(
        a.deadline(&limits),
        Some((start + limits.header_read_timeout, Closed::HeaderTimeout)),
        "the first head is due a header timeout after accept"
    );
    a.read(Some(Proto::Http1));
    let guard = a.begin();
    let second = a.begin();
    assert_eq!(
        a.deadline(&limits),
        None,
        "never idle with a request in flight"
    );
    drop(guard);
    assert_eq!(a.deadline(&limits), None, "one request is still in flight");
    drop(second);
    let idle = a.timing().idle_since;
    assert!(idle >= start);
    assert_eq!(
        a.deadline(&limits),
        Some((idle + limits.idle_timeout, Closed::Idle))
    );
    a.read(None);
    let head = a.timing().head_started.expect("a head started");
    assert_eq!(
        a.deadline(&limits),
        Some((head + limits.header_read_timeout, Closed::HeaderTimeout)),
        "bytes of the next HTTP/1.1 head start the header timer"
    );
    drop(a.begin());
    assert_eq!(a.timing().head_started, None, "a request ends the head");

    let h2 = Activity::new();
    h2.read(Some(Proto::Http2));
    let preface = h2.timing().idle_since;
    assert!(preface >= h2.started);
    assert_eq!(
        h2.deadline(&limits),
        Some((preface + limits.idle_timeout, Closed::Idle)),
        "an HTTP/2 connection past its preface waits for requests up to the idle timeout"
    );
    drop(h2.begin());
    h2.read(None);
    assert!(
        matches!(h2.deadline(&limits), Some((_, Closed::Idle))),
        "HTTP/2 frames between requests do not start a header timer"
    );
}

#[derive(Debug, Clone)]
enum Event {
    /// Bytes arrive (the first of them tell the protocol).
    Read,
    /// A request reaches the service.
    Begin,
    /// The oldest request in flight finishes.
    End,
}

proptest::proptest! {
    /// The driver is never woken by requests or reads: it sleeps until
    /// `next_check` and looks again. That is only sound if no change made
    /// while it sleeps can set a deadline before the one it sleeps until,
    /// and if it never sleeps past the deadline it already knows.
    #[test]
    fn no_change_while_the_driver_sleeps_sets_a_deadline_it_would_miss(
        h2 in proptest::bool::ANY,
        header_ms in 1u64..20_000,
        idle_ms in 1u64..20_000,
        steps in proptest::collection::vec(
            (
                proptest::prop_oneof![
                    proptest::strategy::Just(Event::Read),
                    proptest::strategy::Just(Event::Begin),
                    proptest::strategy::Just(Event::End),
                ],
                0.0f64..1.0,
            ),
            1..40,
        ),
    ) {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let a = Activity::new();
            let mut guards = std::collections::VecDeque::new();
            let mut proto_told = false;
            for (event, when) in steps {
                let now = Instant::now();
                let known = a.deadline(&limits);
                let check = a.next_check(&limits, now);
                assert!(check <= now + limits.header_read_timeout.min(limits.idle_timeout));
                if let Some((at, _)) = known {
                    assert!(check <= at, "sleeps past the deadline it knows");
                }
                // The change happens somewhere before the driver looks again.
                let wait = check.saturating_duration_since(now).mul_f64(when);
                tokio::time::advance(wait).await;
                match event {
                    Event::Read => {
                        let proto = (!proto_told).then_some(if h2 { Proto::Http2 } else { Proto::Http1 });
                        proto_told = true;
                        a.read(proto);
                    }
                    Event::Begin => guards.push_back(a.begin()),
                    Event::End => drop(guards.pop_front()),
                }
                if let Some((at, why)) = a.deadline(&limits) {
                    assert!(
                        at >= check,
                        "{event:?} set a {why:?} deadline {:?} before the driver looks again",
                        check - at
                    );
                }
            }
        });
    }
}

#[tokio::test]
async fn observed_streams_tell_http2_from_http1() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (bytes, want) in [
        (&H2_PREFACE[..], Proto::Http2),
        (&b"GET / HTTP/1.1\r\n"[..], Proto::Http1),
        (&b"PRI * HTTP/1.1"[..], Proto::Http1),
    ] {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut observed = Observed::new(server, Arc::clone(&activity));
        client.write_all(bytes).await.expect("write");
        drop(client);
        let mut sink = Vec::new();
        observed.read_to_end(&mut sink).await.expect("read");
        assert_eq!(activity.timing().proto, want, "{bytes:?}");
    }
}

/// Work deferred on a connection runs right after its next write, not
/// before; once the connection's stream is gone, waiting work has run and
/// later work runs at once.
#[tokio::test]
async fn deferred_work_runs_after_the_next_write_and_never_after_the_end() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut client, server) = tokio::io::duplex(1024);
    let activity = Activity::new();
    let mut observed = Observed::new(server, Arc::clone(&activity));
    let after = activity.after_write();
    let ran = Arc::new(AtomicUsize::new(0));
    let count = |ran: &Arc<AtomicUsize>| {
        let ran = Arc::clone(ran);
        Box::new(move || {
            ran.fetch_add(1, Ordering::SeqCst);
        }) as Deferred
    };

    after.defer(count(&ran));
    after.defer(count(&ran));
    // Reading is not writing.
    client.write_all(b"GET").await.expect("client write");
    let mut head = [0u8; 3];
    observed.read_exact(&mut head).await.expect("read");
    assert_eq!(ran.load(Ordering::SeqCst), 0, "ran before any write");
    observed.write_all(b"answer").await.expect("write");
    assert_eq!(ran.load(Ordering::SeqCst), 2, "did not run after the write");
    let mut answer = [0u8; 6];
    client.read_exact(&mut answer).await.expect("client read");
    assert_eq!(&answer, b"answer");
    // Each piece runs once: another write runs nothing again.
    observed.write_all(b"more").await.expect("write");
    assert_eq!(ran.load(Ordering::SeqCst), 2);

    after.defer(count(&ran));
    drop(observed);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        3,
        "waiting work lost at the end"
    );
    after.defer(count(&ran));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        4,
        "work after the end never ran"
    );
}
