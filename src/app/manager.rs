//! The VM manager: the application's implementation of the inbound
//! `VmService` port. It keeps a registry of owner-task handles (not VM
//! state: each VM's state lives in its owner task and is published through
//! a watch channel for cheap reads), admits creates, routes commands to
//! owners and backend events to the right VM, and refuses every VM call with
//! `unavailable` while the backend cannot be used.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::lifecycle::Desired;
use crate::domain::{Command, Observation, Vm, VmError, VmId, VmSnapshot, VmState};
use crate::ports::{
    BackendEvent, BackendHealth, Clock, CreateVm, Hypervisor, ListQuery, Telemetry, VmDetails,
    VmPage, VmRecord, VmService, VmStore,
};

use super::admission::{Admission, Footprint};
use super::owner::{Deps, Owner, QUEUE_DEPTH, Request, hypervisor_to_vm_error, timed_call};

/// Default ListVms page size.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest ListVms page size.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// How long a backend check result is trusted.
const CHECK_TTL: Duration = Duration::from_secs(5);
const PAGE_TOKEN_PREFIX: &str = "v1:";

#[derive(Clone)]
struct Handle {
    tx: mpsc::Sender<Request>,
    snapshot: watch::Receiver<VmSnapshot>,
    /// The id is reserved by a create whose VMM is still starting.
    creating: bool,
}

struct CheckCache {
    at: Option<Instant>,
    result: Result<String, String>,
}

/// The VM manager.
pub struct VmManager<H, S> {
    deps: Deps<H, S>,
    vms: RwLock<BTreeMap<VmId, Handle>>,
    check: tokio::sync::Mutex<CheckCache>,
    recovering: std::sync::atomic::AtomicBool,
    remove_orphans: std::sync::atomic::AtomicBool,
    admission: Admission,
}

impl<H: Hypervisor, S: VmStore> VmManager<H, S> {
    /// A manager with no VMs that admits any valid config (no path policy, no limits).
    pub fn new(
        hypervisor: Arc<H>,
        store: Arc<S>,
        telemetry: Arc<dyn Telemetry>,
        clock: Arc<dyn Clock>,
        call_timeout: Duration,
    ) -> Arc<Self> {
        Self::with_admission(
            hypervisor,
            store,
            telemetry,
            clock,
            call_timeout,
            Admission::unrestricted(),
        )
    }

    /// A manager with no VMs that admits creates through `admission` (host paths, limits).
    pub fn with_admission(
        hypervisor: Arc<H>,
        store: Arc<S>,
        telemetry: Arc<dyn Telemetry>,
        clock: Arc<dyn Clock>,
        call_timeout: Duration,
        admission: Admission,
    ) -> Arc<Self> {
        Arc::new(Self {
            deps: Deps {
                hypervisor,
                store,
                telemetry,
                clock,
                call_timeout,
            },
            vms: RwLock::new(BTreeMap::new()),
            check: tokio::sync::Mutex::new(CheckCache {
                at: None,
                result: Err("not checked yet".into()),
            }),
            recovering: std::sync::atomic::AtomicBool::new(false),
            remove_orphans: std::sync::atomic::AtomicBool::new(true),
            admission,
        })
    }

    /// Routes backend events to the VMs they concern until the sender side closes.
    pub fn spawn_event_router(self: &Arc<Self>, mut events: mpsc::UnboundedReceiver<BackendEvent>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let Some(this) = this.upgrade() else { return };
                match ev {
                    BackendEvent::Exited {
                        vm_id,
                        state,
                        reason,
                    } => {
                        this.deps
                            .telemetry
                            .record(crate::ports::TelemetryEvent::VmmExited {
                                backend: this.deps.hypervisor.kind(),
                                reason: if state == VmState::Shutdown {
                                    "poweroff"
                                } else {
                                    "crash"
                                },
                            });
                        tracing::warn!(vm.id = %vm_id, %state, %reason, "VMM process exited");
                        if let Some(h) = this.handle(&vm_id) {
                            // The owner may be busy; deliver without blocking the router.
                            let tx = h.tx.clone();
                            tokio::spawn(async move {
                                let _ = tx
                                    .send(Request::Observe(Observation::Exited { state, reason }))
                                    .await;
                            });
                        }
                    }
                }
            }
        });
    }

    /// Re-adopts VMs from the store (start-up recovery). Returns how many were adopted
    /// and how many were found dead.
    pub async fn recover(self: &Arc<Self>) -> Result<(usize, usize), VmError> {
        self.recovering
            .store(true, std::sync::atomic::Ordering::Release);
        let result = self.recover_inner().await;
        self.recovering
            .store(false, std::sync::atomic::Ordering::Release);
        result
    }

    /// Whether recovery removes VMMs that belong to no VM (true) or only reports them.
    pub fn set_remove_orphans(&self, remove: bool) {
        self.remove_orphans
            .store(remove, std::sync::atomic::Ordering::Release);
    }

    /// Marks recovery as started (before the server accepts requests).
    pub fn mark_recovering(&self) {
        self.recovering
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether start-up recovery is running.
    pub fn is_recovering(&self) -> bool {
        self.recovering.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn recover_inner(self: &Arc<Self>) -> Result<(usize, usize), VmError> {
        let records = self
            .deps
            .store
            .load_all()
            .await
            .map_err(|e| VmError::Unavailable(e.to_string()))?;
        let h = &*self.deps.hypervisor;
        let tel = &*self.deps.telemetry;
        let t = self.deps.call_timeout;
        let mut found: BTreeMap<VmId, Option<crate::ports::VmmProcess>> = match timed_call(
            h,
            tel,
            "discover",
            t,
            h.discover(),
        )
        .await
        {
            Ok(list) => list.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "could not scan for VMM processes; orphans are not cleaned up");
                BTreeMap::new()
            }
        };
        let (mut adopted, mut dead) = (0, 0);
        for rec in records {
            let snap = rec.snapshot.clone();
            let id = snap.id.clone();
            // A VMM found in the runtime directory covers a crash between spawn and record.
            let process = rec
                .process
                .clone()
                .or_else(|| found.get(&id).cloned().flatten());
            found.remove(&id);
            if snap.desired == Desired::Deleted {
                // A delete was interrupted: finish it.
                let _ = timed_call(
                    h,
                    tel,
                    "adopt",
                    t,
                    h.adopt(&id, &snap.config, process.clone()),
                )
                .await;
                match timed_call(h, tel, "delete", t, h.delete(&id, true)).await {
                    Ok(()) => {
                        self.remove_record(&id).await;
                        tracing::info!(vm.id = %id, "completed a delete interrupted by a restart");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(vm.id = %id, error = %e, "could not complete an interrupted delete")
                    }
                }
            }
            if rec.process.is_none() && snap.generation == 1 && snap.desired == Desired::Created {
                // The create was interrupted before its VMM was recorded: the caller never got an
                // answer, so roll it back (end any VMM it started) and let a retried CreateVm start
                // afresh rather than adopt a half-configured VMM.
                let _ =
                    timed_call(h, tel, "destroy_orphan", t, h.destroy_orphan(&id, process)).await;
                self.remove_record(&id).await;
                tracing::info!(vm.id = %id, "rolled back a create interrupted by a restart");
                continue;
            }
            let now = self.deps.clock.now_unix();
            let mut vm = Vm::restore(snap.clone());
            let mut result = timed_call(
                h,
                tel,
                "adopt",
                t,
                h.adopt(&id, &snap.config, process.clone()),
            )
            .await;
            let mut process = process;
            if result.is_err() && process.is_some() && snap.state == VmState::Shutdown {
                // A stopped VM whose VMM is gone stays bootable: register it without a process.
                process = None;
                result = timed_call(h, tel, "adopt", t, h.adopt(&id, &snap.config, None)).await;
            }
            let alive = result.is_ok() && process.is_some();
            let obs = match result {
                Ok(state) if alive => {
                    adopted += 1;
                    Observation::Reported {
                        state,
                        reason: snap.reason.clone(),
                    }
                }
                Ok(state) => {
                    dead += 1;
                    let reason = if snap.state == VmState::Shutdown {
                        snap.reason.clone()
                    } else {
                        "VMM exited while VMCP was down".to_owned()
                    };
                    Observation::Reported { state, reason }
                }
                Err(e) => {
                    dead += 1;
                    if snap.state == VmState::Shutdown {
                        Observation::Reported {
                            state: VmState::Shutdown,
                            reason: snap.reason.clone(),
                        }
                    } else {
                        Observation::Reported {
                            state: VmState::Failed,
                            reason: format!("VMM exited while VMCP was down ({e})"),
                        }
                    }
                }
            };
            vm.handle_observation(obs, now);
            let snap = vm.snapshot().clone();
            let process = if alive { process } else { None };
            let handle = self.spawn_owner(vm, process.clone());
            self.vms
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(snap.id.clone(), handle);
            if let Err(e) = self
                .deps
                .store
                .put(&VmRecord {
                    snapshot: snap,
                    process,
                })
                .await
            {
                tracing::error!(vm.id = %id, error = %e, "could not record a recovered VM");
            }
        }
        for (id, process) in found {
            if !self
                .remove_orphans
                .load(std::sync::atomic::Ordering::Acquire)
            {
                tracing::warn!(vm.id = %id, pid = process.as_ref().map(|p| p.pid), "VMM runtime directory belongs to no VM (left in place: UNKEY_VMCP_ORPHANS=report)");
                continue;
            }
            tracing::warn!(vm.id = %id, pid = process.as_ref().map(|p| p.pid), "VMM runtime directory belongs to no VM: removing it");
            if let Err(e) =
                timed_call(h, tel, "destroy_orphan", t, h.destroy_orphan(&id, process)).await
            {
                tracing::error!(vm.id = %id, error = %e, "could not clean up an orphaned VMM");
            }
        }
        Ok((adopted, dead))
    }

    async fn remove_record(&self, id: &VmId) {
        if let Err(e) = self.deps.store.remove(id).await {
            tracing::error!(vm.id = %id, error = %e, "could not remove a VM record");
        }
    }

    fn spawn_owner(&self, vm: Vm, process: Option<crate::ports::VmmProcess>) -> Handle {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (snap_tx, snap_rx) = watch::channel(vm.snapshot().clone());
        tokio::spawn(Owner::new(vm, process, self.deps.clone(), snap_tx).run(rx));
        Handle {
            tx,
            snapshot: snap_rx,
            creating: false,
        }
    }

    fn handle(&self, id: &VmId) -> Option<Handle> {
        self.vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The backend's health, re-checked when the cached answer is older than a few seconds.
    pub async fn backend_health(&self) -> BackendHealth {
        let mut cache = self.check.lock().await;
        let started = Instant::now();
        let fresh = cache.at.is_some_and(|at| at.elapsed() < CHECK_TTL);
        if !fresh {
            let h = &*self.deps.hypervisor;
            cache.result = match timed_call(
                h,
                &*self.deps.telemetry,
                "check",
                self.deps.call_timeout,
                h.check(),
            )
            .await
            {
                Ok(c) => Ok(c.version),
                Err(e) => Err(e.to_string()),
            };
            cache.at = Some(Instant::now());
        }
        BackendHealth {
            kind: self.deps.hypervisor.kind().as_str(),
            healthy: cache.result.is_ok(),
            version: cache.result.clone().unwrap_or_default(),
            error: cache.result.clone().err().unwrap_or_default(),
            duration: started.elapsed(),
        }
    }

    async fn require_backend(&self) -> Result<(), VmError> {
        if self.is_recovering() {
            return Err(VmError::Unavailable(
                "VMCP is re-adopting VMs after a restart; retry shortly".into(),
            ));
        }
        let health = self.backend_health().await;
        if health.healthy {
            Ok(())
        } else {
            Err(VmError::Unavailable(format!(
                "backend {} is unavailable: {}",
                health.kind, health.error
            )))
        }
    }

    /// Number of VMs per observed state.
    pub fn counts_by_state(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> =
            VmState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for h in self.vms.read().unwrap_or_else(|p| p.into_inner()).values() {
            let s = h.snapshot.borrow().state;
            *counts.entry(s.as_str()).or_default() += 1;
        }
        counts
    }

    async fn command(&self, id: VmId, cmd: Command) -> Result<VmSnapshot, VmError> {
        self.require_backend().await?;
        let h = self
            .handle(&id)
            .ok_or_else(|| VmError::NotFound(id.to_string()))?;
        let (reply_tx, reply_rx) = oneshot::channel();
        h.tx.try_send(Request::Command(cmd, reply_tx))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => VmError::Unavailable(format!(
                    "vm {id} has {QUEUE_DEPTH} operations queued; retry later"
                )),
                mpsc::error::TrySendError::Closed(_) => VmError::NotFound(id.to_string()),
            })?;
        let result = reply_rx
            .await
            .map_err(|_| VmError::NotFound(id.to_string()))?;
        if result.as_ref().is_ok_and(|s| s.deleted) {
            self.vms
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        result
    }

    async fn create_inner(&self, req: CreateVm) -> Result<VmSnapshot, VmError> {
        req.config.validate()?;
        self.deps.hypervisor.validate(&req.config)?;
        // Per-VM limits and host paths; a few stat calls, cheap enough inline.
        self.admission.check_vm(&req.config)?;
        self.require_backend().await?;
        let id = match req.vm_id {
            Some(id) => id,
            None => self.fresh_id(),
        };
        // Reserve the id: a concurrent create of the same id sees the reservation.
        let (snap_tx, snap_rx) = {
            let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
            if let Some(existing) = vms.get(&id) {
                if existing.creating {
                    return Err(VmError::Unavailable(format!(
                        "vm {id} is being created by another request; retry"
                    )));
                }
                let snap = existing.snapshot.borrow().clone();
                return if snap.config == req.config {
                    Ok(snap)
                } else {
                    Err(VmError::AlreadyExists(id.to_string()))
                };
            }
            // Under the registry lock, so concurrent creates cannot overshoot the totals.
            self.admission.limits.check_host(
                vms.values()
                    .map(|h| Footprint::of(&h.snapshot.borrow().config)),
                &req.config,
            )?;
            let now = self.deps.clock.now_unix();
            let placeholder = Vm::new(id.clone(), req.config.clone(), VmState::Created, now);
            let (snap_tx, snap_rx) = watch::channel(placeholder.snapshot().clone());
            let (tx, _rx) = mpsc::channel(1);
            vms.insert(
                id.clone(),
                Handle {
                    tx,
                    snapshot: snap_rx.clone(),
                    creating: true,
                },
            );
            (snap_tx, snap_rx)
        };
        let result = self.create_vmm(&id, &req.config).await;
        let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((vm, process)) => {
                let snap = vm.snapshot().clone();
                snap_tx.send_replace(snap.clone());
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                tokio::spawn(Owner::new(vm, process, self.deps.clone(), snap_tx).run(rx));
                vms.insert(
                    id,
                    Handle {
                        tx,
                        snapshot: snap_rx,
                        creating: false,
                    },
                );
                Ok(snap)
            }
            Err(e) => {
                vms.remove(&id);
                Err(e)
            }
        }
    }

    async fn create_vmm(
        &self,
        id: &VmId,
        config: &crate::domain::VmConfig,
    ) -> Result<(Vm, Option<crate::ports::VmmProcess>), VmError> {
        let now = self.deps.clock.now_unix();
        let intent = Vm::new(id.clone(), config.clone(), VmState::Created, now);
        // Intent before action: the record exists before any process does.
        self.deps
            .store
            .put(&VmRecord {
                snapshot: intent.snapshot().clone(),
                process: None,
            })
            .await
            .map_err(|e| VmError::Unavailable(format!("cannot record the VM: {e}")))?;
        let h = &*self.deps.hypervisor;
        let created = timed_call(
            h,
            &*self.deps.telemetry,
            "create",
            self.deps.call_timeout,
            h.create(id, config),
        )
        .await;
        match created {
            Ok((state, process)) => {
                let vm = Vm::new(id.clone(), config.clone(), state, now);
                self.deps
                    .store
                    .put(&VmRecord {
                        snapshot: vm.snapshot().clone(),
                        process: Some(process.clone()),
                    })
                    .await
                    .map_err(|e| VmError::Unavailable(format!("cannot record the VM: {e}")))?;
                Ok((vm, Some(process)))
            }
            Err(e) => {
                let err =
                    hypervisor_to_vm_error(e, intent.snapshot(), crate::domain::Operation::Boot);
                // Create leaves nothing behind on failure, so the record goes too.
                let _ = timed_call(
                    h,
                    &*self.deps.telemetry,
                    "delete",
                    self.deps.call_timeout,
                    h.delete(id, true),
                )
                .await;
                if let Err(e) = self.deps.store.remove(id).await {
                    tracing::error!(vm.id = %id, error = %e, "could not remove the record of a failed create");
                }
                Err(match err {
                    VmError::FailedPrecondition { reason, .. } => VmError::Unavailable(reason),
                    other => other,
                })
            }
        }
    }

    fn fresh_id(&self) -> VmId {
        loop {
            let candidate = format!("vm-{}", uuid::Uuid::new_v4().simple());
            // uuid hex is always a valid id; the loop guards only against a collision.
            if let Ok(id) = VmId::parse(&candidate)
                && !self
                    .vms
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&id)
            {
                return id;
            }
        }
    }
}

fn encode_token(last: &VmId) -> String {
    let hex: String = last.as_str().bytes().map(|b| format!("{b:02x}")).collect();
    format!("{PAGE_TOKEN_PREFIX}{hex}")
}

fn decode_token(token: &str) -> Result<VmId, VmError> {
    let invalid = || {
        VmError::InvalidArgument(crate::domain::ConfigError::new(
            "page_token",
            "is not a token returned by ListVms",
        ))
    };
    let hex = token.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(invalid)?;
    if hex.len() % 2 != 0 || hex.len() > 256 {
        return Err(invalid());
    }
    let bytes: Result<Vec<u8>, _> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect();
    let s = String::from_utf8(bytes.map_err(|_| invalid())?).map_err(|_| invalid())?;
    VmId::parse(&s).map_err(|_| invalid())
}

impl<H: Hypervisor, S: VmStore> VmService for VmManager<H, S> {
    async fn create_vm(&self, req: CreateVm) -> Result<VmSnapshot, VmError> {
        self.create_inner(req).await
    }

    async fn delete_vm(&self, id: VmId, force: bool) -> Result<(), VmError> {
        self.command(id, Command::Delete { force })
            .await
            .map(|_| ())
    }

    async fn boot_vm(&self, id: VmId) -> Result<VmState, VmError> {
        self.command(id, Command::Boot).await.map(|s| s.state)
    }

    async fn shutdown_vm(
        &self,
        id: VmId,
        force: bool,
        timeout_secs: u32,
    ) -> Result<VmState, VmError> {
        self.command(
            id,
            Command::Shutdown {
                force,
                timeout_secs,
            },
        )
        .await
        .map(|s| s.state)
    }

    async fn pause_vm(&self, id: VmId) -> Result<VmState, VmError> {
        self.command(id, Command::Pause).await.map(|s| s.state)
    }

    async fn resume_vm(&self, id: VmId) -> Result<VmState, VmError> {
        self.command(id, Command::Resume).await.map(|s| s.state)
    }

    async fn reboot_vm(&self, id: VmId, force: bool) -> Result<VmState, VmError> {
        self.command(id, Command::Reboot { force })
            .await
            .map(|s| s.state)
    }

    async fn get_vm_info(&self, id: VmId) -> Result<VmDetails, VmError> {
        self.require_backend().await?;
        let h = self
            .handle(&id)
            .ok_or_else(|| VmError::NotFound(id.to_string()))?;
        let mut snapshot = h.snapshot.borrow().clone();
        let hv = &*self.deps.hypervisor;
        let info = timed_call(
            hv,
            &*self.deps.telemetry,
            "info",
            self.deps.call_timeout,
            hv.info(&id),
        )
        .await;
        let mut backend_info = BTreeMap::new();
        backend_info.insert("backend".to_owned(), hv.kind().as_str().to_owned());
        let metrics = match info {
            Ok(info) => {
                if let Some(state) = info.state
                    && state != snapshot.state
                {
                    // The VMM's word wins; let the owner record it unless the VM moved on since.
                    let reason = if info.reason.is_empty() {
                        snapshot.reason.clone()
                    } else {
                        info.reason.clone()
                    };
                    let _ = h.tx.try_send(Request::ObserveAt(
                        Observation::Reported {
                            state,
                            reason: reason.clone(),
                        },
                        snapshot.generation,
                    ));
                    snapshot.state = state;
                    snapshot.reason = reason;
                }
                backend_info.extend(info.backend_info);
                Some(info.metrics)
            }
            Err(e) => {
                backend_info.insert("error".to_owned(), e.to_string());
                None
            }
        };
        Ok(VmDetails {
            snapshot,
            metrics,
            backend_info,
        })
    }

    async fn list_vms(&self, query: ListQuery) -> Result<VmPage, VmError> {
        self.require_backend().await?;
        let page_size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if query.page_token.is_empty() {
            None
        } else {
            Some(decode_token(&query.page_token)?)
        };
        let vms = self.vms.read().unwrap_or_else(|p| p.into_inner());
        let matching: Vec<VmSnapshot> = vms
            .values()
            .map(|h| h.snapshot.borrow().clone())
            .filter(|s| query.states.is_empty() || query.states.contains(&s.state))
            .collect();
        drop(vms);
        let total_count = u32::try_from(matching.len()).unwrap_or(u32::MAX);
        let start = match &after {
            Some(a) => matching.partition_point(|s| &s.id <= a),
            None => 0,
        };
        let page: Vec<VmSnapshot> = matching
            .iter()
            .skip(start)
            .take(page_size as usize)
            .cloned()
            .collect();
        let next_page_token = match page.last() {
            Some(last) if start + page.len() < matching.len() => encode_token(&last.id),
            _ => String::new(),
        };
        Ok(VmPage {
            vms: page,
            next_page_token,
            total_count,
        })
    }
}

/// Health answers for the health endpoint, from the manager's own view.
pub struct ManagerHealth<H, S> {
    manager: Arc<VmManager<H, S>>,
    telemetry: Arc<dyn Fn() -> String + Send + Sync>,
}

impl<H: Hypervisor, S: VmStore> ManagerHealth<H, S> {
    /// Health for `manager`; `telemetry` describes the telemetry pipeline.
    pub fn new(
        manager: Arc<VmManager<H, S>>,
        telemetry: Arc<dyn Fn() -> String + Send + Sync>,
    ) -> Self {
        Self { manager, telemetry }
    }
}

impl<H: Hypervisor, S: VmStore> crate::ports::HealthCheck for ManagerHealth<H, S> {
    fn backend(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = BackendHealth> + Send + '_>> {
        Box::pin(self.manager.backend_health())
    }

    fn service(&self) -> crate::ports::ServiceHealth {
        crate::ports::ServiceHealth {
            recovering: self.manager.is_recovering(),
            vm_counts: self.manager.counts_by_state(),
            telemetry: (self.telemetry)(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected() {
        let id = VmId::parse("vm-1.a_b").expect("valid");
        assert_eq!(decode_token(&encode_token(&id)), Ok(id));
        for bad in ["", "v1:", "v1:zz", "v1:2", "x:6162", "v1:2f2f", "v1:00"] {
            let err = decode_token(bad).expect_err(bad);
            assert!(
                matches!(err, VmError::InvalidArgument(ref e) if e.field == "page_token"),
                "{bad}: {err:?}"
            );
        }
    }
}
