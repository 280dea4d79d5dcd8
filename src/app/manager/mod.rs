//! The VM manager: the application's implementation of the inbound
//! `VmService` port. Split by concern: [`registry`] (which VMs exist, and
//! their owners), [`recovery`] (start-up), [`health`] (the backend check),
//! [`paging`] (ListVms pages). This module admits creates, routes commands
//! to owners, answers reads from the owners' published views (never from
//! the VMM), and refuses every VM call with `unavailable` while recovery
//! runs or the backend cannot be used. Each part takes what it needs as
//! arguments; none calls back into the manager.

pub mod console;
pub mod health;
pub mod paging;
pub mod recovery;
pub mod registry;
pub mod snapshot_calls;
pub mod snapshots;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::domain::snapshot::{SnapshotId, SnapshotInfo, SnapshotKind};
use crate::domain::{Command, Vm, VmError, VmId, VmSnapshot, VmState};
use crate::ports::{
    BackendHealth, Clock, ConsoleChunk, ConsoleStream, CreateVm, Hypervisor, HypervisorError,
    ListQuery, RestoreVm, Telemetry, VmCounts, VmDetails, VmPage, VmService, VmStore, WatchQuery,
    WatchStream,
};

use super::admission::{CreatePolicy, Footprint};
use super::descriptors::{DescriptorBudget, VM_OPERATION_DESCRIPTORS};
use super::feed::{ChangeFeed, WatchSettings};
use crate::domain::restart::RestartSettings;

/// Host-wide policies for VMs and watchers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policies {
    /// WatchVms history, queues, watcher cap and heartbeat.
    pub watch: WatchSettings,
    /// Restart policy default, backoff and crash-loop limit.
    pub restart: RestartSettings,
}
use super::owner::{Deps, Owner, OwnerTasks, QUEUE_DEPTH, Request, stopping_error};

use self::health::BackendHealthCache;
use self::recovery::Recovered;
use self::registry::{Entry, Registry};
use self::snapshots::{SnapshotSettings, Snapshots};

pub use self::paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

/// The VM manager.
pub struct VmManager<H, S> {
    deps: Deps<H, S>,
    registry: Registry,
    health: BackendHealthCache,
    recovering: AtomicBool,
    remove_orphans: AtomicBool,
    admission: CreatePolicy,
    descriptors: OnceLock<DescriptorBudget>,
    snapshots: OnceLock<Snapshots>,
}

impl<H, S> std::fmt::Debug for VmManager<H, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager")
            .field("registry", &self.registry)
            .field("recovering", &self.recovering)
            .field("remove_orphans", &self.remove_orphans)
            .finish_non_exhaustive()
    }
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
            CreatePolicy::unrestricted(),
            Policies::default(),
        )
    }

    /// A manager with no VMs that admits creates through `admission` (host
    /// paths, limits) and applies `policies` (watchers, restarts).
    pub fn with_admission(
        hypervisor: Arc<H>,
        store: Arc<S>,
        telemetry: Arc<dyn Telemetry>,
        clock: Arc<dyn Clock>,
        call_timeout: Duration,
        admission: CreatePolicy,
        policies: Policies,
    ) -> Arc<Self> {
        // Revisions continue from the store's once recovery has read it.
        let feed = ChangeFeed::new(0, policies.watch, Arc::clone(&telemetry));
        let registry = Registry::default();
        Arc::new(Self {
            deps: Deps {
                hypervisor,
                store,
                telemetry,
                clock,
                call_timeout,
                restart: policies.restart,
                feed,
                listed: Arc::clone(registry.listed()),
                network: Arc::default(),
                tasks: OwnerTasks::default(),
            },
            registry,
            health: BackendHealthCache::default(),
            recovering: AtomicBool::new(false),
            remove_orphans: AtomicBool::new(true),
            admission,
            descriptors: OnceLock::new(),
            snapshots: OnceLock::new(),
        })
    }

    /// The change feed (WatchVms), for shutdown and tests.
    pub fn feed(&self) -> &Arc<ChangeFeed> {
        &self.deps.feed
    }

    /// The VMs' owner tasks, to end them when VMCP stops.
    pub fn owners(&self) -> &OwnerTasks {
        &self.deps.tasks
    }

    /// Re-adopts VMs from the store (start-up recovery).
    pub async fn recover(&self) -> Result<Recovered, VmError> {
        self.recovering.store(true, Ordering::Release);
        if let Some(s) = self.snapshots.get() {
            match s.scan(&*self.deps.store).await {
                Ok(n) => tracing::info!(
                    snapshots = n.usable,
                    recorded = n.recorded,
                    removed = n.removed,
                    missing = n.missing,
                    "snapshots reconciled"
                ),
                Err(e) => tracing::error!(error = %e, "cannot read the snapshots"),
            }
        }
        let remove_orphans = self.remove_orphans.load(Ordering::Acquire);
        let mut result = recovery::recover(&self.deps, &self.registry, remove_orphans).await;
        if let (Ok(done), Some(net)) = (result.as_mut(), self.deps.network.get()) {
            // After the records: a rolled-back create's taps are orphans now.
            let vms: Vec<_> = self
                .registry
                .views(&[])
                .iter()
                .map(|v| (v.snapshot.id.clone(), v.snapshot.config.clone()))
                .collect();
            let kind = self.deps.hypervisor.kind();
            match super::network::sweep(net, &vms, kind, remove_orphans).await {
                Ok(swept) => done.taps = swept,
                Err(e) => tracing::error!(error = %e, "cannot sweep the host's taps"),
            }
        }
        if result.is_ok()
            && let Some(s) = self.snapshots.get()
        {
            s.remove_unowned_clone_disks(|vm| self.registry.contains(vm))
                .await;
        }
        self.recovering.store(false, Ordering::Release);
        result
    }

    /// Keeps snapshots as `settings` say (set once, before recovery, which
    /// indexes them). Without it the snapshot calls answer `unavailable`.
    pub fn set_snapshots(&self, settings: SnapshotSettings) {
        let _ = self.snapshots.set(Snapshots::new(settings));
    }

    fn snapshots(&self) -> Result<&Snapshots, VmError> {
        self.snapshots.get().ok_or_else(|| {
            VmError::Unavailable("this VMCP keeps no snapshots (no snapshot directory)".into())
        })
    }

    /// Manages the taps of interfaces that name a bridge (set once, before
    /// recovery, which sweeps them). Without it such interfaces are refused.
    pub fn set_network(&self, network: crate::app::network::Networking) {
        let _ = self.deps.network.set(network);
    }

    /// Whether recovery removes VMMs that belong to no VM (true) or only reports them.
    pub fn set_remove_orphans(&self, remove: bool) {
        self.remove_orphans.store(remove, Ordering::Release);
    }

    /// Refuses VM operations that open descriptors while too few are free (set once, at start-up).
    pub fn set_descriptor_budget(&self, budget: DescriptorBudget) {
        let _ = self.descriptors.set(budget);
    }

    /// The descriptor budget, when one is set.
    pub fn descriptor_budget(&self) -> Option<&DescriptorBudget> {
        self.descriptors.get()
    }

    /// `resource_exhausted` naming descriptors when VM work could not open what it needs.
    fn require_descriptors(&self) -> Result<(), VmError> {
        match self.descriptors.get() {
            Some(budget) => budget.check_vm_work(),
            None => Ok(()),
        }
    }

    /// Marks recovery as started (before the server accepts requests).
    pub fn mark_recovering(&self) {
        self.recovering.store(true, Ordering::Release);
    }

    /// Whether start-up recovery is running.
    pub fn is_recovering(&self) -> bool {
        self.recovering.load(Ordering::Acquire)
    }

    /// The backend's health, re-checked when the cached answer is older than a few seconds.
    pub async fn backend_health(&self) -> BackendHealth {
        self.health
            .get(
                &*self.deps.hypervisor,
                &*self.deps.telemetry,
                self.deps.call_timeout,
            )
            .await
    }

    async fn require_backend(&self) -> Result<(), VmError> {
        if self.deps.tasks.stopped() {
            return Err(stopping_error());
        }
        if self.is_recovering() {
            return Err(VmError::Unavailable(
                "VMCP is re-adopting VMs after a restart; retry shortly".into(),
            ));
        }
        if self.health.fresh_and_healthy() {
            return Ok(());
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
    pub fn counts_by_state(&self) -> VmCounts {
        self.registry.counts()
    }

    async fn command(&self, id: VmId, cmd: Command) -> Result<VmSnapshot, VmError> {
        self.require_backend().await?;
        // Stopping and deleting free descriptors, so they are never refused for lack of them.
        match cmd {
            Command::Create
            | Command::Boot
            | Command::Pause
            | Command::Resume
            | Command::Reboot { .. }
            | Command::Resize(_)
            | Command::Snapshot { .. } => self.require_descriptors()?,
            Command::Shutdown { .. } | Command::Delete { .. } => {}
        }
        let entry = self.entry(&id)?;
        let result = ask(&entry, &id, |reply| Request::Command(cmd, reply)).await;
        if result.as_ref().is_ok_and(|s| s.deleted) {
            self.registry.remove_if_owned_by(&id, &entry.tx);
            if let Some(s) = self.snapshots.get() {
                s.remove_clone_disks(&id).await;
            }
        }
        result
    }

    /// The registry entry of a VM that exists.
    fn entry(&self, id: &VmId) -> Result<Entry, VmError> {
        self.registry
            .get(id)
            .ok_or_else(|| VmError::NotFound(id.to_string()))
    }

    /// The view of a VM whose create has finished.
    fn created_view(&self, id: &VmId) -> Result<(Entry, Arc<VmDetails>), VmError> {
        let entry = self.entry(id)?;
        let view = entry.current();
        if view.snapshot.generation == 0 || view.snapshot.deleted {
            return Err(VmError::NotFound(id.to_string()));
        }
        Ok((entry, view))
    }

    async fn create(&self, req: CreateVm) -> Result<VmSnapshot, VmError> {
        self.start_vm(req.vm_id, req.config, None, None).await
    }

    /// Creates a VM, or restores one from the snapshot `restore` names (its
    /// directory, and whether to resume it): admission, then the owner.
    /// `admitted_as` is the config admission checks (a clone's is the
    /// snapshot's: its disk copies are VMCP's own files, not the caller's).
    async fn start_vm(
        &self,
        id: Option<VmId>,
        config: crate::domain::VmConfig,
        restore: Option<super::owner::RestoreFrom>,
        admitted_as: Option<&crate::domain::VmConfig>,
    ) -> Result<VmSnapshot, VmError> {
        let mut config = config;
        let networking = self.deps.network.get();
        crate::domain::network::apply_default_bridge(
            &mut config,
            networking.map_or("", |n| n.default_bridge.as_str()),
        );
        let mut req = CreateVm { vm_id: id, config };
        req.config.validate()?;
        if networking.is_none()
            && let Some(i) = req
                .config
                .network
                .iter()
                .position(crate::domain::network::is_managed)
        {
            return Err(VmError::Incompatible(format!(
                "config.network[{i}].bridge: this VMCP does not manage host networking; name a tap_device of your own"
            )));
        }
        self.deps.hypervisor.validate(&req.config)?;
        // Per-VM limits and host paths; a few stat calls, cheap enough inline.
        self.admission
            .check_vm(admitted_as.unwrap_or(&req.config))?;
        self.require_backend().await?;
        // Before anything is registered or spawned: a refusal leaves nothing half-created.
        self.require_descriptors()?;
        let id = match req.vm_id.take() {
            Some(id) => id,
            None => self.fresh_id(),
        };
        // The taps (and MACs) of managed interfaces follow from the id.
        crate::domain::network::assign(&mut req.config, &id)?;
        let (tx, created) = {
            // Check-then-insert under one lock: a concurrent create of the same id
            // sees this VM, and concurrent creates cannot overshoot the host totals.
            let mut vms = self.registry.write();
            if let Some(existing) = vms.get(&id) {
                if existing.creating() {
                    return Err(VmError::Unavailable(format!(
                        "vm {id} is being created by another request; retry"
                    )));
                }
                let snap = existing.current().snapshot.clone();
                return if snap.config == req.config && restore.is_none() {
                    Ok(snap)
                } else {
                    Err(VmError::AlreadyExists(id.to_string()))
                };
            }
            self.admission.limits.check_host(
                vms.values()
                    .map(|e| Footprint::of(&e.current().snapshot.config)),
                &req.config,
            )?;
            // Under the same lock: two creates cannot both take one tap.
            let views: Vec<_> = vms
                .iter()
                .map(|(id, e)| (id.clone(), e.current()))
                .collect();
            crate::domain::network::check_taps_free(
                &req.config,
                views.iter().map(|(id, v)| (id, &v.snapshot.config)),
            )?;
            let now = self.deps.clock.now_unix();
            let vm = Vm::creating(id.clone(), req.config, now);
            let (owner, view) = match restore {
                None => Owner::creating(vm, self.deps.clone()),
                Some(from) => Owner::restoring(vm, self.deps.clone(), from),
            };
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            let (created_tx, created_rx) = oneshot::channel();
            if !self.deps.tasks.spawn(owner.run(rx, Some(created_tx))) {
                return Err(stopping_error());
            }
            vms.insert(
                id.clone(),
                Entry {
                    tx: tx.clone(),
                    view,
                },
            );
            (tx, created_rx)
        };
        let result = created.await.unwrap_or_else(|_| {
            Err(VmError::Internal(format!(
                "the owner of vm {id} ended during its create"
            )))
        });
        if result.is_err() {
            self.registry.remove_if_owned_by(&id, &tx);
        }
        result
    }

    fn fresh_id(&self) -> VmId {
        loop {
            let candidate = format!("vm-{}", uuid::Uuid::new_v4().simple());
            // uuid hex is always a valid id; the loop guards only against a collision.
            if let Ok(id) = VmId::parse(&candidate)
                && !self.registry.contains(&id)
            {
                return id;
            }
        }
    }
}

impl<H: Hypervisor, S: VmStore> VmService for VmManager<H, S> {
    async fn create_vm(&self, req: CreateVm) -> Result<VmSnapshot, VmError> {
        self.create(req).await
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

    /// Answers from the owner's view: state as last observed (kept true by
    /// the VMM's events, exits and the sample timer), metrics as last sampled.
    async fn get_vm_info(&self, id: VmId) -> Result<Arc<VmDetails>, VmError> {
        self.require_backend().await?;
        let (_, view) = self.created_view(&id)?;
        Ok(view)
    }

    async fn list_vms(&self, query: ListQuery) -> Result<VmPage, VmError> {
        self.require_backend().await?;
        let size = paging::page_size(&query);
        let after = paging::start_after(&query)?;
        // The revision first, then the views: every change up to it is in them (see feed/mod.rs).
        let revision = self.deps.feed.revision();
        let (views, more) = self.registry.page(&query.states, after.as_ref(), size);
        let total = self.registry.listed().total(&query.states);
        Ok(paging::page(&views, more, total, revision))
    }

    async fn get_console_output(
        &self,
        id: VmId,
        offset: u64,
        max_bytes: u32,
    ) -> Result<ConsoleChunk, VmError> {
        self.require_backend().await?;
        let (_, view) = self.created_view(&id)?;
        let max_bytes = console::read_size(max_bytes);
        console::read(&*self.deps.hypervisor, &view.snapshot, offset, max_bytes).await
    }

    async fn stream_console(&self, id: VmId, offset: u64) -> Result<ConsoleStream, VmError> {
        self.require_backend().await?;
        if self.deps.feed.is_closed() {
            return Err(VmError::Unavailable(
                "VMCP is shutting down; stream again when it is back".into(),
            ));
        }
        let (entry, view) = self.created_view(&id)?;
        // A VM without a console is refused now, not after the stream has begun.
        console::read(&*self.deps.hypervisor, &view.snapshot, offset, 0).await?;
        Ok(console::follow(
            Arc::clone(&self.deps.hypervisor),
            entry.view,
            Arc::clone(&self.deps.feed),
            offset,
        ))
    }

    async fn write_console(&self, id: VmId, data: Vec<u8>) -> Result<usize, VmError> {
        self.require_backend().await?;
        let (entry, _) = self.created_view(&id)?;
        ask(&entry, &id, |reply| Request::WriteConsole(data, reply)).await
    }

    /// Checks the new size against the VM's ceilings and the admission
    /// limits (per VM, and the host totals with this VM at its new size),
    /// then has the owner resize it.
    async fn resize_vm(
        &self,
        id: VmId,
        vcpu_count: i32,
        memory_bytes: i64,
    ) -> Result<VmSnapshot, VmError> {
        self.require_backend().await?;
        let (_, view) = self.created_view(&id)?;
        // A backend that cannot resize says so before any size is judged.
        self.deps.hypervisor.can_resize().map_err(|e| match e {
            HypervisorError::Unsupported(m) => VmError::Unimplemented(m),
            e => VmError::Unavailable(e.to_string()),
        })?;
        let size = view.snapshot.config.resized(vcpu_count, memory_bytes)?;
        let mut resized = view.snapshot.config.clone();
        resized.set_size(size);
        self.admission.limits.check_vm(&resized)?;
        {
            let vms = self.registry.read();
            self.admission.limits.check_host(
                vms.iter()
                    .filter(|(other, _)| **other != id)
                    .map(|(_, e)| Footprint::of(&e.current().snapshot.config)),
                &resized,
            )?;
        }
        self.command(id, Command::Resize(size)).await
    }

    async fn snapshot_vm(
        &self,
        id: VmId,
        snapshot_id: Option<SnapshotId>,
        resume: bool,
        kind: SnapshotKind,
    ) -> Result<SnapshotInfo, VmError> {
        self.take_snapshot(id, snapshot_id, resume, kind).await
    }

    async fn list_snapshots(
        &self,
        source_vm_id: Option<VmId>,
    ) -> Result<Vec<SnapshotInfo>, VmError> {
        Ok(self
            .snapshots()?
            .list(source_vm_id.as_ref().map(VmId::as_str)))
    }

    async fn get_snapshot(&self, id: SnapshotId) -> Result<SnapshotInfo, VmError> {
        self.snapshots()?.get(&id)
    }

    async fn delete_snapshot(&self, id: SnapshotId) -> Result<(), VmError> {
        self.snapshots()?.delete(&*self.deps.store, &id).await
    }

    async fn restore_vm(&self, req: RestoreVm) -> Result<VmSnapshot, VmError> {
        self.restore(req).await
    }

    async fn watch_vms(&self, query: WatchQuery) -> Result<WatchStream, VmError> {
        self.require_backend().await?;
        let registry = &self.registry;
        self.deps.feed.subscribe(query, || {
            registry
                .views(&[])
                .into_iter()
                .filter(|v| v.snapshot.generation > 0)
                .map(|v| Arc::new(v.snapshot.clone()))
                .collect()
        })
    }
}

/// Sends the request `make` builds to VM `id`'s owner and waits for its
/// answer. A full queue is `unavailable`; an owner that is gone (the VM was
/// deleted meanwhile) is `not_found`.
async fn ask<T>(
    entry: &Entry,
    id: &VmId,
    make: impl FnOnce(oneshot::Sender<Result<T, VmError>>) -> Request,
) -> Result<T, VmError> {
    let (reply_tx, reply_rx) = oneshot::channel();
    entry.tx.try_send(make(reply_tx)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => VmError::Unavailable(format!(
            "vm {id} has {QUEUE_DEPTH} operations queued; retry later"
        )),
        mpsc::error::TrySendError::Closed(_) => VmError::NotFound(id.to_string()),
    })?;
    reply_rx
        .await
        .map_err(|_| VmError::NotFound(id.to_string()))?
}

/// Open connections and the caps, for the health endpoint.
pub type ConnectionCounts = Arc<dyn Fn() -> (u64, u64, u64) + Send + Sync>;

/// Health answers for the health endpoint, from the manager's own view.
pub struct ManagerHealth<H, S> {
    manager: Arc<VmManager<H, S>>,
    telemetry: Arc<dyn Fn() -> String + Send + Sync>,
    connections: Option<ConnectionCounts>,
}

impl<H, S> std::fmt::Debug for ManagerHealth<H, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerHealth")
            .field("manager", &self.manager)
            .field("connections", &self.connections.is_some())
            .finish_non_exhaustive()
    }
}

impl<H: Hypervisor, S: VmStore> ManagerHealth<H, S> {
    /// Health for `manager`; `telemetry` describes the telemetry pipeline.
    pub fn new(
        manager: Arc<VmManager<H, S>>,
        telemetry: Arc<dyn Fn() -> String + Send + Sync>,
    ) -> Self {
        Self {
            manager,
            telemetry,
            connections: None,
        }
    }

    /// Also reports client connections: `counts` gives (open, cap, per-client cap).
    pub fn with_connections(mut self, counts: ConnectionCounts) -> Self {
        self.connections = Some(counts);
        self
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
            descriptors: self.manager.descriptor_budget().map(|b| {
                let now = b.now();
                let (open, max, per_client) = self.connections.as_ref().map_or((0, 0, 0), |c| c());
                crate::ports::DescriptorHealth {
                    limit: now.limit,
                    in_use: now.in_use,
                    free: now.free,
                    reserved_for_vms: now.reserved,
                    vm_operation_needs: VM_OPERATION_DESCRIPTORS,
                    connections_open: open,
                    max_connections: max,
                    max_connections_per_client: per_client,
                }
            }),
        }
    }
}
