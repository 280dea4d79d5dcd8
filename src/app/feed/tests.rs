//! The change feed: revision order, resumes, filters, slow watchers, shutdown.

use super::*;
use crate::domain::config::tests::valid;
use crate::domain::{Desired, VmConfig};
use crate::ports::NoopTelemetry;
use futures_util::StreamExt;
use proptest::prelude::*;

fn vm(id: &str, state: VmState, generation: u64) -> VmSnapshot {
    VmSnapshot {
        id: VmId::parse(id).expect("id"),
        config: VmConfig { ..valid() },
        state,
        reason: String::new(),
        generation,
        created_at: 1,
        modified_at: 1,
        desired: Desired::Created,
        deleted: false,
        revision: 0,
    }
}

fn settings(history: usize, buffer: usize) -> WatchSettings {
    WatchSettings {
        history,
        buffer,
        max_watchers: 4,
        heartbeat: Duration::from_secs(3600),
    }
}

fn change(
    feed: &ChangeFeed,
    kind: WatchEventKind,
    id: &str,
    before: Option<VmState>,
    state: VmState,
) -> u64 {
    let rec = feed.record();
    let revision = rec.revision();
    let mut snap = vm(id, state, revision);
    snap.revision = revision;
    rec.commit(kind, Arc::new(snap), before);
    revision
}

async fn take(stream: &mut WatchStream, n: usize) -> Vec<(WatchEventKind, Option<String>, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let e = stream
            .next()
            .await
            .expect("an event")
            .expect("not an error");
        out.push((e.kind, e.vm.map(|v| v.id.to_string()), e.revision));
    }
    out
}

async fn revisions(stream: &mut WatchStream, n: usize) -> Vec<u64> {
    take(stream, n).await.iter().map(|e| e.2).collect()
}

#[tokio::test]
async fn revisions_continue_after_the_store_and_a_resume_replays_what_followed() {
    let feed = ChangeFeed::new(10, settings(8, 8), Arc::new(NoopTelemetry));
    assert_eq!(
        change(&feed, WatchEventKind::Added, "a", None, VmState::Created),
        11
    );
    assert_eq!(
        change(
            &feed,
            WatchEventKind::Changed,
            "a",
            Some(VmState::Created),
            VmState::Running
        ),
        12
    );
    let q = WatchQuery {
        since_revision: Some(11),
        ..Default::default()
    };
    let mut s = feed.subscribe(q, Vec::new).expect("watch");
    assert_eq!(
        take(&mut s, 2).await,
        [
            (WatchEventKind::Changed, Some("a".into()), 12),
            (WatchEventKind::Synced, None, 12)
        ]
    );
    change(
        &feed,
        WatchEventKind::Deleted,
        "a",
        Some(VmState::Running),
        VmState::Running,
    );
    assert_eq!(
        take(&mut s, 1).await,
        [(WatchEventKind::Deleted, Some("a".into()), 13)]
    );
}

#[tokio::test]
async fn a_revision_older_than_the_history_or_newer_than_the_host_is_out_of_range() {
    let feed = ChangeFeed::new(0, settings(2, 8), Arc::new(NoopTelemetry));
    for id in ["a", "b", "c", "d"] {
        change(&feed, WatchEventKind::Added, id, None, VmState::Created);
    }
    // History holds 3 and 4: resuming after 2 is complete, after 1 is not.
    let at = |since| WatchQuery {
        since_revision: Some(since),
        ..Default::default()
    };
    let mut s = feed
        .subscribe(at(2), Vec::new)
        .expect("resume at the floor");
    assert_eq!(revisions(&mut s, 3).await, [3, 4, 4]);
    for since in [1, 5] {
        match feed.subscribe(at(since), Vec::new) {
            Err(VmError::OutOfRange(m)) => {
                assert!(m.contains(&format!("since_revision {since}")), "{m}");
                assert!(m.contains("list"), "{m}");
            }
            Err(e) => panic!("since {since}: {e}"),
            Ok(_) => panic!("since {since} accepted"),
        }
    }
}

#[tokio::test]
async fn send_initial_lists_matching_vms_then_syncs_and_refuses_a_resume_with_it() {
    let feed = ChangeFeed::new(5, settings(8, 8), Arc::new(NoopTelemetry));
    let mut a = vm("a", VmState::Running, 3);
    a.revision = 4;
    let b = vm("b", VmState::Shutdown, 1);
    let current = vec![Arc::new(a), Arc::new(b)];
    let q = WatchQuery {
        states: vec![VmState::Running],
        send_initial: true,
        ..Default::default()
    };
    let mut s = feed.subscribe(q, || current.clone()).expect("watch");
    assert_eq!(
        take(&mut s, 2).await,
        [
            (WatchEventKind::Added, Some("a".into()), 4),
            (WatchEventKind::Synced, None, 5)
        ]
    );
    let both = WatchQuery {
        send_initial: true,
        since_revision: Some(5),
        ..Default::default()
    };
    assert!(matches!(
        feed.subscribe(both, Vec::new),
        Err(VmError::InvalidArgument(e)) if e.to_string().contains("since_revision")
    ));
}

#[tokio::test]
async fn a_state_filter_sends_changes_into_and_out_of_its_states_only() {
    let feed = ChangeFeed::new(0, settings(8, 8), Arc::new(NoopTelemetry));
    let q = WatchQuery {
        states: vec![VmState::Running],
        vm_ids: vec![VmId::parse("a").expect("id")],
        ..Default::default()
    };
    let mut s = feed.subscribe(q, Vec::new).expect("watch");
    assert_eq!(take(&mut s, 1).await[0].0, WatchEventKind::Synced);
    use VmState::*;
    use WatchEventKind::*;
    let changes = [
        (Added, "a", None, Created),              // 1: not wanted
        (Changed, "b", Some(Created), Running),   // 2: another VM
        (Changed, "a", Some(Created), Running),   // 3: into Running
        (Changed, "a", Some(Running), Paused),    // 4: out of Running
        (Changed, "a", Some(Paused), Shutdown),   // 5: neither
        (Deleted, "a", Some(Shutdown), Shutdown), // 6: neither
        (Added, "a", None, Running),              // 7: into Running
    ];
    for (kind, id, before, state) in changes {
        change(&feed, kind, id, before, state);
    }
    assert_eq!(revisions(&mut s, 3).await, [3, 4, 7]);
}

#[tokio::test]
async fn a_full_watcher_is_dropped_without_blocking_and_told_where_to_resume() {
    let feed = ChangeFeed::new(0, settings(64, 2), Arc::new(NoopTelemetry));
    let mut slow = feed
        .subscribe(WatchQuery::default(), Vec::new)
        .expect("watch");
    let mut fast = feed
        .subscribe(WatchQuery::default(), Vec::new)
        .expect("watch");
    assert_eq!(take(&mut slow, 1).await[0].0, WatchEventKind::Synced);
    assert_eq!(take(&mut fast, 1).await[0].0, WatchEventKind::Synced);
    for i in 0..5 {
        change(
            &feed,
            WatchEventKind::Added,
            &format!("vm{i}"),
            None,
            VmState::Created,
        );
        // The fast watcher keeps up; the slow one reads nothing.
        assert_eq!(take(&mut fast, 1).await[0].2, i + 1);
    }
    // The slow one gets what fitted (1, 2), then the error naming revision 2.
    assert_eq!(revisions(&mut slow, 2).await, [1, 2]);
    match slow.next().await {
        Some(Err(VmError::ResourceExhausted(m))) => {
            assert!(m.contains("since_revision=2"), "{m}")
        }
        other => panic!("expected resource_exhausted, got {other:?}"),
    }
    assert!(
        slow.next().await.is_none(),
        "the stream ends after its error"
    );
    // Resuming from there replays the rest.
    let q = WatchQuery {
        since_revision: Some(2),
        ..Default::default()
    };
    let mut again = feed.subscribe(q, Vec::new).expect("resume");
    assert_eq!(revisions(&mut again, 4).await, [3, 4, 5, 5]);
}

#[tokio::test]
async fn watchers_are_limited_and_counted_until_their_stream_is_dropped() {
    let feed = ChangeFeed::new(0, settings(8, 8), Arc::new(NoopTelemetry));
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(
            feed.subscribe(WatchQuery::default(), Vec::new)
                .expect("watch"),
        );
    }
    assert_eq!(feed.watchers(), 4);
    assert!(matches!(
        feed.subscribe(WatchQuery::default(), Vec::new),
        Err(VmError::ResourceExhausted(m)) if m.contains("UNKEY_VMCP_MAX_WATCHERS")
    ));
    open.pop();
    assert_eq!(feed.watchers(), 3);
    let _again = feed
        .subscribe(WatchQuery::default(), Vec::new)
        .expect("a slot is free again");
}

#[tokio::test]
async fn close_ends_every_stream_with_unavailable_and_refuses_new_ones() {
    let feed = ChangeFeed::new(0, settings(8, 8), Arc::new(NoopTelemetry));
    let mut s = feed
        .subscribe(WatchQuery::default(), Vec::new)
        .expect("watch");
    change(&feed, WatchEventKind::Added, "a", None, VmState::Created);
    feed.close();
    assert_eq!(revisions(&mut s, 2).await, [0, 1]);
    match s.next().await {
        Some(Err(VmError::Unavailable(m))) => assert!(m.contains("since_revision=1"), "{m}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(matches!(
        feed.subscribe(WatchQuery::default(), Vec::new),
        Err(VmError::Unavailable(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_quiet_stream_gets_heartbeats_with_the_current_revision() {
    let mut st = settings(8, 8);
    st.heartbeat = Duration::from_secs(15);
    let feed = ChangeFeed::new(7, st, Arc::new(NoopTelemetry));
    let mut s = feed
        .subscribe(
            WatchQuery {
                vm_ids: vec![VmId::parse("a").expect("id")],
                ..Default::default()
            },
            Vec::new,
        )
        .expect("watch");
    assert_eq!(take(&mut s, 1).await, [(WatchEventKind::Synced, None, 7)]);
    // A change the filter does not want still moves the heartbeat's revision.
    change(&feed, WatchEventKind::Added, "b", None, VmState::Created);
    let started = tokio::time::Instant::now();
    assert_eq!(
        take(&mut s, 1).await,
        [(WatchEventKind::Heartbeat, None, 8)]
    );
    assert_eq!(started.elapsed(), Duration::from_secs(15));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any mix of changes, history size and resume point: a watcher that
    /// resumes gets exactly the changes after its revision, in order,
    /// or a clear out_of_range when they are no longer all kept.
    #[test]
    fn a_resume_gets_exactly_the_changes_after_its_revision(
        start in 0u64..5,
        n in 0usize..30,
        history in 1usize..12,
        since_back in 0u64..35,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("rt");
        rt.block_on(async {
            let feed = ChangeFeed::new(start, settings(history, 64), Arc::new(NoopTelemetry));
            for i in 0..n {
                change(&feed, WatchEventKind::Added, &format!("vm{i}"), None, VmState::Created);
            }
            let top = start + n as u64;
            let since = top.saturating_sub(since_back);
            let q = WatchQuery { since_revision: Some(since), ..Default::default() };
            let kept_from = top.saturating_sub(history as u64).max(start);
            match feed.subscribe(q, Vec::new) {
                Ok(mut s) => {
                    prop_assert!(since >= kept_from, "since {} < floor {}", since, kept_from);
                    let want: Vec<u64> = (since + 1..=top).collect();
                    let got = take(&mut s, want.len() + 1).await;
                    prop_assert_eq!(got.iter().take(want.len()).map(|e| e.2).collect::<Vec<_>>(), want);
                    prop_assert_eq!(got.last().map(|e| (e.0, e.2)), Some((WatchEventKind::Synced, top)));
                }
                Err(VmError::OutOfRange(_)) => prop_assert!(since < kept_from),
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
            Ok(())
        })?;
    }
}

proptest! {
    /// Owners take tickets and settle them in any order, committing a
    /// change or dropping the ticket (a cancelled owner). Whatever the
    /// order: the published revision is the longest settled prefix, a
    /// watcher gets exactly the committed changes of that prefix in
    /// revision order, and a ticket never holds up the feed once settled.
    #[test]
    fn commits_in_any_order_are_published_in_revision_order(
        start in 0u64..5,
        settles in proptest::collection::vec((0usize..8, proptest::bool::ANY), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("rt");
        rt.block_on(async {
            let feed = ChangeFeed::new(start, settings(1000, 1000), Arc::new(NoopTelemetry));
            let q = WatchQuery::default();
            let mut s = feed.subscribe(q, Vec::new).expect("watch");
            prop_assert_eq!(take(&mut s, 1).await[0].0, WatchEventKind::Synced);
            let mut open: Vec<Recording<'_>> = Vec::new();
            let mut settled = BTreeMap::new();
            for (pick, commit) in settles {
                // Keep a few tickets open, as concurrent owners would.
                while open.len() < 4 {
                    open.push(feed.record());
                }
                let rec = open.remove(pick % open.len());
                let revision = rec.revision();
                if commit {
                    let mut snap = vm(&format!("vm{revision}"), VmState::Created, 1);
                    snap.revision = revision;
                    rec.commit(WatchEventKind::Added, Arc::new(snap), None);
                } else {
                    drop(rec);
                }
                settled.insert(revision, commit);
                let prefix = (start + 1..).take_while(|r| settled.contains_key(r)).last().unwrap_or(start);
                prop_assert_eq!(feed.revision(), prefix);
            }
            // The tickets still open are dropped: every one issued is settled.
            let issued = settled.len() + open.len();
            drop(open);
            prop_assert_eq!(feed.revision(), start + issued as u64);
            let want: Vec<u64> = settled
                .iter()
                .filter(|&(_, &committed)| committed)
                .map(|(&r, _)| r)
                .collect();
            let got: Vec<u64> = take(&mut s, want.len()).await.iter().map(|e| e.2).collect();
            prop_assert_eq!(got, want);
            Ok(())
        })?;
    }
}
