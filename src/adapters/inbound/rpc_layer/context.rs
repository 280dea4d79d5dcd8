//! What an RPC's log lines and its server span say about it without a
//! tracing span: the RPC's context, a task-local set while its service future
//! runs and while its access line is written.
//!
//! No tracing span is made per RPC (the server span, when traces are
//! exported, is made directly with the SDK): building, entering and closing
//! one, and formatting its fields for the log layer, cost 10-16 % of a
//! GetVmInfo's CPU (BENCHMARKS.md). The lines written inside an RPC, and its
//! access line, carry `"span":"rpc"` and the VM the RPC concerns from here
//! (`otel/logging.rs` reads it), and the server span takes its `vm.id` from
//! here when the RPC ends.

use std::cell::RefCell;
use std::future::Future;

use tokio::task::futures::TaskLocalFuture;

tokio::task_local! {
    static CURRENT: RpcContext;
}

/// One RPC's context: the VM it concerns, once its handler has said.
#[derive(Debug, Default)]
pub struct RpcContext {
    vm_id: RefCell<Option<Box<str>>>,
}

impl RpcContext {
    /// Runs `fut` with this context current.
    pub(super) fn scope<F: Future>(self, fut: F) -> TaskLocalFuture<Self, F> {
        CURRENT.scope(self, fut)
    }

    /// Runs `f` with this context current.
    pub(super) fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    /// The VM the RPC concerns, once its handler has said.
    pub(super) fn vm_id(&self) -> Option<Box<str>> {
        self.vm_id.borrow().clone()
    }
}

/// Records that the current RPC concerns the VM `id`: in its context, for
/// its log lines and its span's `vm.id` attribute. Outside an RPC it does
/// nothing.
pub fn record_vm_id(id: &str) {
    let _ = CURRENT.try_with(|c| *c.vm_id.borrow_mut() = Some(id.into()));
}

/// Calls `f` with the current RPC's VM id (None when not yet known), or
/// returns None outside an RPC.
pub fn with_current<R>(f: impl FnOnce(Option<&str>) -> R) -> Option<R> {
    CURRENT.try_with(|c| f(c.vm_id.borrow().as_deref())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_an_rpc_there_is_no_context() {
        record_vm_id("vm-1");
        assert_eq!(with_current(|id| id.map(str::to_owned)), None);
    }

    #[tokio::test]
    async fn the_vm_id_recorded_in_the_future_is_kept_for_the_access_line() {
        let fut = RpcContext::default().scope(async {
            assert_eq!(with_current(|id| id.is_none()), Some(true));
            tokio::task::yield_now().await;
            record_vm_id("vm-7");
            with_current(|id| id.map(str::to_owned))
        });
        let mut fut = std::pin::pin!(fut);
        assert_eq!((&mut fut).await, Some(Some("vm-7".to_owned())));
        let context = fut.take_value().expect("the context comes back");
        let seen = context.sync_scope(|| with_current(|id| id.map(str::to_owned)));
        assert_eq!(seen, Some(Some("vm-7".to_owned())));
    }
}
