//! A test double for the `Hypervisor` port that is as unkind as a real VMM.
//! It lives in tests/ only, so production configuration can never reach it.
//!
//! The double simulates a *host*: a table of VMM processes, each with a pid,
//! a start time, a socket path, the VM it serves, its state and whether it
//! still runs, plus the runtime directories a runtime-dir scan would find.
//! The host is shared ([`Host`]) and outlives any one [`Double`]: a second
//! `Double` built with [`Double::on_host`] is a restarted VMCP looking at the
//! same, still running VMMs. Each VM's handle ([`DoubleVm`]) names the
//! process it drives by pid *and* start time, as the real supervision layer
//! does.
//!
//! Rules it follows (the real VMMs, as observed):
//!
//! ```text
//!                     Cloud Hypervisor (default)        Firecracker (Double::firecracker)
//! create              new VMM, Created                  new VMM, Created ("Not started")
//! boot  Created       Running, same VMM                 Running, same VMM
//! boot  no VMM        NEW VMM (new pid), Running        NEW VMM (new pid), Running
//! shutdown graceful   Running: guest powers off, the    Running/Paused: VMM ends, Shutdown,
//!                     VMM exits 0 -> Shutdown, no VMM;   no VMM
//!                     Paused: hard stop -> Created
//! shutdown force      Created, same VMM                 VMM killed, Shutdown, no VMM
//! reboot              Running, same VMM                 Running/Paused: NEW VMM, Running
//! pause / resume      Running <-> Paused                Running <-> Paused
//! guest poweroff      VMM exits 0: Exited{Shutdown}     VMM exits 0: Exited{Shutdown}
//! kill (SIGKILL)      Exited{Failed}                    Exited{Failed}
//! event monitor       StateChanged for every change,    none (Firecracker has no events)
//!                     VMCP's own ones included
//! resize Running      the VMM's size changes; samples   unsupported (no hot-plug, no balloon)
//!                     report it
//! console             each new VMM starts the VM's console over; a boot prints a
//!                     marker; console input is unsupported on both
//! snapshot            Running/Paused: paused, `memory` and `vmstate` written to the
//!                     directory, resumed if asked
//! restore             a NEW VMM loads the directory (Paused, or Running if asked);
//!                     the guest continues: no boot marker on its console
//! ```
//!
//! Every handle operation runs in a spawned task, so an operation whose
//! caller gave up (a timeout dropped its future) still completes and takes
//! effect when its delay ends: apply-then-answer-late. Inside that task an
//! operation takes the VM's API lock (a VMM serves one request at a time, so
//! a late operation and the next one apply in order), passes any [`Gate`],
//! sleeps its scripted delay, checks its scripted fault, applies, then sleeps
//! its scripted answer delay. Exits ([`Double::kill`],
//! [`Double::guest_poweroff`]) never wait for that lock: they happen at any
//! moment, also while an operation is in flight.
//!
//! Nothing here is random: pids count up from 1000, start times by 100 ticks
//! per spawn, and every fault is scripted by the test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Mutex as ApiLock, OwnedMutexGuard, watch};

use vmcp::domain::{VmConfig, VmConfigError, VmId, VmSize, VmState};
use vmcp::ports::{
    BackendCheck, BackendKind, ConsoleChunk, Discovered, Hypervisor, HypervisorError, Reported,
    ShutdownMode, VmMetrics, VmmEvent, VmmEventSink, VmmHandle, VmmInfo, VmmProcess,
};

/// The reason of an exit by SIGKILL ([`Double::kill`]).
pub const SIGKILL_REASON: &str = "VMM killed by signal 9 (SIGKILL)";
/// The reason of an exit with status 0 ([`Double::guest_poweroff`]).
pub const POWEROFF_REASON: &str = "VMM exited with status 0 (the guest powered off)";

/// What a boot prints on the VM's console (a new line per boot).
pub const BOOT_MARKER: &str = "double guest: booted\n";

/// Every operation a test can delay, fail or hold ("info" is accepted for "sample").
const OPS: [&str; 16] = [
    "check",
    "create",
    "adopt",
    "discover",
    "destroy_orphan",
    "boot",
    "shutdown",
    "pause",
    "resume",
    "reboot",
    "delete",
    "sample",
    "resize",
    "read_console",
    "snapshot",
    "restore",
];

/// The operations [`Stats::calls`] counts.
const MUTATING: [&str; 10] = [
    "create", "boot", "shutdown", "pause", "resume", "reboot", "delete", "resize", "snapshot",
    "restore",
];

/// The canonical name of `name`; a typo in a test is a panic, not a knob that never fires.
fn op(name: &str) -> &'static str {
    let name = if name == "info" { "sample" } else { name };
    OPS.iter()
        .copied()
        .find(|o| *o == name)
        .unwrap_or_else(|| panic!("the double has no operation {name:?}; known: {OPS:?}"))
}

fn vm_id(id: &str) -> VmId {
    VmId::parse(id).unwrap_or_else(|e| panic!("{id:?} is not a VM id: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not hide the next failure.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A process on the simulated host is named by pid and start time together.
type Key = (u32, u64);

/// One simulated VMM process.
#[derive(Debug)]
struct Proc {
    vm: VmId,
    socket_path: String,
    /// The VM's state while it runs; its exit state (Shutdown or Failed) after.
    state: VmState,
    alive: bool,
    exit_reason: String,
    /// The VM's size in this process.
    size: VmSize,
    /// Where its exits and state changes go: the owner that created or last adopted it.
    sink: Option<VmmEventSink>,
}

#[derive(Debug)]
enum Script {
    Delay(Duration),
    Fail(HypervisorError),
    FailAfterApply(HypervisorError),
}

/// A one-shot script entry; `vm: None` matches any VM (and host-level calls).
#[derive(Debug)]
struct Scripted {
    vm: Option<VmId>,
    op: &'static str,
    what: Script,
}

impl Scripted {
    fn matches(&self, op: &str, vm: Option<&VmId>) -> bool {
        self.op == op && (self.vm.is_none() || self.vm.as_ref() == vm)
    }
}

#[derive(Debug)]
struct HostState {
    /// Every process that ever ran, dead ones included (their exit is kept).
    procs: BTreeMap<Key, Proc>,
    /// Runtime directories, by VM.
    dirs: BTreeSet<VmId>,
    /// A VMCP marked its start since the host last booted (the runtime root's mark).
    started: bool,
    next_pid: u32,
    ticks: u64,
    reuse_pid: Option<u32>,
    healthy: bool,
    event_monitor: bool,
    delays: HashMap<&'static str, Duration>,
    answer_delays: HashMap<&'static str, Duration>,
    failures: HashMap<&'static str, HypervisorError>,
    scripted: Vec<Scripted>,
    respawn_failures: BTreeMap<VmId, usize>,
    deaf: BTreeSet<VmId>,
    gates: Vec<(Option<VmId>, &'static str, Gate)>,
    api_locks: HashMap<VmId, Arc<ApiLock<()>>>,
    /// Each VM's console: what its newest VMM printed (a new VMM starts it over).
    consoles: BTreeMap<VmId, Vec<u8>>,
}

impl HostState {
    fn is_alive(&self, pid: u32) -> bool {
        self.procs.iter().any(|((p, _), pr)| *p == pid && pr.alive)
    }

    /// The live processes serving `vm`, oldest first.
    fn live_of(&self, vm: &VmId) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .procs
            .iter()
            .filter(|(_, p)| p.alive && &p.vm == vm)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_by_key(|k| k.1);
        keys
    }

    fn identity(&self, key: Key) -> VmmProcess {
        VmmProcess {
            pid: key.0,
            start_time: key.1,
            socket_path: self
                .procs
                .get(&key)
                .map(|p| p.socket_path.clone())
                .unwrap_or_default(),
        }
    }

    /// Starts a VMM process for `vm`: a pid no live process has, a start time
    /// later than any before, and the VM's runtime directory.
    fn spawn(
        &mut self,
        vm: &VmId,
        state: VmState,
        sink: Option<VmmEventSink>,
        size: VmSize,
    ) -> VmmProcess {
        let pid = match self.reuse_pid.take() {
            Some(p) if !self.is_alive(p) => p,
            _ => {
                while self.is_alive(self.next_pid) {
                    self.next_pid += 1;
                }
                self.next_pid += 1;
                self.next_pid - 1
            }
        };
        self.ticks += 100;
        let socket_path = format!("/run/vmcp-double/{vm}/api.sock");
        self.dirs.insert(vm.clone());
        self.procs.insert(
            (pid, self.ticks),
            Proc {
                vm: vm.clone(),
                socket_path: socket_path.clone(),
                state,
                alive: true,
                exit_reason: String::new(),
                size,
                sink,
            },
        );
        self.consoles.insert(vm.clone(), Vec::new());
        if state == VmState::Running {
            self.print(vm, BOOT_MARKER);
        }
        VmmProcess {
            pid,
            start_time: self.ticks,
            socket_path,
        }
    }

    /// Ends a live process; `notify` sends `Exited` to its owner (an exit nobody asked for).
    fn end(&mut self, key: Key, state: VmState, reason: &str, notify: bool) -> bool {
        let Some(p) = self.procs.get_mut(&key) else {
            return false;
        };
        if !p.alive {
            return false;
        }
        p.alive = false;
        p.state = state;
        p.exit_reason = reason.to_owned();
        if notify && let Some(sink) = &p.sink {
            let _ = sink.send(VmmEvent::Exited {
                pid: key.0,
                state,
                reason: reason.to_owned(),
            });
        }
        true
    }

    /// Changes a live process's state and, with the event monitor on, says so to its owner.
    fn set_state(&mut self, key: Key, state: VmState, event: &str) {
        if let Some(p) = self.procs.get_mut(&key) {
            p.state = state;
        }
        self.emit(key, state, event);
    }

    fn emit(&self, key: Key, state: VmState, event: &str) {
        if !self.event_monitor {
            return;
        }
        if let Some(Proc {
            alive: true,
            sink: Some(sink),
            ..
        }) = self.procs.get(&key)
        {
            let _ = sink.send(VmmEvent::StateChanged {
                pid: key.0,
                state,
                reason: event.to_owned(),
            });
        }
    }

    /// Removes `vm`'s runtime directory (its console with it) unless a live VMM still uses it.
    fn remove_dir_if_unused(&mut self, vm: &VmId) {
        if self.live_of(vm).is_empty() {
            self.dirs.remove(vm);
            self.consoles.remove(vm);
        }
    }

    /// The guest of `vm` writes `text` to its serial console.
    fn print(&mut self, vm: &VmId, text: &str) {
        self.consoles
            .entry(vm.clone())
            .or_default()
            .extend_from_slice(text.as_bytes());
    }

    /// Consumes one scripted respawn failure of `vm`, if any.
    fn take_respawn_failure(&mut self, vm: &VmId) -> bool {
        let Some(n) = self.respawn_failures.get_mut(vm) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.respawn_failures.remove(vm);
        }
        true
    }
}

/// A simulated host: the VMM processes and runtime directories that outlive any VMCP.
#[derive(Debug)]
pub struct Host {
    kind: BackendKind,
    state: Mutex<HostState>,
    /// Bumped on every change, so tests wait for effects instead of sleeping.
    changes: watch::Sender<u64>,
}

impl Host {
    fn new(kind: BackendKind) -> Arc<Self> {
        Arc::new(Self {
            kind,
            state: Mutex::new(HostState {
                procs: BTreeMap::new(),
                dirs: BTreeSet::new(),
                started: false,
                next_pid: 1000,
                ticks: 10_000,
                reuse_pid: None,
                healthy: true,
                event_monitor: kind == BackendKind::CloudHypervisor,
                delays: HashMap::new(),
                answer_delays: HashMap::new(),
                failures: HashMap::new(),
                scripted: Vec::new(),
                respawn_failures: BTreeMap::new(),
                deaf: BTreeSet::new(),
                gates: Vec::new(),
                api_locks: HashMap::new(),
                consoles: BTreeMap::new(),
            }),
            changes: watch::Sender::new(0),
        })
    }

    /// Which VMM the host's processes are.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    fn read<R>(&self, f: impl FnOnce(&HostState) -> R) -> R {
        f(&lock(&self.state))
    }

    fn mutate<R>(&self, f: impl FnOnce(&mut HostState) -> R) -> R {
        let r = f(&mut lock(&self.state));
        self.changes.send_modify(|n| *n += 1);
        r
    }

    /// The front half of every call: the VM's API lock (when `serialize`),
    /// gates, delays, then a fault scripted to answer instead of acting.
    async fn begin(
        &self,
        op: &'static str,
        vm: Option<&VmId>,
        serialize: bool,
    ) -> Result<Begun, HypervisorError> {
        let api = match vm {
            Some(vm) if serialize => {
                let l = self.read(|s| s.api_locks.get(vm).cloned());
                let l = match l {
                    Some(l) => l,
                    None => self.mutate(|s| Arc::clone(s.api_locks.entry(vm.clone()).or_default())),
                };
                Some(l.lock_owned().await)
            }
            _ => None,
        };
        let gates: Vec<Gate> = self.read(|s| {
            s.gates
                .iter()
                .filter(|(v, o, _)| *o == op && (v.is_none() || v.as_ref() == vm))
                .map(|(_, _, g)| g.clone())
                .collect()
        });
        for g in gates {
            g.pass().await;
        }
        let delay = self.mutate(|s| {
            let mut d = s.delays.get(op).copied().unwrap_or_default();
            if let Some(i) = s
                .scripted
                .iter()
                .position(|e| e.matches(op, vm) && matches!(e.what, Script::Delay(_)))
                && let Script::Delay(x) = s.scripted.remove(i).what
            {
                d += x;
            }
            d
        });
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (before, late, answer_delay) = self.mutate(|s| {
            let answer_delay = s.answer_delays.get(op).copied();
            if let Some(e) = s.failures.get(op) {
                return (Some(e.clone()), None, answer_delay);
            }
            let found = s.scripted.iter().position(|e| {
                e.matches(op, vm) && matches!(e.what, Script::Fail(_) | Script::FailAfterApply(_))
            });
            match found.map(|i| s.scripted.remove(i).what) {
                Some(Script::Fail(e)) => (Some(e), None, answer_delay),
                Some(Script::FailAfterApply(e)) => (None, Some(e), answer_delay),
                _ => (None, None, answer_delay),
            }
        });
        if let Some(e) = before {
            return Err(e);
        }
        Ok(Begun {
            _api: api,
            late,
            answer_delay,
        })
    }
}

/// A call that passed its gates, delays and up-front faults.
struct Begun {
    _api: Option<OwnedMutexGuard<()>>,
    late: Option<HypervisorError>,
    answer_delay: Option<Duration>,
}

impl Begun {
    /// The back half: the answer delay, then a fault scripted to replace the answer.
    async fn finish<T>(self, r: Result<T, HypervisorError>) -> Result<T, HypervisorError> {
        if let Some(d) = self.answer_delay {
            tokio::time::sleep(d).await;
        }
        match self.late {
            Some(e) => Err(e),
            None => r,
        }
    }
}

/// Runs `work` in its own task: the caller's future being dropped never cancels it.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, HypervisorError>> + Send + 'static,
) -> Result<T, HypervisorError> {
    match tokio::spawn(work).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A point where calls wait until the test opens it (no sleeps needed to
/// hold an operation in flight). Opened gates let everything through.
#[derive(Clone, Debug)]
pub struct Gate(Arc<GateInner>);

#[derive(Debug)]
struct GateInner {
    open: watch::Sender<bool>,
    arrivals: watch::Sender<usize>,
}

impl Gate {
    fn new() -> Self {
        Self(Arc::new(GateInner {
            open: watch::Sender::new(false),
            arrivals: watch::Sender::new(0),
        }))
    }

    /// Lets every held call (and every later one) through.
    pub fn open(&self) {
        self.0.open.send_replace(true);
    }

    /// Waits until at least `n` calls reached the gate in total.
    pub async fn arrived(&self, n: usize) {
        let mut rx = self.0.arrivals.subscribe();
        let _ = rx.wait_for(|a| *a >= n).await;
    }

    /// How many calls reached the gate so far.
    pub fn arrivals(&self) -> usize {
        *self.0.arrivals.borrow()
    }

    async fn pass(&self) {
        let mut rx = self.0.open.subscribe();
        self.0.arrivals.send_modify(|n| *n += 1);
        let _ = rx.wait_for(|o| *o).await;
    }
}

/// What one VMCP instance asked of the double (fresh for each [`Double`]).
#[derive(Debug, Default)]
pub struct Stats {
    /// Highest number of concurrent calls seen on any single VM (across its handles).
    pub max_concurrency_per_vm: AtomicUsize,
    /// Total mutating calls (create, boot, shutdown, pause, resume, reboot, delete, resize).
    pub calls: AtomicUsize,
    /// Total `sample` calls.
    pub samples: AtomicUsize,
    /// Successful `destroy_orphan` calls.
    pub orphans_destroyed: AtomicUsize,
    in_flight: Mutex<HashMap<VmId, usize>>,
}

impl Stats {
    fn enter(self: &Arc<Self>, id: &VmId, op: &'static str) -> InFlight {
        if MUTATING.contains(&op) {
            self.calls.fetch_add(1, Ordering::SeqCst);
        }
        if op == "sample" {
            self.samples.fetch_add(1, Ordering::SeqCst);
        }
        let mut f = lock(&self.in_flight);
        let n = f.entry(id.clone()).or_default();
        *n += 1;
        self.max_concurrency_per_vm.fetch_max(*n, Ordering::SeqCst);
        InFlight {
            stats: Arc::clone(self),
            id: id.clone(),
        }
    }
}

/// Counts a caller's call for as long as the caller waits for it (an
/// abandoned call stops counting when its caller gives up).
struct InFlight {
    stats: Arc<Stats>,
    id: VmId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.stats.in_flight).get_mut(&self.id) {
            *n -= 1;
        }
    }
}

/// The `Hypervisor`: one VMCP's view of a simulated host, plus the test's knobs.
#[derive(Debug)]
pub struct Double {
    host: Arc<Host>,
    stats: Arc<Stats>,
}

impl Default for Double {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for Double {
    type Target = Stats;

    fn deref(&self) -> &Stats {
        &self.stats
    }
}

impl Double {
    /// A healthy Cloud Hypervisor double on a fresh host.
    pub fn new() -> Self {
        Self::on_host(Host::new(BackendKind::CloudHypervisor))
    }

    /// A healthy Firecracker double on a fresh host.
    pub fn firecracker() -> Self {
        Self::on_host(Host::new(BackendKind::Firecracker))
    }

    /// A double over an existing host (a restarted VMCP), with fresh counters.
    pub fn on_host(host: Arc<Host>) -> Self {
        Self {
            host,
            stats: Arc::new(Stats::default()),
        }
    }

    /// The host, to build another double over it.
    pub fn host(&self) -> Arc<Host> {
        Arc::clone(&self.host)
    }

    /// Shorthand for `Double::on_host(self.host())`: the same VMMs, a new VMCP.
    pub fn restarted(&self) -> Self {
        Self::on_host(self.host())
    }

    // ---- knobs -------------------------------------------------------------

    /// Makes `check()` fail (binary missing) or succeed.
    pub fn set_healthy(&self, healthy: bool) {
        self.host.mutate(|s| s.healthy = healthy);
    }

    /// Makes every `op` wait `d` before acting (sticky, all VMs).
    pub fn delay(&self, op_name: &str, d: Duration) {
        let o = op(op_name);
        self.host.mutate(|s| s.delays.insert(o, d));
    }

    /// Makes the next `op` on `vm` wait `d` before acting (one-shot).
    pub fn delay_next(&self, vm: &str, op_name: &str, d: Duration) {
        self.script(Some(vm_id(vm)), op(op_name), Script::Delay(d));
    }

    /// Makes every `op` act at once but answer only after `d` (sticky, all VMs).
    pub fn delay_answer(&self, op_name: &str, d: Duration) {
        let o = op(op_name);
        self.host.mutate(|s| s.answer_delays.insert(o, d));
    }

    /// Makes every `op` fail with `e` without acting (sticky, all VMs, until [`Double::reset`]).
    pub fn fail(&self, op_name: &str, e: HypervisorError) {
        let o = op(op_name);
        self.host.mutate(|s| s.failures.insert(o, e));
    }

    /// Makes the next `op` on any VM (or the next host-level `op`) fail with `e` (one-shot).
    pub fn fail_once(&self, op_name: &str, e: HypervisorError) {
        self.script(None, op(op_name), Script::Fail(e));
    }

    /// Makes the next `op` on `vm` fail with `e` without acting (one-shot; queued in order).
    pub fn fail_next(&self, vm: &str, op_name: &str, e: HypervisorError) {
        self.script(Some(vm_id(vm)), op(op_name), Script::Fail(e));
    }

    /// Makes the next `op` on `vm` act, then answer `e` instead (the answer was lost).
    pub fn fail_next_after_apply(&self, vm: &str, op_name: &str, e: HypervisorError) {
        self.script(Some(vm_id(vm)), op(op_name), Script::FailAfterApply(e));
    }

    /// Makes the next respawn of `vm`'s VMM (boot with no VMM, Firecracker
    /// reboot) answer `SpawnFailed` and leave no process. Calls add up.
    pub fn fail_respawn(&self, vm: &str) {
        let id = vm_id(vm);
        self.host
            .mutate(|s| *s.respawn_failures.entry(id).or_default() += 1);
    }

    /// Holds every `op` (any VM) at a gate until the test opens it.
    pub fn hold(&self, op_name: &str) -> Gate {
        self.add_gate(None, op(op_name))
    }

    /// Holds every `op` on `vm` at a gate until the test opens it.
    pub fn hold_vm(&self, vm: &str, op_name: &str) -> Gate {
        self.add_gate(Some(vm_id(vm)), op(op_name))
    }

    /// Makes `vm`'s guest ignore the power button / Ctrl-Alt-Del: a graceful
    /// shutdown waits its whole timeout, then stops the VM hard.
    pub fn ignore_power_button(&self, vm: &str) {
        let id = vm_id(vm);
        self.host.mutate(|s| s.deaf.insert(id));
    }

    /// Turns the VMMs' `StateChanged` events on or off (on for Cloud Hypervisor by default).
    pub fn set_event_monitor(&self, on: bool) {
        self.host.mutate(|s| s.event_monitor = on);
    }

    /// Gives `pid` (if no live process has it) to the next VMM started: pid reuse.
    pub fn reuse_pid(&self, pid: u32) {
        self.host.mutate(|s| s.reuse_pid = Some(pid));
    }

    /// Clears every delay, fault, respawn failure and deaf guest, and opens
    /// and forgets every gate. Health and the event monitor stay as they are.
    pub fn reset(&self) {
        self.host.mutate(|s| {
            s.delays.clear();
            s.answer_delays.clear();
            s.failures.clear();
            s.scripted.clear();
            s.respawn_failures.clear();
            s.deaf.clear();
            for (_, _, g) in s.gates.drain(..) {
                g.open();
            }
        });
    }

    fn script(&self, vm: Option<VmId>, op: &'static str, what: Script) {
        self.host
            .mutate(|s| s.scripted.push(Scripted { vm, op, what }));
    }

    fn add_gate(&self, vm: Option<VmId>, op: &'static str) -> Gate {
        let g = Gate::new();
        self.host.mutate(|s| s.gates.push((vm, op, g.clone())));
        g
    }

    // ---- things that happen on the host ------------------------------------

    /// SIGKILLs every VMM of `vm`: each owner gets `Exited { Failed }`. Returns the pids.
    pub fn kill(&self, vm: &str) -> Vec<u32> {
        let id = vm_id(vm);
        self.host.mutate(|s| {
            let keys = s.live_of(&id);
            for k in &keys {
                s.end(*k, VmState::Failed, SIGKILL_REASON, true);
            }
            keys.iter().map(|k| k.0).collect()
        })
    }

    /// SIGKILLs the process `pid` (whatever it serves). False if none runs.
    pub fn kill_pid(&self, pid: u32) -> bool {
        self.host.mutate(|s| {
            let key = s.procs.iter().find(|((p, _), pr)| *p == pid && pr.alive);
            match key.map(|(k, _)| *k) {
                Some(k) => s.end(k, VmState::Failed, SIGKILL_REASON, true),
                None => false,
            }
        })
    }

    /// The guest of `vm` powers off: its running VMM exits 0 and its owner
    /// gets `Exited { Shutdown }`. False if no VMM of `vm` runs a guest (a
    /// paused or unbooted guest cannot power off).
    pub fn guest_poweroff(&self, vm: &str) -> bool {
        let id = vm_id(vm);
        self.host.mutate(|s| {
            let running: Vec<Key> = s
                .live_of(&id)
                .into_iter()
                .filter(|k| s.procs[k].state == VmState::Running)
                .collect();
            for k in &running {
                s.end(*k, VmState::Shutdown, POWEROFF_REASON, true);
            }
            !running.is_empty()
        })
    }

    /// Another client pauses `vm` directly on its VMM socket (an event if the monitor is on).
    pub fn pause_directly(&self, vm: &str) -> bool {
        self.change_directly(vm, VmState::Running, VmState::Paused, "vm/paused")
    }

    /// Another client resumes `vm` directly on its VMM socket (an event if the monitor is on).
    pub fn resume_directly(&self, vm: &str) -> bool {
        self.change_directly(vm, VmState::Paused, VmState::Running, "vm/resumed")
    }

    fn change_directly(&self, vm: &str, from: VmState, to: VmState, event: &str) -> bool {
        let id = vm_id(vm);
        self.host.mutate(|s| {
            let keys: Vec<Key> = s
                .live_of(&id)
                .into_iter()
                .filter(|k| s.procs[k].state == from)
                .collect();
            for k in &keys {
                s.set_state(*k, to, event);
            }
            !keys.is_empty()
        })
    }

    /// Starts a running VMM that no VMCP record knows about (left by a crash).
    pub fn plant_orphan(&self, vm: &str) -> VmmProcess {
        let id = vm_id(vm);
        let size = VmSize {
            vcpu_count: 1,
            memory_bytes: 128 << 20,
        };
        self.host
            .mutate(|s| s.spawn(&id, VmState::Running, None, size))
    }

    /// The guest of `vm` prints `text` on its console (its VMM must run).
    pub fn guest_prints(&self, vm: &str, text: &str) {
        let id = vm_id(vm);
        self.host.mutate(|s| {
            assert!(!s.live_of(&id).is_empty(), "no VMM runs for {vm}");
            s.print(&id, text);
        });
    }

    /// Resizes the live VMM of `vm` behind VMCP's back: another client on
    /// its socket, or a resize VMCP asked for whose answer and record a
    /// crash cut off.
    pub fn resize_directly(&self, vm: &str, size: VmSize) {
        let id = vm_id(vm);
        self.host.mutate(|s| {
            let k = *s.live_of(&id).last().expect("a live VMM");
            s.procs.get_mut(&k).expect("its process").size = size;
        });
    }

    /// The size the live VMM of `vm` has (None when none runs).
    pub fn size_of(&self, vm: &str) -> Option<VmSize> {
        let id = vm_id(vm);
        self.host.read(|s| {
            s.live_of(&id)
                .last()
                .and_then(|k| s.procs.get(k))
                .map(|p| p.size)
        })
    }

    /// What a host reboot does (with VMCP stopped): every VMM ends, nobody
    /// is told, and every runtime directory is gone (tmpfs).
    pub fn host_reboot(&self) {
        self.host.mutate(|s| {
            let keys: Vec<Key> = s
                .procs
                .iter()
                .filter(|(_, p)| p.alive)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                s.end(k, VmState::Failed, "the host rebooted", false);
            }
            s.dirs.clear();
            s.started = false;
        });
    }

    /// Leaves a runtime directory for `vm` with no process (a create cut short).
    pub fn plant_stale_dir(&self, vm: &str) {
        let id = vm_id(vm);
        self.host.mutate(|s| s.dirs.insert(id));
    }

    // ---- what the host shows -----------------------------------------------

    /// How many VMM processes run (not how many VMs VMCP knows).
    pub fn vmm_count(&self) -> usize {
        self.host
            .read(|s| s.procs.values().filter(|p| p.alive).count())
    }

    /// Live VMM pids by VM. More than one pid for a VM is a leak.
    pub fn live_pids(&self) -> BTreeMap<VmId, Vec<u32>> {
        self.host.read(|s| {
            let mut out: BTreeMap<VmId, Vec<u32>> = BTreeMap::new();
            let mut live: Vec<(&Key, &Proc)> = s.procs.iter().filter(|(_, p)| p.alive).collect();
            live.sort_by_key(|(k, _)| k.1);
            for (k, p) in live {
                out.entry(p.vm.clone()).or_default().push(k.0);
            }
            out
        })
    }

    /// Panics if any VM has more than one live VMM.
    pub fn assert_one_vmm_per_vm(&self) {
        let dup: BTreeMap<VmId, Vec<u32>> = self
            .live_pids()
            .into_iter()
            .filter(|(_, pids)| pids.len() > 1)
            .collect();
        assert!(dup.is_empty(), "VMs with more than one live VMM: {dup:?}");
    }

    /// The pid of `vm`'s live VMM (the newest, if a leak left several).
    pub fn pid_of(&self, vm: &str) -> Option<u32> {
        self.process_of(vm).map(|p| p.pid)
    }

    /// The identity of `vm`'s live VMM (the newest, if a leak left several).
    pub fn process_of(&self, vm: &str) -> Option<VmmProcess> {
        let id = vm_id(vm);
        self.host
            .read(|s| s.live_of(&id).last().map(|k| s.identity(*k)))
    }

    /// The state `vm`'s live VMM reports (the newest, if several); None when none runs.
    pub fn state_of(&self, vm: &str) -> Option<VmState> {
        let id = vm_id(vm);
        self.host
            .read(|s| s.live_of(&id).last().map(|k| s.procs[k].state))
    }

    /// Whether anyone still listens to the events of `vm`'s live VMM (its
    /// owner task, which drops the receiving end when it ends).
    pub fn is_watched(&self, vm: &str) -> bool {
        let id = vm_id(vm);
        self.host.read(|s| {
            s.live_of(&id)
                .iter()
                .any(|k| s.procs[k].sink.as_ref().is_some_and(|t| !t.is_closed()))
        })
    }

    /// Whether a process with this pid runs (whatever it serves).
    pub fn is_alive(&self, pid: u32) -> bool {
        self.host.read(|s| s.is_alive(pid))
    }

    /// Every pid any VMM of `vm` ever had, oldest first.
    pub fn pids_ever(&self, vm: &str) -> Vec<u32> {
        let id = vm_id(vm);
        self.host.read(|s| {
            let mut keys: Vec<Key> = s
                .procs
                .iter()
                .filter(|(_, p)| p.vm == id)
                .map(|(k, _)| *k)
                .collect();
            keys.sort_by_key(|k| k.1);
            keys.into_iter().map(|k| k.0).collect()
        })
    }

    /// Whether `vm` has a runtime directory on the host.
    pub fn has_runtime_dir(&self, vm: &str) -> bool {
        let id = vm_id(vm);
        self.host.read(|s| s.dirs.contains(&id))
    }

    /// Calls on `vm` whose callers are waiting right now.
    pub fn in_flight(&self, vm: &str) -> usize {
        let id = vm_id(vm);
        lock(&self.stats.in_flight).get(&id).copied().unwrap_or(0)
    }

    /// Waits (on the host's change notifications, not by polling a clock)
    /// until `f` holds or `within` passes; says whether it held.
    pub async fn wait_until(&self, within: Duration, mut f: impl FnMut(&Double) -> bool) -> bool {
        let mut rx = self.host.changes.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            rx.borrow_and_update();
            if f(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return f(self),
            }
        }
    }

    fn handle(&self, id: &VmId, events: VmmEventSink, cur: Cur) -> DoubleVm {
        DoubleVm {
            host: Arc::clone(&self.host),
            stats: Arc::clone(&self.stats),
            id: id.clone(),
            events,
            cur: Arc::new(Mutex::new(cur)),
        }
    }

    fn binary(&self) -> &'static str {
        match self.host.kind {
            BackendKind::CloudHypervisor => "cloud-hypervisor",
            BackendKind::Firecracker => "firecracker",
        }
    }
}

/// What a handle knows about its VM between calls.
#[derive(Debug)]
struct Cur {
    /// The process it drives (it may have died since).
    process: Option<VmmProcess>,
    /// The size a new VMM of this VM gets (the config's, as resized).
    size: VmSize,
    /// State and reason when it drives no process.
    idle_state: VmState,
    idle_reason: String,
}

/// What the host shows for a handle's VM.
enum Look {
    Live(Key, VmState),
    /// The handle's process died (behind its back or by its own hand).
    Died(u32, VmState, String),
    /// The handle has no process.
    Idle(VmState, String),
}

fn look(s: &HostState, cur: &Cur) -> Look {
    match &cur.process {
        None => Look::Idle(cur.idle_state, cur.idle_reason.clone()),
        Some(p) => {
            let key = (p.pid, p.start_time);
            match s.procs.get(&key) {
                Some(pr) if pr.alive => Look::Live(key, pr.state),
                Some(pr) => Look::Died(p.pid, pr.state, pr.exit_reason.clone()),
                None => Look::Died(p.pid, VmState::Failed, "no such process".to_owned()),
            }
        }
    }
}

fn refused(op: &str, from: VmState) -> HypervisorError {
    HypervisorError::InvalidState(format!("{op}: invalid state transition from {from:?}"))
}

fn no_vmm(op: &str, id: &VmId, state: VmState) -> HypervisorError {
    HypervisorError::InvalidState(format!("{op}: no VMM runs for vm {id} (it is {state:?})"))
}

fn gone(id: &VmId, pid: u32, reason: &str) -> HypervisorError {
    HypervisorError::Gone(format!("VMM pid {pid} of vm {id} exited: {reason}"))
}

/// One VM's VMM, as the owner task holds it.
#[derive(Debug)]
pub struct DoubleVm {
    host: Arc<Host>,
    stats: Arc<Stats>,
    id: VmId,
    events: VmmEventSink,
    /// Shared with this handle's detached calls, so a late respawn still
    /// updates what the handle knows.
    cur: Arc<Mutex<Cur>>,
}

impl DoubleVm {
    /// The VM this handle drives.
    pub fn id(&self) -> &VmId {
        &self.id
    }

    fn twin(&self) -> Self {
        Self {
            host: Arc::clone(&self.host),
            stats: Arc::clone(&self.stats),
            id: self.id.clone(),
            events: self.events.clone(),
            cur: Arc::clone(&self.cur),
        }
    }

    /// Counts the call for as long as its caller waits, and runs it detached.
    async fn run<T: Send + 'static>(
        &mut self,
        op: &'static str,
        work: impl Future<Output = Result<T, HypervisorError>> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let _counted = self.stats.enter(&self.id, op);
        detached(work).await
    }

    /// Applies `f` to the host and this handle's knowledge at once.
    fn apply<R>(&self, f: impl FnOnce(&mut HostState, &mut Cur) -> R) -> R {
        let mut cur = lock(&self.cur);
        self.host.mutate(|s| f(s, &mut cur))
    }

    fn reported(s: &HostState, state: VmState, key: Key) -> Reported {
        Reported {
            state,
            reason: String::new(),
            process: Some(s.identity(key)),
        }
    }

    /// Starts a new VMM for this VM, running (the old one MUST already be
    /// gone). On a scripted respawn failure, no process and `idle` after.
    fn respawn(
        &self,
        s: &mut HostState,
        cur: &mut Cur,
        idle: VmState,
    ) -> Result<Reported, HypervisorError> {
        if s.take_respawn_failure(&self.id) {
            let message = format!(
                "the new VMM of vm {} exited during start-up (scripted)",
                self.id
            );
            cur.process = None;
            cur.idle_state = idle;
            cur.idle_reason.clone_from(&message);
            return Err(HypervisorError::spawn_failed(message));
        }
        let p = s.spawn(
            &self.id,
            VmState::Running,
            Some(self.events.clone()),
            cur.size,
        );
        let key = (p.pid, p.start_time);
        s.emit(key, VmState::Running, "vm/booted");
        cur.process = Some(p.clone());
        Ok(Reported {
            state: VmState::Running,
            reason: String::new(),
            process: Some(p),
        })
    }

    fn apply_boot(&self) -> Result<Reported, HypervisorError> {
        self.apply(|s, cur| match look(s, cur) {
            Look::Live(k, VmState::Created) => {
                s.set_state(k, VmState::Running, "vm/booted");
                s.print(&self.id, BOOT_MARKER);
                Ok(Self::reported(s, VmState::Running, k))
            }
            Look::Live(_, st) => Err(refused("boot", st)),
            Look::Died(_, st, _) | Look::Idle(st, _) => self.respawn(s, cur, st),
        })
    }

    /// Whether a graceful shutdown will have to wait out a deaf guest.
    fn waits_for_deaf_guest(&self, mode: ShutdownMode) -> bool {
        let cur = lock(&self.cur);
        self.host.read(|s| {
            !mode.force
                && s.deaf.contains(&self.id)
                && matches!(
                    look(s, &cur),
                    Look::Live(_, VmState::Running | VmState::Paused)
                )
        })
    }

    fn apply_shutdown(&self, hard: bool) -> Result<Reported, HypervisorError> {
        let kind = self.host.kind;
        self.apply(|s, cur| {
            let stopped = |s: &mut HostState, cur: &mut Cur, k: Key, reason: &str| {
                s.end(k, VmState::Shutdown, reason, false);
                cur.process = None;
                cur.idle_state = VmState::Shutdown;
                cur.idle_reason = reason.to_owned();
                Reported {
                    state: VmState::Shutdown,
                    reason: reason.to_owned(),
                    process: None,
                }
            };
            match (kind, look(s, cur)) {
                // CH: the power button makes the guest power off; CH then exits 0.
                (BackendKind::CloudHypervisor, Look::Live(k, VmState::Running)) if !hard => {
                    Ok(stopped(
                        s,
                        cur,
                        k,
                        "the guest powered off (power button); the VMM exited 0",
                    ))
                }
                // CH: vm.shutdown (and a paused guest, which cannot hear the button).
                (
                    BackendKind::CloudHypervisor,
                    Look::Live(k, VmState::Running | VmState::Paused),
                ) => {
                    s.set_state(k, VmState::Created, "vm/shutdown");
                    Ok(Self::reported(s, VmState::Created, k))
                }
                (BackendKind::Firecracker, Look::Live(k, VmState::Running | VmState::Paused)) => {
                    let reason = if hard {
                        "stopped by VMCP (VMM killed)"
                    } else {
                        "the guest powered off (Ctrl-Alt-Del); the VMM exited 0"
                    };
                    Ok(stopped(s, cur, k, reason))
                }
                (_, Look::Live(_, st)) => Err(refused("shutdown", st)),
                (_, Look::Died(pid, _, reason)) => Err(gone(&self.id, pid, &reason)),
                (_, Look::Idle(st, _)) => Err(no_vmm("shutdown", &self.id, st)),
            }
        })
    }

    fn apply_switch(
        &self,
        op: &str,
        from: VmState,
        to: VmState,
        event: &str,
    ) -> Result<Reported, HypervisorError> {
        self.apply(|s, cur| match look(s, cur) {
            Look::Live(k, st) if st == from => {
                s.set_state(k, to, event);
                Ok(Self::reported(s, to, k))
            }
            Look::Live(_, st) => Err(refused(op, st)),
            Look::Died(pid, _, reason) => Err(gone(&self.id, pid, &reason)),
            Look::Idle(st, _) => Err(no_vmm(op, &self.id, st)),
        })
    }

    fn apply_reboot(&self) -> Result<Reported, HypervisorError> {
        let kind = self.host.kind;
        self.apply(|s, cur| match (kind, look(s, cur)) {
            (BackendKind::CloudHypervisor, Look::Live(k, VmState::Running)) => {
                s.emit(k, VmState::Running, "vm/rebooted");
                // vm.reboot truncates a file-backed serial output.
                s.consoles.insert(self.id.clone(), Vec::new());
                s.print(&self.id, BOOT_MARKER);
                Ok(Self::reported(s, VmState::Running, k))
            }
            // Firecracker has no reboot: VMCP ends the VMM and starts a new one.
            (BackendKind::Firecracker, Look::Live(k, VmState::Running | VmState::Paused)) => {
                s.end(k, VmState::Shutdown, "replaced by a reboot", false);
                self.respawn(s, cur, VmState::Shutdown)
            }
            (_, Look::Live(_, st)) => Err(refused("reboot", st)),
            (_, Look::Died(pid, _, reason)) => Err(gone(&self.id, pid, &reason)),
            (_, Look::Idle(st, _)) => Err(no_vmm("reboot", &self.id, st)),
        })
    }

    fn apply_resize(&self, size: VmSize) -> Result<(Reported, VmSize), HypervisorError> {
        let kind = self.host.kind;
        self.apply(|s, cur| match (kind, look(s, cur)) {
            (BackendKind::Firecracker, _) => Err(HypervisorError::Unsupported(
                "firecracker cannot resize a VM (double)".to_owned(),
            )),
            (_, Look::Live(k, VmState::Running)) => {
                if let Some(p) = s.procs.get_mut(&k) {
                    p.size = size;
                }
                cur.size = size;
                Ok((Self::reported(s, VmState::Running, k), size))
            }
            (_, Look::Live(_, st)) => Err(refused("resize", st)),
            (_, Look::Died(pid, _, reason)) => Err(gone(&self.id, pid, &reason)),
            (_, Look::Idle(st, _)) => Err(no_vmm("resize", &self.id, st)),
        })
    }

    /// Pauses a running VM, writes the snapshot's files, resumes it if asked.
    /// A full snapshot's memory is 1 KiB of 7s per MiB of guest memory; a
    /// diff's is as long, sparse, with only its first page written (4 KiB of 8s).
    fn apply_snapshot(
        &self,
        dir: &std::path::Path,
        kind: vmcp::domain::snapshot::SnapshotKind,
        resume: bool,
    ) -> Result<Reported, HypervisorError> {
        use vmcp::domain::snapshot::SnapshotKind;
        if kind == SnapshotKind::Diff && self.host.kind == BackendKind::CloudHypervisor {
            return Err(HypervisorError::Unsupported(
                "cloudhypervisor has no diff snapshots (double)".into(),
            ));
        }
        self.apply(|s, cur| match look(s, cur) {
            Look::Live(k, VmState::Running | VmState::Paused) => {
                s.set_state(k, VmState::Paused, "vm/paused");
                let size = s.procs.get(&k).map(|p| p.size).expect("a live process");
                let memory = usize::try_from(size.memory_bytes >> 20).expect("small") * 1024;
                let path = dir.join("memory");
                let written = match kind {
                    SnapshotKind::Full => std::fs::write(&path, vec![7u8; memory]),
                    SnapshotKind::Diff => std::fs::File::create(&path).and_then(|f| {
                        use std::os::unix::fs::FileExt;
                        f.set_len(memory as u64)?;
                        f.write_all_at(&[8u8; 4096], 0)
                    }),
                };
                written
                    .and_then(|()| std::fs::write(dir.join("vmstate"), self.id.as_str()))
                    .map_err(|e| {
                        HypervisorError::resource_exhausted(format!(
                            "cannot write the snapshot: {e}"
                        ))
                    })?;
                let state = if resume {
                    s.set_state(k, VmState::Running, "vm/resumed");
                    VmState::Running
                } else {
                    VmState::Paused
                };
                Ok(Self::reported(s, state, k))
            }
            Look::Live(_, st) => Err(refused("snapshot", st)),
            Look::Died(pid, _, reason) => Err(gone(&self.id, pid, &reason)),
            Look::Idle(st, _) => Err(no_vmm("snapshot", &self.id, st)),
        })
    }

    fn apply_delete(&self) {
        let id = self.id.clone();
        self.apply(|s, cur| {
            if let Look::Live(k, _) = look(s, cur) {
                s.end(k, VmState::Shutdown, "deleted by VMCP", false);
            }
            cur.process = None;
            cur.idle_state = VmState::Shutdown;
            cur.idle_reason = "deleted".to_owned();
            s.remove_dir_if_unused(&id);
        });
    }

    fn read_sample(&self) -> VmmInfo {
        let cur = lock(&self.cur);
        let version = match self.host.kind {
            BackendKind::CloudHypervisor => "double cloud-hypervisor v53.0",
            BackendKind::Firecracker => "double firecracker v1.10.1",
        };
        self.host.read(|s| {
            let mut backend_info = BTreeMap::new();
            backend_info.insert("version".to_owned(), version.to_owned());
            backend_info.insert(
                "spawns".to_owned(),
                s.procs
                    .values()
                    .filter(|p| p.vm == self.id)
                    .count()
                    .to_string(),
            );
            match look(s, &cur) {
                Look::Live(k, st) => {
                    let p = s.identity(k);
                    backend_info.insert("pid".to_owned(), p.pid.to_string());
                    backend_info.insert("start_time".to_owned(), p.start_time.to_string());
                    backend_info.insert("socket".to_owned(), p.socket_path.clone());
                    VmmInfo {
                        state: Some(st),
                        reason: String::new(),
                        metrics: VmMetrics {
                            memory_usage_bytes: 64 << 20,
                            uptime_seconds: 1,
                            ..Default::default()
                        },
                        backend_info,
                        process: Some(p),
                        // Cloud Hypervisor's vm.info says the size; Firecracker's state does not.
                        size: s
                            .procs
                            .get(&k)
                            .map(|p| p.size)
                            .filter(|_| self.host.kind == BackendKind::CloudHypervisor),
                    }
                }
                Look::Died(pid, st, reason) => {
                    backend_info.insert("exited_pid".to_owned(), pid.to_string());
                    VmmInfo {
                        state: Some(st),
                        reason,
                        backend_info,
                        ..Default::default()
                    }
                }
                Look::Idle(st, reason) => VmmInfo {
                    state: Some(st),
                    reason,
                    backend_info,
                    ..Default::default()
                },
            }
        })
    }
}

impl VmmHandle for DoubleVm {
    fn process(&self) -> Option<VmmProcess> {
        let cur = lock(&self.cur);
        self.host.read(|s| match look(s, &cur) {
            Look::Live(k, _) => Some(s.identity(k)),
            Look::Died(..) | Look::Idle(..) => None,
        })
    }

    async fn boot(&mut self) -> Result<Reported, HypervisorError> {
        let me = self.twin();
        self.run("boot", async move {
            let b = me.host.begin("boot", Some(&me.id), true).await?;
            let r = me.apply_boot();
            b.finish(r).await
        })
        .await
    }

    async fn shutdown(&mut self, mode: ShutdownMode) -> Result<Reported, HypervisorError> {
        let me = self.twin();
        self.run("shutdown", async move {
            let b = me.host.begin("shutdown", Some(&me.id), true).await?;
            let deaf = me.waits_for_deaf_guest(mode);
            if deaf {
                tokio::time::sleep(mode.graceful_timeout).await;
            }
            let r = me.apply_shutdown(mode.force || deaf);
            b.finish(r).await
        })
        .await
    }

    async fn pause(&mut self) -> Result<Reported, HypervisorError> {
        let me = self.twin();
        self.run("pause", async move {
            let b = me.host.begin("pause", Some(&me.id), true).await?;
            let r = me.apply_switch("pause", VmState::Running, VmState::Paused, "vm/paused");
            b.finish(r).await
        })
        .await
    }

    async fn resume(&mut self) -> Result<Reported, HypervisorError> {
        let me = self.twin();
        self.run("resume", async move {
            let b = me.host.begin("resume", Some(&me.id), true).await?;
            let r = me.apply_switch("resume", VmState::Paused, VmState::Running, "vm/resumed");
            b.finish(r).await
        })
        .await
    }

    async fn reboot(&mut self, _force: bool) -> Result<Reported, HypervisorError> {
        let me = self.twin();
        self.run("reboot", async move {
            let b = me.host.begin("reboot", Some(&me.id), true).await?;
            let r = me.apply_reboot();
            b.finish(r).await
        })
        .await
    }

    async fn delete(&mut self, _force: bool) -> Result<(), HypervisorError> {
        let me = self.twin();
        self.run("delete", async move {
            let b = me.host.begin("delete", Some(&me.id), true).await?;
            me.apply_delete();
            b.finish(Ok(())).await
        })
        .await
    }

    async fn resize(&mut self, size: VmSize) -> Result<(Reported, VmSize), HypervisorError> {
        let me = self.twin();
        self.run("resize", async move {
            let b = me.host.begin("resize", Some(&me.id), true).await?;
            let r = me.apply_resize(size);
            b.finish(r).await
        })
        .await
    }

    async fn snapshot(
        &mut self,
        dir: &std::path::Path,
        kind: vmcp::domain::snapshot::SnapshotKind,
        resume: bool,
    ) -> Result<Reported, HypervisorError> {
        let me = self.twin();
        let dir = dir.to_owned();
        self.run("snapshot", async move {
            let b = me.host.begin("snapshot", Some(&me.id), true).await?;
            let r = me.apply_snapshot(&dir, kind, resume);
            b.finish(r).await
        })
        .await
    }

    async fn write_console(&mut self, _data: Vec<u8>) -> Result<usize, HypervisorError> {
        Err(HypervisorError::Unsupported(format!(
            "{}: console input is not available (double)",
            self.host.kind.as_str()
        )))
    }

    async fn sample(&mut self) -> Result<VmmInfo, HypervisorError> {
        let me = self.twin();
        self.run("sample", async move {
            let b = me.host.begin("sample", Some(&me.id), true).await?;
            let r = Ok(me.read_sample());
            b.finish(r).await
        })
        .await
    }
}

impl Hypervisor for Double {
    type Vm = DoubleVm;

    fn kind(&self) -> BackendKind {
        self.host.kind
    }

    async fn check(&self) -> Result<BackendCheck, HypervisorError> {
        let host = self.host();
        let binary = self.binary();
        detached(async move {
            let b = host.begin("check", None, false).await?;
            let r = if host.read(|s| s.healthy) {
                Ok(BackendCheck {
                    version: format!("double {binary} v53.0"),
                })
            } else {
                Err(HypervisorError::unavailable(format!(
                    "{binary} binary not found on PATH"
                )))
            };
            b.finish(r).await
        })
        .await
    }

    fn validate(&self, config: &VmConfig) -> Result<(), VmConfigError> {
        if !config.cpu.features.is_empty() {
            return Err(VmConfigError::new(
                "config.cpu.features",
                format!("not supported by {}", self.host.kind.as_str()),
            ));
        }
        Ok(())
    }

    fn can_resize(&self) -> Result<(), HypervisorError> {
        match self.host.kind {
            BackendKind::CloudHypervisor => Ok(()),
            BackendKind::Firecracker => Err(HypervisorError::Unsupported(
                "firecracker cannot resize a VM (double)".to_owned(),
            )),
        }
    }

    /// Late effect: a create whose caller gave up still starts its VMM, which
    /// then belongs to no handle (a leak VMCP must find with `discover`).
    async fn create(
        &self,
        id: &VmId,
        config: &VmConfig,
        events: VmmEventSink,
    ) -> Result<(DoubleVm, Reported), HypervisorError> {
        let _counted = self.stats.enter(id, "create");
        let handle = self.handle(
            id,
            events,
            Cur {
                process: None,
                size: config.size(),
                idle_state: VmState::Created,
                idle_reason: String::new(),
            },
        );
        detached(async move {
            let b = handle.host.begin("create", Some(&handle.id), true).await?;
            let r = handle.apply(|s, cur| {
                if let Some(k) = s.live_of(&handle.id).last() {
                    return Err(HypervisorError::spawn_failed(format!(
                        "the runtime directory of vm {} is in use by VMM pid {}",
                        handle.id, k.0
                    )));
                }
                let p = s.spawn(
                    &handle.id,
                    VmState::Created,
                    Some(handle.events.clone()),
                    cur.size,
                );
                cur.process = Some(p.clone());
                Ok(Reported {
                    state: VmState::Created,
                    reason: String::new(),
                    process: Some(p),
                })
            });
            b.finish(r.map(|rep| (handle, rep))).await
        })
        .await
    }

    /// A new VMM that loads the snapshot's files; like create, a restore
    /// whose caller gave up still starts it (a leak recovery must find).
    async fn restore(
        &self,
        id: &VmId,
        config: &VmConfig,
        dir: &std::path::Path,
        resume: bool,
        events: VmmEventSink,
    ) -> Result<(DoubleVm, Reported), HypervisorError> {
        let _counted = self.stats.enter(id, "restore");
        let handle = self.handle(
            id,
            events,
            Cur {
                process: None,
                size: config.size(),
                idle_state: VmState::Created,
                idle_reason: String::new(),
            },
        );
        let dir = dir.to_owned();
        detached(async move {
            let b = handle.host.begin("restore", Some(&handle.id), true).await?;
            let r = handle.apply(|s, cur| {
                if !dir.join("vmstate").is_file() || !dir.join("memory").is_file() {
                    return Err(HypervisorError::InvalidState(format!(
                        "snapshot/load: no snapshot in {}",
                        dir.display()
                    )));
                }
                if let Some(k) = s.live_of(&handle.id).last() {
                    return Err(HypervisorError::spawn_failed(format!(
                        "the runtime directory of vm {} is in use by VMM pid {}",
                        handle.id, k.0
                    )));
                }
                let state = if resume {
                    VmState::Running
                } else {
                    VmState::Paused
                };
                // Spawned Created so that no boot marker is printed: the guest continues.
                let p = s.spawn(
                    &handle.id,
                    VmState::Created,
                    Some(handle.events.clone()),
                    cur.size,
                );
                let key = (p.pid, p.start_time);
                s.set_state(
                    key,
                    state,
                    if resume { "vm/resumed" } else { "vm/restored" },
                );
                cur.process = Some(p);
                Ok(DoubleVm::reported(s, state, key))
            });
            b.finish(r.map(|rep| (handle, rep))).await
        })
        .await
    }

    async fn adopt(
        &self,
        id: &VmId,
        config: &VmConfig,
        process: Option<VmmProcess>,
        events: VmmEventSink,
    ) -> Result<(DoubleVm, Reported), HypervisorError> {
        let handle = self.handle(
            id,
            events,
            Cur {
                process: None,
                size: config.size(),
                idle_state: VmState::Shutdown,
                idle_reason: "no VMM runs".to_owned(),
            },
        );
        detached(async move {
            let b = handle.host.begin("adopt", Some(&handle.id), true).await?;
            let r = handle.apply(|s, cur| {
                let Some(p) = process else {
                    return Ok(Reported {
                        state: VmState::Shutdown,
                        reason: "no VMM runs".to_owned(),
                        process: None,
                    });
                };
                let key = (p.pid, p.start_time);
                let pid_in_use = s.is_alive(p.pid);
                match s.procs.get_mut(&key) {
                    None if pid_in_use => Err(HypervisorError::Gone(format!(
                        "pid {} is another process now (start time {} is not its)",
                        p.pid, p.start_time
                    ))),
                    None => Err(HypervisorError::Gone(format!(
                        "no process with pid {}",
                        p.pid
                    ))),
                    Some(pr) if !pr.alive => Err(HypervisorError::Gone(format!(
                        "VMM pid {} exited: {}",
                        p.pid, pr.exit_reason
                    ))),
                    Some(pr) if pr.vm != handle.id => Err(HypervisorError::Gone(format!(
                        "pid {} serves vm {}, not {}",
                        p.pid, pr.vm, handle.id
                    ))),
                    Some(pr) => {
                        pr.sink = Some(handle.events.clone());
                        // The VMM's own size wins over the record's (a resize a crash cut short).
                        cur.size = pr.size;
                        let state = pr.state;
                        cur.process = Some(s.identity(key));
                        Ok(DoubleVm::reported(s, state, key))
                    }
                }
            });
            b.finish(r.map(|rep| (handle, rep))).await
        })
        .await
    }

    /// The VM's console as a file would read: from `offset`, or the end's
    /// offset when past it (the console started over).
    async fn read_console(
        &self,
        id: &VmId,
        config: &VmConfig,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ConsoleChunk, HypervisorError> {
        let host = self.host();
        let id = id.clone();
        let enabled = config.console.enabled;
        detached(async move {
            let b = host.begin("read_console", Some(&id), false).await?;
            let r = if enabled {
                Ok(host.read(|s| {
                    let all = s.consoles.get(&id).map(Vec::as_slice).unwrap_or_default();
                    let end = all.len() as u64;
                    let start = offset.min(end);
                    let from = usize::try_from(start).expect("in memory");
                    let data = all[from..]
                        .iter()
                        .take(max_bytes)
                        .copied()
                        .collect::<Vec<_>>();
                    ConsoleChunk {
                        offset: start,
                        next_offset: start + data.len() as u64,
                        data,
                    }
                }))
            } else {
                Err(HypervisorError::Unsupported(format!(
                    "vm {id} has no console output (config.console.enabled is false)"
                )))
            };
            b.finish(r).await
        })
        .await
    }

    /// Like a runtime-dir scan: every live VMM with its VM, and every
    /// runtime directory no live VMM uses (sorted by VM id).
    async fn discover(&self) -> Result<Vec<Discovered>, HypervisorError> {
        let host = self.host();
        detached(async move {
            let b = host.begin("discover", None, false).await?;
            let found = host.read(|s| {
                let mut ids: BTreeSet<VmId> = s.dirs.clone();
                ids.extend(s.procs.values().filter(|p| p.alive).map(|p| p.vm.clone()));
                let mut out = Vec::new();
                for id in ids {
                    let live = s.live_of(&id);
                    if live.is_empty() {
                        out.push(Discovered { id, process: None });
                    } else {
                        for k in live {
                            out.push(Discovered {
                                id: id.clone(),
                                process: Some(s.identity(k)),
                            });
                        }
                    }
                }
                out
            });
            b.finish(Ok(found)).await
        })
        .await
    }

    async fn started_since_boot(&self) -> Option<bool> {
        Some(self.host.read(|s| s.started))
    }

    async fn mark_started(&self) -> Result<(), HypervisorError> {
        self.host.mutate(|s| s.started = true);
        Ok(())
    }

    /// Ends `process` only if it is exactly that VMM of `id` (pid and start
    /// time); removes the runtime directory unless another live VMM uses it.
    async fn destroy_orphan(
        &self,
        id: &VmId,
        process: Option<VmmProcess>,
    ) -> Result<(), HypervisorError> {
        let host = self.host();
        let stats = Arc::clone(&self.stats);
        let id = id.clone();
        detached(async move {
            let b = host.begin("destroy_orphan", Some(&id), false).await?;
            host.mutate(|s| {
                if let Some(p) = process {
                    let key = (p.pid, p.start_time);
                    if s.procs.get(&key).is_some_and(|pr| pr.alive && pr.vm == id) {
                        s.end(key, VmState::Failed, "destroyed as an orphan", false);
                    }
                }
                s.remove_dir_if_unused(&id);
            });
            let r = b.finish(Ok(())).await;
            if r.is_ok() {
                stats.orphans_destroyed.fetch_add(1, Ordering::SeqCst);
            }
            r
        })
        .await
    }
}

// ---- the double's own tests ------------------------------------------------

fn test_id(s: &str) -> VmId {
    vm_id(s)
}

fn exits(rx: &mut tokio::sync::mpsc::UnboundedReceiver<VmmEvent>) -> Vec<VmmEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if matches!(e, VmmEvent::Exited { .. }) {
            out.push(e);
        }
    }
    out
}

const GRACEFUL: ShutdownMode = ShutdownMode {
    force: false,
    graceful_timeout: Duration::from_secs(1),
};

#[tokio::test]
async fn double_respawn_gives_a_new_pid_and_start_time_and_the_old_pid_is_dead() {
    let d = Double::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut vm, created) = d
        .create(&test_id("re"), &VmConfig::default(), tx)
        .await
        .unwrap();
    assert_eq!(created.state, VmState::Created);
    let first = created.process.clone().unwrap();
    let booted = vm.boot().await.unwrap();
    assert_eq!(booted.state, VmState::Running);
    assert_eq!(
        booted.process.as_ref(),
        Some(&first),
        "a live VMM boots in place"
    );

    assert!(d.guest_poweroff("re"));
    assert_eq!(
        exits(&mut rx),
        vec![VmmEvent::Exited {
            pid: first.pid,
            state: VmState::Shutdown,
            reason: POWEROFF_REASON.to_owned(),
        }]
    );
    assert_eq!(vm.process(), None, "the handle knows its VMM ended");
    let sampled = vm.sample().await.unwrap();
    assert_eq!(
        sampled.state,
        Some(VmState::Shutdown),
        "a gone VMM reads as its exit"
    );
    assert_eq!(sampled.process, None);

    let again = vm.boot().await.unwrap();
    assert_eq!(again.state, VmState::Running);
    let second = again.process.clone().unwrap();
    assert_ne!(second.pid, first.pid);
    assert!(second.start_time > first.start_time);
    assert!(!d.is_alive(first.pid));
    assert!(d.is_alive(second.pid));
    assert_eq!(vm.process(), Some(second.clone()));
    assert_eq!(
        d.live_pids(),
        BTreeMap::from([(test_id("re"), vec![second.pid])])
    );
    assert_eq!(d.pids_ever("re"), vec![first.pid, second.pid]);

    vm.delete(false).await.unwrap();
    assert!(d.live_pids().is_empty());
    assert!(!d.has_runtime_dir("re"));
    vm.delete(true).await.unwrap();
    assert!(
        exits(&mut rx).is_empty(),
        "exits VMCP asked for are not news"
    );
}

#[tokio::test]
async fn double_firecracker_replaces_its_vmm_on_reboot_and_on_boot_after_shutdown() {
    let d = Double::firecracker();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut vm, created) = d
        .create(&test_id("fc"), &VmConfig::default(), tx)
        .await
        .unwrap();
    let first = created.process.unwrap();
    assert_eq!(vm.boot().await.unwrap().process, Some(first.clone()));

    let rebooted = vm.reboot(false).await.unwrap();
    assert_eq!(rebooted.state, VmState::Running);
    let second = rebooted.process.unwrap();
    assert_ne!(second.pid, first.pid);
    assert!(second.start_time > first.start_time);
    assert!(!d.is_alive(first.pid), "the old VMM was ended first");

    let stopped = vm.shutdown(GRACEFUL).await.unwrap();
    assert_eq!(stopped.state, VmState::Shutdown);
    assert_eq!(stopped.process, None);
    assert!(!d.is_alive(second.pid));
    assert!(d.live_pids().is_empty());

    let third = vm.boot().await.unwrap().process.unwrap();
    assert_ne!(third.pid, second.pid);
    assert!(third.start_time > second.start_time);
    assert_eq!(
        d.live_pids(),
        BTreeMap::from([(test_id("fc"), vec![third.pid])])
    );
    assert!(
        rx.try_recv().is_err(),
        "Firecracker sends no events of its own"
    );
}

#[tokio::test]
async fn double_adopt_checks_identity_by_pid_and_start_time() {
    let d = Double::new();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut vm, created) = d
        .create(&test_id("ad"), &VmConfig::default(), tx)
        .await
        .unwrap();
    let old = created.process.unwrap();
    vm.boot().await.unwrap();
    d.guest_poweroff("ad");
    let new = vm.boot().await.unwrap().process.unwrap();
    drop(vm);

    // VMCP restarts; the VMMs kept running.
    let d2 = d.restarted();
    let (tx2, mut rx2) = tokio::sync::mpsc::unbounded_channel();
    let cfg = VmConfig::default();
    let stale = d2
        .adopt(&test_id("ad"), &cfg, Some(old.clone()), tx2.clone())
        .await;
    assert!(
        matches!(stale, Err(HypervisorError::Gone(_))),
        "replaced identity"
    );
    let forged = VmmProcess {
        start_time: new.start_time + 1,
        ..new.clone()
    };
    let forged = d2
        .adopt(&test_id("ad"), &cfg, Some(forged), tx2.clone())
        .await;
    assert!(
        matches!(forged, Err(HypervisorError::Gone(_))),
        "same pid, other start"
    );
    let (vm2, adopted) = d2
        .adopt(&test_id("ad"), &cfg, Some(new.clone()), tx2.clone())
        .await
        .unwrap();
    assert_eq!(adopted.state, VmState::Running);
    assert_eq!(adopted.process, Some(new.clone()));
    assert_eq!(vm2.process(), Some(new.clone()));

    // The old pid goes to an unrelated VMM: alive, but not the one recorded.
    d2.reuse_pid(old.pid);
    let other = d2.plant_orphan("other");
    assert_eq!(other.pid, old.pid);
    let reused = d2.adopt(&test_id("ad"), &cfg, Some(old), tx2.clone()).await;
    assert!(matches!(reused, Err(HypervisorError::Gone(_))), "pid reuse");

    // Without a process, adopt hands back an empty handle and starts nothing.
    let before = d2.live_pids();
    let (cold, rep) = d2
        .adopt(&test_id("cold"), &cfg, None, tx2.clone())
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Shutdown);
    assert_eq!(rep.process, None);
    assert_eq!(cold.process(), None);
    assert_eq!(d2.live_pids(), before);

    // Exits now reach the new owner.
    d2.kill("ad");
    assert_eq!(
        exits(&mut rx2),
        vec![VmmEvent::Exited {
            pid: new.pid,
            state: VmState::Failed,
            reason: SIGKILL_REASON.to_owned(),
        }]
    );
}

#[tokio::test]
async fn double_a_delayed_operation_the_caller_abandoned_still_takes_effect() {
    let d = Double::new();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut vm, _) = d
        .create(&test_id("late"), &VmConfig::default(), tx)
        .await
        .unwrap();

    // Past the caller's timeout.
    d.delay("boot", Duration::from_millis(300));
    let r = tokio::time::timeout(Duration::from_millis(10), vm.boot()).await;
    assert!(r.is_err(), "the caller gave up");
    assert!(
        d.wait_until(Duration::from_secs(5), |d| d.state_of("late")
            == Some(VmState::Running))
            .await,
        "the boot went on without its caller"
    );
    d.reset();
    assert_eq!(vm.sample().await.unwrap().state, Some(VmState::Running));

    // Held at a gate, dropped, released: a respawn still happens and the handle learns its pid.
    let old = d.pid_of("late").unwrap();
    d.guest_poweroff("late");
    let gate = d.hold_vm("late", "boot");
    {
        let boot = vm.boot();
        tokio::pin!(boot);
        tokio::select! {
            biased;
            _ = &mut boot => panic!("the boot passed a closed gate"),
            () = gate.arrived(1) => {}
        }
    }
    assert_eq!(d.pid_of("late"), None, "not yet: the gate is closed");
    gate.open();
    assert!(
        d.wait_until(Duration::from_secs(5), |d| d.pid_of("late").is_some())
            .await
    );
    let new = vm.process().expect("the handle knows the late VMM");
    assert_ne!(new.pid, old);
    assert_eq!(d.max_concurrency_per_vm.load(Ordering::SeqCst), 1);
    assert_eq!(d.in_flight("late"), 0, "abandoned calls stop counting");
}

#[tokio::test]
async fn double_one_shot_faults_fire_once_and_only_for_their_vm() {
    let d = Double::new();
    let cfg = VmConfig::default();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut a, _) = d.create(&test_id("a"), &cfg, tx.clone()).await.unwrap();
    let (mut b, _) = d.create(&test_id("b"), &cfg, tx).await.unwrap();
    a.boot().await.unwrap();
    b.boot().await.unwrap();

    d.fail_next(
        "a",
        "pause",
        HypervisorError::InvalidState("scripted".into()),
    );
    assert!(matches!(
        a.pause().await,
        Err(HypervisorError::InvalidState(_))
    ));
    assert_eq!(
        d.state_of("a"),
        Some(VmState::Running),
        "refused, not applied"
    );
    assert_eq!(
        b.pause().await.unwrap().state,
        VmState::Paused,
        "b is not a"
    );
    assert_eq!(
        a.pause().await.unwrap().state,
        VmState::Paused,
        "fired once"
    );

    d.fail_once(
        "info",
        HypervisorError::unavailable("socket does not answer"),
    );
    assert!(matches!(
        b.sample().await,
        Err(HypervisorError::Unavailable { .. })
    ));
    assert!(a.sample().await.is_ok());

    d.fail_next_after_apply(
        "a",
        "resume",
        HypervisorError::Timeout {
            operation: "resume".into(),
            after: Duration::from_secs(1),
        },
    );
    assert!(matches!(
        a.resume().await,
        Err(HypervisorError::Timeout { .. })
    ));
    assert_eq!(
        d.state_of("a"),
        Some(VmState::Running),
        "applied, answer lost"
    );

    // The respawned VMM fails to start: no process, then the next try works.
    b.resume().await.unwrap();
    let before = d.pid_of("b").unwrap();
    assert!(d.guest_poweroff("b"));
    d.fail_respawn("b");
    assert!(matches!(
        b.boot().await,
        Err(HypervisorError::SpawnFailed { .. })
    ));
    assert_eq!(b.process(), None);
    assert!(!d.live_pids().contains_key(&test_id("b")));
    let after = b.boot().await.unwrap().process.unwrap();
    assert_ne!(after.pid, before);

    d.fail(
        "discover",
        HypervisorError::unavailable("runtime dir unreadable"),
    );
    assert!(d.discover().await.is_err());
    assert!(d.discover().await.is_err(), "sticky");
    d.reset();
    assert!(d.discover().await.is_ok());
}

#[tokio::test]
async fn double_discover_and_destroy_orphan_end_exactly_the_orphan() {
    let d = Double::new();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (vm, created) = d
        .create(&test_id("kept"), &VmConfig::default(), tx)
        .await
        .unwrap();
    let kept = created.process.unwrap();
    let ghost = d.plant_orphan("ghost");
    d.plant_stale_dir("half");

    let found = d.discover().await.unwrap();
    assert_eq!(
        found,
        vec![
            Discovered {
                id: test_id("ghost"),
                process: Some(ghost.clone()),
            },
            Discovered {
                id: test_id("half"),
                process: None,
            },
            Discovered {
                id: test_id("kept"),
                process: Some(kept.clone()),
            },
        ]
    );

    let wrong = VmmProcess {
        start_time: ghost.start_time + 1,
        ..ghost.clone()
    };
    d.destroy_orphan(&test_id("ghost"), Some(wrong))
        .await
        .unwrap();
    assert!(d.is_alive(ghost.pid), "another identity touches nothing");
    d.destroy_orphan(&test_id("kept"), Some(ghost.clone()))
        .await
        .unwrap();
    assert!(d.is_alive(ghost.pid), "another VM's process is not touched");
    assert!(d.is_alive(kept.pid));

    d.destroy_orphan(&test_id("ghost"), Some(ghost.clone()))
        .await
        .unwrap();
    d.destroy_orphan(&test_id("half"), None).await.unwrap();
    assert!(!d.is_alive(ghost.pid));
    assert!(d.is_alive(kept.pid));
    assert_eq!(vm.process(), Some(kept.clone()));
    assert_eq!(
        d.discover().await.unwrap(),
        vec![Discovered {
            id: test_id("kept"),
            process: Some(kept),
        }]
    );
    assert_eq!(d.orphans_destroyed.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn double_a_vmm_can_die_while_an_operation_is_in_flight() {
    let d = Double::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut vm, _) = d
        .create(&test_id("mid"), &VmConfig::default(), tx)
        .await
        .unwrap();
    vm.boot().await.unwrap();
    let pid = d.pid_of("mid").unwrap();
    let gate = d.hold_vm("mid", "pause");
    let task = tokio::spawn(async move {
        let r = vm.pause().await;
        (vm, r)
    });
    gate.arrived(1).await;
    assert_eq!(d.kill("mid"), vec![pid]);
    gate.open();
    let (mut vm, r) = task.await.unwrap();
    assert!(matches!(r, Err(HypervisorError::Gone(_))), "{r:?}");
    assert_eq!(
        exits(&mut rx),
        vec![VmmEvent::Exited {
            pid,
            state: VmState::Failed,
            reason: SIGKILL_REASON.to_owned(),
        }]
    );
    let info = vm.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Failed));
    assert!(info.reason.contains("SIGKILL"), "{}", info.reason);
    assert_eq!(info.process, None);
}

#[tokio::test]
async fn double_live_pids_reveal_two_vmms_for_one_vm_and_concurrency_is_per_vm() {
    let d = Double::new();
    let cfg = VmConfig::default();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut first, created) = d.create(&test_id("dup"), &cfg, tx.clone()).await.unwrap();
    let p = created.process.unwrap();
    // A careless owner adopts the same live VMM twice and drives both handles at once.
    let (mut second, _) = d
        .adopt(&test_id("dup"), &cfg, Some(p), tx.clone())
        .await
        .unwrap();
    let gate = d.hold_vm("dup", "boot");
    let t1 = tokio::spawn(async move { first.boot().await.map(|_| ()) });
    let t2 = tokio::spawn(async move { second.boot().await.map(|_| ()) });
    gate.arrived(1).await;
    while d.in_flight("dup") < 2 {
        tokio::task::yield_now().await;
    }
    gate.open();
    let results = [t1.await.unwrap(), t2.await.unwrap()];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "the VMM serialized them"
    );
    assert_eq!(d.max_concurrency_per_vm.load(Ordering::SeqCst), 2);

    // adopt(None) while a VMM runs, then boot: a second live VMM for the VM.
    let (mut blind, _) = d.adopt(&test_id("dup"), &cfg, None, tx).await.unwrap();
    blind.boot().await.unwrap();
    assert_eq!(d.live_pids()[&test_id("dup")].len(), 2);
    assert!(
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.assert_one_vmm_per_vm()))
            .is_err()
    );
}

fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<VmmEvent>) -> Vec<VmmEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn double_cloud_hypervisor_state_rules_and_its_event_monitor() {
    let d = Double::new();
    assert_eq!(d.host().kind(), BackendKind::CloudHypervisor);
    assert!(
        d.check()
            .await
            .unwrap()
            .version
            .contains("cloud-hypervisor")
    );
    d.set_healthy(false);
    assert!(matches!(
        d.check().await,
        Err(HypervisorError::Unavailable { .. })
    ));
    d.set_healthy(true);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut vm, created) = d
        .create(&test_id("ch"), &VmConfig::default(), tx)
        .await
        .unwrap();
    assert_eq!(vm.id(), &test_id("ch"));
    let p = created.process.unwrap();
    vm.boot().await.unwrap();
    vm.pause().await.unwrap();
    let changed = |state, reason: &str| VmmEvent::StateChanged {
        pid: p.pid,
        state,
        reason: reason.to_owned(),
    };
    assert_eq!(
        drain(&mut rx),
        vec![
            changed(VmState::Running, "vm/booted"),
            changed(VmState::Paused, "vm/paused"),
        ],
        "CH's event monitor reports VMCP's own changes too"
    );

    // A paused guest cannot hear the power button: the stop is hard, the VMM stays.
    let hard = vm.shutdown(GRACEFUL).await.unwrap();
    assert_eq!(
        (hard.state, hard.process),
        (VmState::Created, Some(p.clone()))
    );
    vm.boot().await.unwrap();
    let forced = vm
        .shutdown(ShutdownMode {
            force: true,
            graceful_timeout: Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(
        (forced.state, forced.process),
        (VmState::Created, Some(p.clone()))
    );
    vm.boot().await.unwrap();
    let off = vm.shutdown(GRACEFUL).await.unwrap();
    assert_eq!((off.state, off.process), (VmState::Shutdown, None));
    assert_eq!(d.vmm_count(), 0, "the power button ends CH's process");
    assert!(matches!(
        vm.pause().await,
        Err(HypervisorError::InvalidState(_))
    ));

    // A pause made directly on the socket reaches the owner as an event.
    let q = vm.boot().await.unwrap().process.unwrap();
    drain(&mut rx);
    assert!(d.pause_directly("ch"));
    assert_eq!(
        drain(&mut rx),
        vec![VmmEvent::StateChanged {
            pid: q.pid,
            state: VmState::Paused,
            reason: "vm/paused".to_owned(),
        }]
    );
    assert_eq!(vm.sample().await.unwrap().state, Some(VmState::Paused));
    d.set_event_monitor(false);
    assert!(d.resume_directly("ch"));
    vm.pause().await.unwrap();
    assert!(drain(&mut rx).is_empty(), "monitor off");
}

#[tokio::test]
async fn double_slow_answers_deaf_guests_and_held_calls() {
    let d = Double::firecracker();
    let cfg = VmConfig::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut slow, _) = d.create(&test_id("slow"), &cfg, tx.clone()).await.unwrap();
    let (mut other, _) = d.create(&test_id("other"), &cfg, tx).await.unwrap();

    // Acts at once, answers late: the VMM shows the change before the caller hears of it.
    d.delay_answer("boot", Duration::from_millis(300));
    let boot = tokio::spawn(async move {
        let r = slow.boot().await;
        (slow, r)
    });
    assert!(
        d.wait_until(Duration::from_secs(5), |d| d.state_of("slow")
            == Some(VmState::Running))
            .await
    );
    assert!(!boot.is_finished(), "the answer is still on its way");
    let (mut slow, r) = boot.await.unwrap();
    assert_eq!(r.unwrap().state, VmState::Running);
    d.reset();

    // A one-shot delay for one VM.
    d.delay_next("slow", "sample", Duration::from_millis(200));
    other.sample().await.unwrap();
    let t = tokio::time::Instant::now();
    slow.sample().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));

    // Held calls of any VM, released together.
    let gate = d.hold("sample");
    let a = tokio::spawn(async move { (slow.sample().await.is_ok(), slow) });
    let b = tokio::spawn(async move { (other.sample().await.is_ok(), other) });
    gate.arrived(2).await;
    assert_eq!(gate.arrivals(), 2);
    gate.open();
    let (ok_a, mut slow) = a.await.unwrap();
    let (ok_b, mut other) = b.await.unwrap();
    assert!(ok_a && ok_b);

    // A guest that ignores Ctrl-Alt-Del: the whole timeout, then the kill.
    d.ignore_power_button("slow");
    let t = tokio::time::Instant::now();
    let stopped = slow
        .shutdown(ShutdownMode {
            force: false,
            graceful_timeout: Duration::from_millis(100),
        })
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(100));
    assert_eq!((stopped.state, stopped.process), (VmState::Shutdown, None));
    assert!(stopped.reason.contains("killed"), "{}", stopped.reason);

    // kill_pid ends exactly that process; its owner hears of it.
    let pid = other.boot().await.unwrap().process.unwrap().pid;
    assert!(d.kill_pid(pid));
    assert!(!d.kill_pid(pid), "already gone");
    assert_eq!(d.vmm_count(), 0);
    assert_eq!(
        drain(&mut rx),
        vec![VmmEvent::Exited {
            pid,
            state: VmState::Failed,
            reason: SIGKILL_REASON.to_owned(),
        }],
        "Firecracker has no event monitor, but exits are always reported"
    );
}
