//! Console output for the API: one read (GetConsoleOutput) and a follower
//! (StreamConsole). Both read the console file through the backend, never
//! through the VM's owner, so a long operation on the VM (a graceful stop)
//! does not hold a reader up.
//!
//! A follower reads until it has caught up, then waits for more: a short
//! poll, or sooner when the VM's view changes. It starts over at offset 0
//! when the console does (a new VMM process, seen as a new pid in the view,
//! or a file shorter than the follower's offset), ends cleanly when the VM
//! is deleted, and ends with `unavailable` naming its offset when VMCP shuts
//! down.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream;
use tokio::sync::watch;

use crate::app::feed::ChangeFeed;
use crate::domain::{VmError, VmSnapshot};
use crate::ports::VmDetails;
use crate::ports::{ConsoleChunk, ConsoleStream, Hypervisor, HypervisorError};

/// Bytes one GetConsoleOutput answers when the caller says 0.
pub const DEFAULT_READ_BYTES: usize = 64 * 1024;
/// Most bytes one GetConsoleOutput answers, and one StreamConsole message holds.
pub const MAX_READ_BYTES: usize = 1024 * 1024;
/// How often a follower that has caught up looks for more output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The bytes a read may answer: `asked` (0: the default), at most the maximum.
pub fn read_size(asked: u32) -> usize {
    match usize::try_from(asked) {
        Ok(0) => DEFAULT_READ_BYTES,
        Ok(n) => n.min(MAX_READ_BYTES),
        Err(_) => MAX_READ_BYTES,
    }
}

/// Reads VM `snap`'s console through the backend.
pub async fn read<H: Hypervisor>(
    hypervisor: &H,
    snap: &VmSnapshot,
    offset: u64,
    max_bytes: usize,
) -> Result<ConsoleChunk, VmError> {
    hypervisor
        .read_console(&snap.id, &snap.config, offset, max_bytes)
        .await
        .map_err(|e| console_error(e, snap))
}

fn console_error(e: HypervisorError, snap: &VmSnapshot) -> VmError {
    match e {
        // The console is off: nothing to read until the VM is created with one.
        HypervisorError::Unsupported(reason) => VmError::FailedPrecondition {
            vm_id: snap.id.to_string(),
            operation: "read console",
            state: snap.state,
            reason,
        },
        e => VmError::Unavailable(format!("vm {}: {e}", snap.id)),
    }
}

/// What a follower carries from one message to the next.
struct Follower<H> {
    hypervisor: Arc<H>,
    view: watch::Receiver<Arc<VmDetails>>,
    feed: Arc<ChangeFeed>,
    offset: u64,
    /// The VMM pid the offset belongs to.
    pid: Option<String>,
    ended: bool,
}

/// Follows the console of the VM whose view is `view`, from `offset`.
pub fn follow<H: Hypervisor>(
    hypervisor: Arc<H>,
    view: watch::Receiver<Arc<VmDetails>>,
    feed: Arc<ChangeFeed>,
    offset: u64,
) -> ConsoleStream {
    let pid = view.borrow().backend_info.get("vmm_pid").cloned();
    let follower = Follower {
        hypervisor,
        view,
        feed,
        offset,
        pid,
        ended: false,
    };
    Box::pin(stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    }))
}

impl<H: Hypervisor> Follower<H> {
    /// The next message; None when the stream ends.
    async fn next(&mut self) -> Option<Result<ConsoleChunk, VmError>> {
        loop {
            if self.ended {
                return None;
            }
            if self.feed.is_closed() {
                self.ended = true;
                return Some(Err(VmError::Unavailable(format!(
                    "VMCP is shutting down; stream again from offset {}",
                    self.offset
                ))));
            }
            let view = Arc::clone(&self.view.borrow_and_update());
            if view.snapshot.deleted {
                return None;
            }
            let pid = view.backend_info.get("vmm_pid").cloned();
            if pid.is_some() && pid != self.pid {
                if self.pid.is_some() {
                    // A new VMM process writes a new console.
                    self.offset = 0;
                }
                self.pid = pid;
            }
            let snap = &view.snapshot;
            let chunk = match read(&*self.hypervisor, snap, self.offset, MAX_READ_BYTES).await {
                Ok(c) => c,
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            };
            if chunk.next_offset < self.offset {
                // The file is shorter than what was read: the console started over.
                self.offset = 0;
                continue;
            }
            if !chunk.data.is_empty() {
                self.offset = chunk.next_offset;
                return Some(Ok(chunk));
            }
            tokio::select! {
                changed = self.view.changed() => {
                    if changed.is_err() {
                        // The owner is gone: the VM was deleted.
                        return None;
                    }
                }
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_sizes_have_a_default_and_a_ceiling() {
        assert_eq!(read_size(0), DEFAULT_READ_BYTES);
        assert_eq!(read_size(10), 10);
        assert_eq!(read_size(u32::MAX), MAX_READ_BYTES);
    }
}
