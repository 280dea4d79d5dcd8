//! The owner tasks of one manager, so that stopping VMCP ends them all and
//! waits for them: after [`OwnerTasks::stop`] returns no owner samples a
//! VMM, applies a policy or writes the store. Each owner finishes the
//! operation it is in (its VMM call and the record of what the VMM
//! answered) and ends before taking the next; its VMM keeps running, to be
//! re-adopted by the next start.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// What a VM call gets once a stop has begun: the VM is still there, for
/// the next start.
pub fn stopping_error() -> crate::domain::VmError {
    crate::domain::VmError::Unavailable("VMCP is stopping; retry against the next start".to_owned())
}

/// Starts owner tasks and stops them.
///
/// Owners run on the runtime this was made on (the main, multi-threaded
/// one), not on the runtime of whatever request created them: the API
/// socket is served by a single-threaded runtime of its own.
#[derive(Debug, Clone)]
pub struct OwnerTasks {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Handle>,
}

#[derive(Debug)]
struct Inner {
    /// Set once: every owner ends at its next turn.
    stop: watch::Sender<bool>,
    /// How many owner tasks have not ended yet.
    live: watch::Sender<usize>,
}

/// Owners spawned later run on the runtime current here, when there is one.
impl Default for OwnerTasks {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                stop: watch::Sender::new(false),
                live: watch::Sender::new(0),
            }),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

/// Counts one task as live until dropped (also when it panics or is aborted).
struct Live(Arc<Inner>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n -= 1);
    }
}

impl OwnerTasks {
    /// Spawns an owner task, counted until it ends. Refused (`false`,
    /// nothing spawned) once [`stop`](Self::stop) has begun.
    #[must_use]
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> bool {
        let mut admitted = false;
        // Checked and counted under the counter's lock, so a stop that has
        // read zero live tasks cannot miss one spawned after it.
        self.inner.live.send_if_modified(|n| {
            admitted = !*self.inner.stop.borrow();
            if admitted {
                *n += 1;
            }
            admitted
        });
        if admitted {
            let live = Live(Arc::clone(&self.inner));
            let task = async move {
                let _live = live;
                task.await;
            };
            match &self.runtime {
                Some(rt) => drop(rt.spawn(task)),
                None => drop(tokio::spawn(task)),
            }
        }
        admitted
    }

    /// Resolves once a stop has begun (never before).
    pub async fn stopping(&self) {
        let mut rx = self.inner.stop.subscribe();
        // The sender lives in `inner`, which `self` holds: this cannot fail.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Whether a stop has begun.
    pub fn stopped(&self) -> bool {
        *self.inner.stop.borrow()
    }

    /// Tells every owner to end at its next turn and waits until all have.
    pub async fn stop(&self) {
        self.inner.live.send_modify(|_| {
            self.inner.stop.send_replace(true);
        });
        let mut live = self.inner.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// How many owner tasks have not ended.
    pub fn live(&self) -> usize {
        *self.inner.live.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn stop_waits_for_every_task_to_finish_its_turn_and_refuses_new_ones() {
        let tasks = OwnerTasks::default();
        let finished = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let t = tasks.clone();
        let f = Arc::clone(&finished);
        assert!(tasks.spawn(async move {
            let _ = started_tx.send(());
            // A turn in progress: the stop waits for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            f.store(true, Ordering::SeqCst);
            t.stopping().await;
        }));
        // A task that never looks at the stop but ends on its own.
        assert!(tasks.spawn(async {}));
        started_rx.await.unwrap();
        assert!(!tasks.stopped());
        tasks.stop().await;
        assert!(finished.load(Ordering::SeqCst), "stop returned mid-turn");
        assert_eq!(tasks.live(), 0);
        assert!(tasks.stopped());
        assert!(!tasks.spawn(async {}), "a task spawned after the stop");
        assert_eq!(tasks.live(), 0);
    }

    #[tokio::test]
    async fn a_panicking_task_is_no_longer_counted() {
        let tasks = OwnerTasks::default();
        assert!(tasks.spawn(async { panic!("owner bug") }));
        tokio::time::timeout(Duration::from_secs(5), tasks.stop())
            .await
            .expect("the stop ends though a task panicked");
        assert_eq!(tasks.live(), 0);
    }

    /// A request served on another runtime (the API socket's thread) starts
    /// an owner: it runs on the runtime the tasks were made on and outlives
    /// the request's runtime.
    #[test]
    fn owners_run_on_the_runtime_the_tasks_were_made_on() {
        let main = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("main-runtime")
            .enable_all()
            .build()
            .unwrap();
        let tasks = main.block_on(async { OwnerTasks::default() });
        let (ran_tx, ran_rx) = std::sync::mpsc::channel();
        let t = tasks.clone();
        std::thread::Builder::new()
            .name("request-thread".into())
            .spawn(move || {
                let request = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                request.block_on(async move {
                    assert!(t.spawn(async move {
                        // Still running after the request's runtime is gone.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let name = std::thread::current().name().map(str::to_owned);
                        let _ = ran_tx.send(name);
                    }));
                });
                // The request's runtime ends here, with everything spawned on it.
            })
            .unwrap()
            .join()
            .unwrap();
        let ran_on = ran_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the owner task ran to its end");
        assert_eq!(ran_on.as_deref(), Some("main-runtime"));
        main.block_on(tasks.stop());
        assert_eq!(tasks.live(), 0);
    }
}
