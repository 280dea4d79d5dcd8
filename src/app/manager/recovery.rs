//! Start-up recovery, performed: loads every stored record, asks the host
//! what runs (one discovery scan), lets the core's decision table
//! ([`crate::domain::recovery::decide`]) say what to do with each VM, and
//! does it: adopt the live VMM, register a VM without one, finish an
//! interrupted delete or roll back an interrupted create. VMMs whose
//! runtime directory belongs to no record are removed or reported.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::domain::recovery::{Decision, Host, Live, decide};
use crate::domain::restart::Cause;
use crate::domain::{Vm, VmError, VmId, VmSnapshot};
use crate::ports::{Hypervisor, VmRecord, VmStore, VmmProcess, WatchEventKind};

use crate::app::owner::{Deps, Owner, QUEUE_DEPTH, event_channel, handle_without_vmm, timed_call};

use super::registry::{Entry, Registry};

/// The revision of a host that never recorded a change (see `recover`).
pub const FIRST_REVISION: u64 = 1;

/// What recovery did, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// VMs whose VMM runs and was re-adopted.
    pub adopted: usize,
    /// VMs registered without a VMM (stopped, or whose VMM died while VMCP was down).
    pub without_vmm: usize,
    /// Records removed (interrupted deletes finished, interrupted creates rolled back).
    pub removed: usize,
    /// VMMs or runtime directories that belonged to no VM.
    pub orphans: usize,
    /// Managed taps: orphans swept, vanished ones recreated.
    pub taps: crate::app::network::Swept,
}

/// Whether two identities name the same process.
fn same_process(a: &VmmProcess, b: &VmmProcess) -> bool {
    a.pid == b.pid && a.start_time == b.start_time
}

/// What the host shows for a record: which process is live, and its identity.
/// A recorded process that the scan did not find is still tried (its socket
/// may live outside the runtime directory); adopting it verifies it.
fn live_process(
    recorded: Option<&VmmProcess>,
    discovered: Option<VmmProcess>,
) -> (Live, Option<VmmProcess>) {
    match (discovered, recorded) {
        (Some(d), Some(r)) if same_process(&d, r) => (Live::Recorded, Some(r.clone())),
        (Some(d), _) => (Live::Replacement, Some(d)),
        (None, Some(r)) => (Live::Recorded, Some(r.clone())),
        (None, None) => (Live::Nothing, None),
    }
}

/// Recovers every stored VM into `registry`.
pub async fn recover<H: Hypervisor, S: VmStore>(
    deps: &Deps<H, S>,
    registry: &Registry,
    remove_orphans: bool,
) -> Result<Recovered, VmError> {
    let records = deps
        .store
        .load_all()
        .await
        .map_err(|e| VmError::Unavailable(e.to_string()))?;
    // Revisions continue from the highest ever recorded, never backwards. A host
    // that never recorded a change is at revision 1, not 0: 0 in a watch request
    // means "live changes only", so a list's revision must never be 0.
    let revision = deps
        .store
        .revision()
        .await
        .map_err(|e| VmError::Unavailable(e.to_string()))?;
    deps.feed.resume_after(revision.max(FIRST_REVISION));
    let h = &*deps.hypervisor;
    let tel = &*deps.telemetry;
    let t = deps.call_timeout;
    // Read before anything is decided; the mark is left again once every VM is.
    let started_since_boot = h.started_since_boot().await;
    let mut discovery_failed = false;
    let mut found: BTreeMap<VmId, Option<VmmProcess>> = match timed_call(
        h.kind(),
        tel,
        "discover",
        t,
        h.discover(),
    )
    .await
    {
        Ok(list) => list.into_iter().map(|d| (d.id, d.process)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not scan for VMM processes; orphans are not cleaned up");
            discovery_failed = true;
            BTreeMap::new()
        }
    };
    let mut done = Recovered::default();
    // Each VM is recovered on its own (its adopt asks its VMM), so a host
    // with many VMs is recovered RECOVERY_CONCURRENCY at a time.
    let work: Vec<_> = records
        .into_iter()
        .map(|rec| {
            let listed = found.remove(&rec.snapshot.id);
            (rec, listed)
        })
        .collect();
    let outcomes: Vec<Outcome> = futures_util::stream::iter(work)
        .map(|(rec, listed)| {
            // Its VMM and its runtime directory are gone, and no VMCP started
            // since the host booted: the host restarted.
            let restarted =
                listed.is_none() && !discovery_failed && started_since_boot != Some(true);
            recover_one(deps, registry, rec, listed, restarted, remove_orphans)
        })
        .buffer_unordered(RECOVERY_CONCURRENCY)
        .collect()
        .await;
    for outcome in outcomes {
        match outcome {
            Outcome::Adopted => done.adopted += 1,
            Outcome::WithoutVmm => done.without_vmm += 1,
            Outcome::Removed => done.removed += 1,
            Outcome::Skipped => {}
        }
    }
    for (id, process) in found {
        done.orphans += 1;
        let pid = process.as_ref().map(|p| p.pid);
        if !remove_orphans {
            tracing::warn!(vm.id = %id, pid, "VMM runtime directory belongs to no VM (left in place: UNKEY_VMCP_ORPHANS=report)");
            continue;
        }
        tracing::warn!(vm.id = %id, pid, "VMM runtime directory belongs to no VM: removing it");
        if let Err(e) = timed_call(
            h.kind(),
            tel,
            "destroy_orphan",
            t,
            h.destroy_orphan(&id, process),
        )
        .await
        {
            tracing::error!(vm.id = %id, error = %e, "could not clean up an orphaned VMM");
        }
    }
    // Every VM is decided: from now on a create's intent without its created
    // record means VMCP crashed in this boot, not that the host restarted.
    if let Err(e) = h.mark_started().await {
        tracing::warn!(error = %e, "could not mark this start in the runtime directory; the next start takes the host as restarted");
    }
    Ok(done)
}

/// How many VMs recovery works on at once.
const RECOVERY_CONCURRENCY: usize = 32;

/// What recovery did with one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Adopted,
    WithoutVmm,
    Removed,
    /// Nothing to count (a decision that changed under it).
    Skipped,
}

/// Recovers the VM of `rec`, given what the scan listed for it (`None`:
/// neither its VMM nor its runtime directory).
async fn recover_one<H: Hypervisor, S: VmStore>(
    deps: &Deps<H, S>,
    registry: &Registry,
    rec: VmRecord,
    listed: Option<Option<VmmProcess>>,
    restarted: bool,
    remove_orphans: bool,
) -> Outcome {
    let h = &*deps.hypervisor;
    let tel = &*deps.telemetry;
    let t = deps.call_timeout;
    let id = rec.snapshot.id.clone();
    let discovered = listed.flatten();
    let running = discovered.is_some();
    let (live, candidate) = live_process(rec.process.as_ref(), discovered);
    let has_process = rec.process.is_some();
    let policy = rec
        .snapshot
        .config
        .restart_policy
        .or(deps.restart.default_policy);
    let host = |live| Host { live, restarted };
    let mut decision = decide(&rec.snapshot, has_process, host(live), policy);
    tracing::debug!(vm.id = %id, ?live, ?decision, "recovery decision");
    let events = event_channel();
    let mut adopted = None;
    // Why a VMM that runs could not be adopted, when it could not.
    let mut unadopted = None;
    if let Decision::Adopt(_) = decision {
        match timed_call(
            h.kind(),
            tel,
            "adopt",
            t,
            h.adopt(
                &id,
                &rec.snapshot.config,
                candidate.clone(),
                events.0.clone(),
            ),
        )
        .await
        {
            Ok(pair) => adopted = Some(pair),
            Err(e) => {
                tracing::warn!(vm.id = %id, error = %e, "the VM's VMM cannot be adopted");
                decision = decide(&rec.snapshot, has_process, host(Live::Nothing), policy);
                if let Some(p) = candidate.clone().filter(|_| running) {
                    unadopted =
                        Some(end_unadopted(deps, &id, p, &e.to_string(), remove_orphans).await);
                }
            }
        }
    }
    // A restart is a registration whose owner then boots the VM.
    let (decision, restart) = match decision {
        Decision::Restart { state, reason } => (Decision::Register { state, reason }, true),
        d => (d, false),
    };
    // The VMM did not exit: say what happened to it instead.
    let decision = match (decision, unadopted) {
        (Decision::Register { state, .. }, Some(reason)) => Decision::Register { state, reason },
        (d, _) => d,
    };
    match decision {
        Decision::Restart { .. } => Outcome::Skipped,
        Decision::FinishDelete(_) | Decision::RollBackCreate(_) => {
            let what = if matches!(decision, Decision::FinishDelete(_)) {
                "completed a delete interrupted by a restart"
            } else {
                "rolled back a create interrupted by a restart"
            };
            match timed_call(
                h.kind(),
                tel,
                "destroy_orphan",
                t,
                h.destroy_orphan(&id, candidate),
            )
            .await
            {
                Ok(()) => {
                    forget(deps, rec.snapshot).await;
                    tracing::info!(vm.id = %id, "{what}");
                    Outcome::Removed
                }
                Err(e) => {
                    // Keep the record (desired Deleted, or the half-made create) so the
                    // next start tries again; serve the VM meanwhile so it can be deleted.
                    tracing::error!(vm.id = %id, error = %e, "could not end the VM's VMM; the next start tries again");
                    let state = rec.snapshot.state;
                    let reason = format!("recovery could not end its VMM: {e}");
                    let stored = rec.process;
                    register(
                        deps,
                        registry,
                        rec.snapshot,
                        stored,
                        rec.diff_parent,
                        None,
                        events,
                        state,
                        reason,
                        None,
                    )
                    .await;
                    Outcome::WithoutVmm
                }
            }
        }
        Decision::Adopt(_) => {
            let Some((vmm, reported)) = adopted else {
                return Outcome::Skipped;
            };
            let snap = rec.snapshot;
            let reason = if reported.reason.is_empty() && reported.state == snap.state {
                snap.reason.clone()
            } else {
                reported.reason
            };
            register(
                deps,
                registry,
                snap,
                rec.process,
                rec.diff_parent,
                Some(vmm),
                events,
                reported.state,
                reason,
                None,
            )
            .await;
            Outcome::Adopted
        }
        Decision::Register { state, reason } => {
            let vmm = match handle_without_vmm(deps, &id, &rec.snapshot.config, events.0.clone())
                .await
            {
                Ok(vmm) => Some(vmm),
                Err(e) => {
                    tracing::error!(vm.id = %id, error = %e, "the VM cannot get a VMM handle; it can only be deleted");
                    None
                }
            };
            register(
                deps,
                registry,
                rec.snapshot,
                rec.process,
                rec.diff_parent,
                vmm,
                events,
                state,
                reason,
                restart.then_some(if restarted {
                    Cause::HostRestart
                } else if state == crate::domain::VmState::Shutdown {
                    Cause::Poweroff
                } else {
                    Cause::Crash
                }),
            )
            .await;
            Outcome::WithoutVmm
        }
    }
}

/// A VMM of `id` runs but could not be adopted (its API did not answer, or
/// it is not what the record says). It must not run on beside a VM that
/// has no VMM: a delete would leave it behind and a boot would start a
/// second one. So it is ended as an orphan would be (or left and reported
/// when orphans are); returns the VM's reason saying which.
async fn end_unadopted<H: Hypervisor, S: VmStore>(
    deps: &Deps<H, S>,
    id: &VmId,
    process: VmmProcess,
    error: &str,
    remove_orphans: bool,
) -> String {
    let pid = process.pid;
    if !remove_orphans {
        tracing::warn!(vm.id = %id, pid, "the VM's VMM cannot be adopted; left running (UNKEY_VMCP_ORPHANS=report)");
        return format!(
            "its VMM (pid {pid}) could not be adopted when VMCP started and was left running (orphans are only reported): {error}"
        );
    }
    let h = &*deps.hypervisor;
    match timed_call(
        h.kind(),
        &*deps.telemetry,
        "destroy_orphan",
        deps.call_timeout,
        h.destroy_orphan(id, Some(process)),
    )
    .await
    {
        Ok(()) => {
            tracing::warn!(vm.id = %id, pid, "ended the VM's VMM, which could not be adopted");
            format!(
                "its VMM (pid {pid}) could not be adopted when VMCP started and was ended: {error}"
            )
        }
        Err(e) => {
            tracing::error!(vm.id = %id, pid, error = %e, "could not end the VM's VMM, which could not be adopted");
            format!(
                "its VMM (pid {pid}) could not be adopted when VMCP started, nor ended ({e}): {error}"
            )
        }
    }
}

/// Removes the record of a VM whose delete (or create) recovery finished.
/// A VM clients knew of (generation > 0) is gone: watchers hear of it.
async fn forget<H: Hypervisor, S: VmStore>(deps: &Deps<H, S>, mut snap: VmSnapshot) {
    let id = snap.id.clone();
    if snap.generation == 0 {
        if let Err(e) = deps.store.remove(&id, deps.feed.revision()).await {
            tracing::error!(vm.id = %id, error = %e, "could not remove a VM record");
        }
        return;
    }
    let rec = deps.feed.record();
    snap.revision = rec.revision();
    if let Err(e) = deps.store.remove(&id, snap.revision).await {
        tracing::error!(vm.id = %id, error = %e, "could not remove a VM record");
    }
    let state = snap.state;
    rec.commit(WatchEventKind::Deleted, Arc::new(snap), Some(state));
}

/// Records the recovered state (with the VMM's identity) and starts the VM's owner.
#[allow(clippy::too_many_arguments)]
async fn register<H: Hypervisor, S: VmStore>(
    deps: &Deps<H, S>,
    registry: &Registry,
    snap: VmSnapshot,
    stored: Option<VmmProcess>,
    diff_parent: Option<crate::domain::snapshot::DiffParent>,
    vmm: Option<H::Vm>,
    events: (
        crate::ports::VmmEventSink,
        mpsc::UnboundedReceiver<crate::ports::VmmEvent>,
    ),
    state: crate::domain::VmState,
    reason: String,
    restart: Option<Cause>,
) {
    let id = snap.id.clone();
    let (mut owner, view) = Owner::recovered(
        Vm::restore(snap),
        stored,
        diff_parent,
        vmm,
        deps.clone(),
        events,
    );
    owner.settle(state, reason).await;
    if let Some(cause) = restart {
        owner.restart(cause).await;
    }
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    if !deps.tasks.spawn(owner.run(rx, None)) {
        // VMCP is stopping: the VM is left as recorded, for the next start.
        return;
    }
    registry.insert(id, Entry { tx, view });
}
