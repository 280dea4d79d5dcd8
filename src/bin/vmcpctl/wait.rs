//! `--wait`: block until a VM reaches a state, or the timeout passes.
//!
//! [`wait_for`] is the one place that knows how: today it polls GetVmInfo
//! (the server answers it from memory, so a poll is cheap) every
//! [`POLL_INTERVAL`]; when the server has WatchVms it becomes a watch on the
//! one VM with `send_initial`, keeping the same outcomes: reached, not found,
//! failed instead, timed out.

use std::time::Duration;

use connectrpc::ErrorCode;
use connectrpc::client::CallOptions;
use tokio::time::Instant;
use vmcp::proto::vmm::v1 as pb;

use crate::cli::WaitState;
use crate::connect::Client;
use crate::error::CtlError;
use crate::output::state_name;

/// How often the state is read while waiting.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

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
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let request = pb::GetVmInfoRequest {
            vm_id: vm_id.to_owned(),
            ..Default::default()
        };
        // One poll may take what is left of the wait, and at least a moment.
        let options = CallOptions::default().with_timeout(remaining.max(POLL_INTERVAL));
        let last = match client.get_vm_info_with_options(request, options).await {
            Ok(resp) => {
                let info = resp.into_owned();
                let state = info.state.as_known().unwrap_or_default();
                if wanted(target) == Some(state) {
                    return Ok(Reached::State(Box::new(info)));
                }
                if state == pb::VmState::VM_STATE_FAILED {
                    return Err(CtlError::WaitFailed {
                        vm_id: vm_id.to_owned(),
                        target: target_name(target),
                        reason: info.state_reason,
                    });
                }
                state_name(state).to_owned()
            }
            Err(e) if e.code == ErrorCode::NotFound => {
                return match target {
                    WaitState::Deleted => Ok(Reached::Deleted),
                    _ => Err(e.into()),
                };
            }
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::DeadlineExceeded) => {
                e.to_string()
            }
            Err(e) => return Err(e.into()),
        };
        if Instant::now() + POLL_INTERVAL > deadline {
            return Err(CtlError::WaitTimeout {
                vm_id: vm_id.to_owned(),
                target: target_name(target),
                last,
                after: timeout,
            });
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
