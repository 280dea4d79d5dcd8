//! The VM and process instruments. Names follow OpenTelemetry style (dots,
//! unit kept separate) and are chosen so the Prometheus exporter's suffixing
//! yields the conventional names: `vmcp.vm.transitions` becomes
//! `vmcp_vm_transitions_total`, a histogram in `s` gains `_seconds`, and the
//! process instruments come out as the usual `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`. No instrument carries a
//! VM id (one series per VM would grow without bound); labels are backend,
//! state, operation, outcome and reason classes only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram, Meter, ObservableCounter, ObservableGauge, UpDownCounter,
};

use crate::domain::{VmEvent, VmState};
use crate::ports::{BackendKind, TelemetryEvent};

use super::process;

/// Histogram buckets, in seconds, for hypervisor calls: sub-millisecond VMM
/// API calls up to graceful shutdowns that take tens of seconds.
pub const CALL_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Histogram buckets, in seconds, for VM boots.
pub const BOOT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

type VmCounts = Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>;

/// Instruments fed by [`TelemetryEvent`]s and by [`VmInstruments::set_vm_counts`].
#[derive(Debug, Clone)]
pub struct VmInstruments {
    transitions: Counter<u64>,
    operations: Counter<u64>,
    admissions: Counter<u64>,
    hypervisor_calls: Histogram<f64>,
    boots: Histogram<f64>,
    vmm_exits: Counter<u64>,
    connections_refused: Counter<u64>,
    connections_timed_out: Counter<u64>,
    watchers: UpDownCounter<i64>,
    restarts: Counter<u64>,
    watch_sent: Counter<u64>,
    watch_dropped: Counter<u64>,
    counts: VmCounts,
    _vms: ObservableGauge<u64>,
}

impl VmInstruments {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let counts: VmCounts = Arc::default();
        let observed = counts.clone();
        let vms = meter
            .u64_observable_gauge("vmcp.vms")
            .with_description("VMs by observed state and backend")
            .with_unit("{vm}")
            .with_callback(move |observer| {
                let counts = observed.lock().unwrap_or_else(|p| p.into_inner());
                for ((backend, state), n) in counts.iter() {
                    observer.observe(
                        *n,
                        &[
                            KeyValue::new("backend", *backend),
                            KeyValue::new("state", *state),
                        ],
                    );
                }
            })
            .build();
        Self {
            transitions: meter
                .u64_counter("vmcp.vm.transitions")
                .with_description("Observed VM state changes")
                .with_unit("{transition}")
                .build(),
            operations: meter
                .u64_counter("vmcp.vm.operations")
                .with_description("Lifecycle operations finished, by outcome")
                .with_unit("{operation}")
                .build(),
            admissions: meter
                .u64_counter("vmcp.vm.admissions")
                .with_description("Lifecycle commands accepted, ignored or denied")
                .with_unit("{command}")
                .build(),
            hypervisor_calls: meter
                .f64_histogram("vmcp.hypervisor.call.duration")
                .with_description("Duration of calls to a VMM backend")
                .with_unit("s")
                .with_boundaries(CALL_BUCKETS.to_vec())
                .build(),
            boots: meter
                .f64_histogram("vmcp.vm.boot.duration")
                .with_description("Time from a boot request to the VM running")
                .with_unit("s")
                .with_boundaries(BOOT_BUCKETS.to_vec())
                .build(),
            vmm_exits: meter
                .u64_counter("vmcp.vmm.exits")
                .with_description("VMM processes that ended without being asked to")
                .with_unit("{exit}")
                .build(),
            connections_refused: meter
                .u64_counter("vmcp.connections.refused")
                .with_description(
                    "Client connections refused at accept, by the cap that refused them",
                )
                .with_unit("{connection}")
                .build(),
            connections_timed_out: meter
                .u64_counter("vmcp.connections.timed_out")
                .with_description(
                    "Client connections VMCP closed: header, idle or TLS handshake timeout",
                )
                .with_unit("{connection}")
                .build(),
            restarts: meter
                .u64_counter("vmcp.vm.restarts")
                .with_description(
                    "Boots by a restart policy, by why the VM had gone (crash, poweroff, host_restart, failed_start); limit_reached when it gave up",
                )
                .with_unit("{restart}")
                .build(),
            watchers: meter
                .i64_up_down_counter("vmcp.watch.watchers")
                .with_description("WatchVms streams open")
                .with_unit("{watcher}")
                .build(),
            watch_sent: meter
                .u64_counter("vmcp.watch.events")
                .with_description("WatchVms messages sent, by type")
                .with_unit("{event}")
                .build(),
            watch_dropped: meter
                .u64_counter("vmcp.watch.dropped")
                .with_description(
                    "Changes a watcher could not take (its queue was full); the watcher was dropped",
                )
                .with_unit("{event}")
                .build(),
            counts,
            _vms: vms,
        }
    }

    /// Replaces the number of VMs per state for one backend; states not
    /// listed are reported as zero so every series keeps existing.
    pub fn set_vm_counts(&self, backend: BackendKind, counts: &[(VmState, u64)]) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for state in VmState::ALL {
            let n = counts
                .iter()
                .filter(|(s, _)| *s == state)
                .map(|(_, n)| *n)
                .sum();
            map.insert((backend.as_str(), state.as_str()), n);
        }
    }

    /// Turns one event into measurements. Never blocks on I/O.
    pub fn record(&self, event: &TelemetryEvent) {
        match event {
            TelemetryEvent::Vm(VmEvent::StateChanged { from, to, .. }) => self.transitions.add(
                1,
                &[
                    KeyValue::new("from", from.as_str()),
                    KeyValue::new("to", to.as_str()),
                ],
            ),
            TelemetryEvent::Vm(VmEvent::OperationFinished { op, ok, .. }) => self.operations.add(
                1,
                &[
                    KeyValue::new("operation", op.as_str()),
                    KeyValue::new("outcome", if *ok { "ok" } else { "error" }),
                ],
            ),
            TelemetryEvent::HypervisorCall {
                backend,
                operation,
                outcome,
                duration,
            } => self.hypervisor_calls.record(
                duration.as_secs_f64(),
                &[
                    KeyValue::new("backend", backend.as_str()),
                    KeyValue::new("operation", *operation),
                    KeyValue::new("outcome", *outcome),
                ],
            ),
            TelemetryEvent::BootCompleted { backend, duration } => self.boots.record(
                duration.as_secs_f64(),
                &[KeyValue::new("backend", backend.as_str())],
            ),
            TelemetryEvent::Admission { op, outcome } => self.admissions.add(
                1,
                &[
                    KeyValue::new("operation", op.as_str()),
                    KeyValue::new("outcome", *outcome),
                ],
            ),
            TelemetryEvent::ConnectionRefused { reason } => self
                .connections_refused
                .add(1, &[KeyValue::new("reason", *reason)]),
            TelemetryEvent::ConnectionTimedOut { reason } => self
                .connections_timed_out
                .add(1, &[KeyValue::new("reason", *reason)]),
            TelemetryEvent::Vm(VmEvent::Restarted { cause, .. }) => self
                .restarts
                .add(1, &[KeyValue::new("cause", cause.as_str())]),
            TelemetryEvent::Vm(VmEvent::RestartLimitReached { .. }) => self
                .restarts
                .add(1, &[KeyValue::new("cause", "limit_reached")]),
            TelemetryEvent::WatchersOpen { delta } => self.watchers.add(*delta, &[]),
            TelemetryEvent::WatchSent { kind } => {
                self.watch_sent.add(1, &[KeyValue::new("type", *kind)])
            }
            TelemetryEvent::WatchDropped { reason } => self
                .watch_dropped
                .add(1, &[KeyValue::new("reason", *reason)]),
            TelemetryEvent::VmmExited { backend, reason } => self.vmm_exits.add(
                1,
                &[
                    KeyValue::new("backend", backend.as_str()),
                    KeyValue::new("reason", *reason),
                ],
            ),
        }
    }
}

/// Observable instruments over /proc/self, sampled at each collection.
#[derive(Debug)]
pub struct ProcessInstruments {
    _cpu: ObservableCounter<f64>,
    _rss: ObservableGauge<u64>,
    _fds: ObservableGauge<u64>,
    _start: ObservableGauge<f64>,
    _uptime: ObservableGauge<f64>,
}

impl ProcessInstruments {
    /// Registers the callbacks on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let start_unix = process::read_start_time_unix();
        let started = Instant::now();
        Self {
            _cpu: meter
                .f64_observable_counter("process.cpu")
                .with_description("CPU time used by VMCP, user plus system")
                .with_unit("s")
                .with_callback(|o| {
                    if let Some(stat) = process::read_stat() {
                        o.observe(stat.cpu_seconds, &[]);
                    }
                })
                .build(),
            _rss: meter
                .u64_observable_gauge("process.resident_memory")
                .with_description("Resident memory of VMCP")
                .with_unit("By")
                .with_callback(|o| {
                    if let Some(rss) = process::read_rss_bytes() {
                        o.observe(rss, &[]);
                    }
                })
                .build(),
            _fds: meter
                .u64_observable_gauge("process.open_fds")
                .with_description("Open file descriptors of VMCP")
                .with_callback(|o| {
                    if let Some(n) = process::read_open_fds() {
                        o.observe(n, &[]);
                    }
                })
                .build(),
            _start: meter
                .f64_observable_gauge("process.start_time")
                .with_description("Start time of VMCP, Unix seconds")
                .with_unit("s")
                .with_callback(move |o| {
                    if let Some(t) = start_unix {
                        o.observe(t, &[]);
                    }
                })
                .build(),
            _uptime: meter
                .f64_observable_gauge("process.uptime")
                .with_description("Seconds since VMCP started")
                .with_unit("s")
                .with_callback(move |o| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64());
                    let uptime = match (start_unix, now) {
                        (Some(start), Ok(now)) => (now - start).max(0.0),
                        _ => started.elapsed().as_secs_f64(),
                    };
                    o.observe(uptime, &[]);
                })
                .build(),
        }
    }
}
