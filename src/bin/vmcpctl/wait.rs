//! `--wait`: block until a VM reaches a state, or the timeout passes.
//!
//! [`wait_for`] watches the one VM (WatchVms with `send_initial`): its
//! current state first, then every change, so the wait ends as soon as the
//! state is reached, with no polling. A server without WatchVms
//! (`unimplemented`) is polled with GetVmInfo every [`POLL_INTERVAL`]
//! instead. Either way the outcomes are the same: reached, not found,
//! failed instead, timed out.

use std::time::Duration;

use connectrpc::client::CallOptions;
use connectrpc::{ConnectError, ErrorCode};
use tokio::time::Instant;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::WatchEventType as T;

use crate::cli::WaitState;
use crate::connect::Client;
use crate::error::CtlError;
use crate::output::state_name;

/// How often the state is read while waiting on a server without WatchVms.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// However short the wait, a call gets at least this long to answer (`--timeout 0`
/// checks once).
const MIN_CALL: Duration = Duration::from_secs(1);
/// The pause before watching again after the server went away.
const RETRY: Duration = Duration::from_millis(200);

/// What the wait saw last.
#[derive(Debug)]
pub enum Reached {
    /// The VM is in the state (its info as read then).
    State(Box<pb::GetVmInfoResponse>),
    /// The VM does not exist (the target was `deleted`).
    Deleted,
}

/// Waits until `vm_id` is in `target`, for at most `timeout` (0 checks once).
///
/// A VM that does not exist is `not_found` (exit 3) unless the target is
/// `deleted`, which it then satisfies at once; a VM that turns FAILED while
/// waiting for another state ends the wait (exit 4), since only delete can
/// follow. The server being unavailable (a restart) is retried until the timeout.
pub async fn wait_for(
    client: &Client,
    vm_id: &str,
    target: WaitState,
    timeout: Duration,
) -> Result<Reached, CtlError> {
    let deadline = Instant::now() + timeout;
    let mut last = "nothing yet".to_owned();
    loop {
        match watch_once(client, vm_id, target, deadline, &mut last).await {
            Watched::Done(result) => return result,
            Watched::Unimplemented => return poll(client, vm_id, target, deadline, timeout).await,
            Watched::Again if Instant::now() + RETRY < deadline => {
                tokio::time::sleep(RETRY).await;
            }
            Watched::Again | Watched::TimedOut => {
                return Err(timed_out(vm_id, target, last, timeout));
            }
        }
    }
}

/// How one watch of the VM ended.
enum Watched {
    /// The wait is over.
    Done(Result<Reached, CtlError>),
    /// The server has no WatchVms.
    Unimplemented,
    /// The server went away (or ended the call) before the end: watch again.
    Again,
    /// The deadline passed.
    TimedOut,
}

/// One WatchVms call on `vm_id` with `send_initial`, until the wait is decided.
async fn watch_once(
    client: &Client,
    vm_id: &str,
    target: WaitState,
    deadline: Instant,
    last: &mut String,
) -> Watched {
    let request = pb::WatchVmsRequest {
        vm_ids: vec![vm_id.to_owned()],
        send_initial: true,
        ..Default::default()
    };
    // The initial state is read even when the deadline is (nearly) over. The call
    // outlives the wait by a moment, so that the wait's own deadline ends it.
    let initial_until = deadline.max(Instant::now() + MIN_CALL);
    let options = CallOptions::default()
        .with_timeout(initial_until.saturating_duration_since(Instant::now()) + MIN_CALL);
    let stream = tokio::time::timeout_at(
        initial_until,
        client.watch_vms_with_options(request, options),
    )
    .await;
    let mut stream = match stream {
        Err(_) => return Watched::TimedOut,
        Ok(Err(e)) => return ended(e, last),
        Ok(Ok(stream)) => stream,
    };
    let mut synced = false;
    let mut seen = false;
    loop {
        let until = if synced { deadline } else { initial_until };
        let m = match tokio::time::timeout_at(until, stream.message()).await {
            Err(_) => return Watched::TimedOut,
            Ok(Err(e)) => return ended(e, last),
            // A watch does not end by itself; watch again.
            Ok(Ok(None)) => return Watched::Again,
            Ok(Ok(Some(m))) => m.to_owned_message(),
        };
        match m.r#type.as_known() {
            Some(T::WATCH_EVENT_TYPE_ADDED | T::WATCH_EVENT_TYPE_CHANGED) => {
                let Some(vm) = m.vm.as_option() else {
                    continue;
                };
                seen = true;
                let state = vm.state.as_known().unwrap_or_default();
                *last = state_name(state).to_owned();
                if state == pb::VmState::VM_STATE_FAILED && wanted(target) != Some(state) {
                    return Watched::Done(Err(failed(vm_id, target, vm.state_reason.clone())));
                }
                if wanted(target) == Some(state) {
                    // The full info, as `info` shows it; read again should the VM have
                    // moved on in between, so what is printed is in the state.
                    match read(client, vm_id, target, CallOptions::default()).await {
                        Checked::Reached(r) => return Watched::Done(r),
                        Checked::Not(state) => *last = state,
                        Checked::Again(why) => {
                            *last = why;
                            return Watched::Again;
                        }
                    }
                }
            }
            Some(T::WATCH_EVENT_TYPE_DELETED) => return Watched::Done(gone(vm_id, target)),
            Some(T::WATCH_EVENT_TYPE_SYNCED) => {
                synced = true;
                if !seen {
                    return Watched::Done(gone(vm_id, target));
                }
                if Instant::now() >= deadline {
                    return Watched::TimedOut;
                }
            }
            _ => {}
        }
    }
}

/// What a watch that ended with `e` means for the wait.
fn ended(e: ConnectError, last: &mut String) -> Watched {
    match e.code {
        ErrorCode::Unimplemented => Watched::Unimplemented,
        ErrorCode::Unavailable => {
            *last = e.to_string();
            Watched::Again
        }
        // The server's cap on deadlines: the last state seen still stands.
        ErrorCode::DeadlineExceeded => Watched::Again,
        _ => Watched::Done(Err(e.into())),
    }
}

/// The VM does not exist (any more).
fn gone(vm_id: &str, target: WaitState) -> Result<Reached, CtlError> {
    match target {
        WaitState::Deleted => Ok(Reached::Deleted),
        _ => Err(CtlError::Rpc(ConnectError::not_found(format!(
            "vm {vm_id:?} not found"
        )))),
    }
}

fn failed(vm_id: &str, target: WaitState, reason: String) -> CtlError {
    CtlError::WaitFailed {
        vm_id: vm_id.to_owned(),
        target: target_name(target),
        reason,
    }
}

fn timed_out(vm_id: &str, target: WaitState, last: String, after: Duration) -> CtlError {
    CtlError::WaitTimeout {
        vm_id: vm_id.to_owned(),
        target: target_name(target),
        last,
        after,
    }
}

/// What one GetVmInfo said about the wait.
enum Checked {
    /// The wait is over.
    Reached(Result<Reached, CtlError>),
    /// Not there yet: the state seen.
    Not(String),
    /// The server could not answer now.
    Again(String),
}

/// Reads the VM once.
async fn read(client: &Client, vm_id: &str, target: WaitState, options: CallOptions) -> Checked {
    let request = pb::GetVmInfoRequest {
        vm_id: vm_id.to_owned(),
        ..Default::default()
    };
    match client.get_vm_info_with_options(request, options).await {
        Ok(resp) => {
            let info = resp.into_owned();
            let state = info.state.as_known().unwrap_or_default();
            if wanted(target) == Some(state) {
                return Checked::Reached(Ok(Reached::State(Box::new(info))));
            }
            if state == pb::VmState::VM_STATE_FAILED {
                return Checked::Reached(Err(failed(vm_id, target, info.state_reason)));
            }
            Checked::Not(state_name(state).to_owned())
        }
        Err(e) if e.code == ErrorCode::NotFound => Checked::Reached(match target {
            WaitState::Deleted => Ok(Reached::Deleted),
            _ => Err(e.into()),
        }),
        Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::DeadlineExceeded) => {
            Checked::Again(e.to_string())
        }
        Err(e) => Checked::Reached(Err(e.into())),
    }
}

/// The wait on a server without WatchVms: GetVmInfo every [`POLL_INTERVAL`].
async fn poll(
    client: &Client,
    vm_id: &str,
    target: WaitState,
    deadline: Instant,
    timeout: Duration,
) -> Result<Reached, CtlError> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // One poll may take what is left of the wait, and at least a moment.
        let options = CallOptions::default().with_timeout(remaining.max(POLL_INTERVAL));
        let last = match read(client, vm_id, target, options).await {
            Checked::Reached(result) => return result,
            Checked::Not(last) | Checked::Again(last) => last,
        };
        if Instant::now() + POLL_INTERVAL > deadline {
            return Err(timed_out(vm_id, target, last, timeout));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The API state a target means (none for `deleted`).
fn wanted(target: WaitState) -> Option<pb::VmState> {
    match target {
        WaitState::Created => Some(pb::VmState::VM_STATE_CREATED),
        WaitState::Running => Some(pb::VmState::VM_STATE_RUNNING),
        WaitState::Paused => Some(pb::VmState::VM_STATE_PAUSED),
        WaitState::Shutdown => Some(pb::VmState::VM_STATE_SHUTDOWN),
        WaitState::Failed => Some(pb::VmState::VM_STATE_FAILED),
        WaitState::Deleted => None,
    }
}

fn target_name(target: WaitState) -> String {
    wanted(target).map_or("DELETED", state_name).to_owned()
}
