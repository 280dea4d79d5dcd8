//! Ports: the traits through which the application talks to the outside
//! world, in domain words. Inbound: [`VmService`]. Outbound: [`Hypervisor`]
//! (one VMM per VM), [`VmStore`] (records that survive restarts),
//! [`Telemetry`] (events, never blocking) and [`Clock`].

pub mod clock;
pub mod hypervisor;
pub mod network;
pub mod service;
pub mod snapshots;
pub mod store;
pub mod telemetry;

pub use clock::{Clock, SystemClock};
pub use hypervisor::{
    BackendCheck, BackendKind, Cause, ConsoleChunk, Discovered, Hypervisor, HypervisorError,
    NetworkStats, Reported, ShutdownMode, StorageStats, VmMetrics, VmmEvent, VmmEventSink,
    VmmHandle, VmmInfo, VmmProcess,
};
pub use network::{HostNetwork, NetworkError};
pub use service::{
    BackendHealth, ConsoleStream, CreateVm, DescriptorHealth, DiffView, HealthCheck, ListQuery,
    RestoreVm, ServiceHealth, VmCounts, VmDetails, VmPage, VmService, WatchEvent, WatchEventKind,
    WatchQuery, WatchStream,
};
pub use snapshots::{DiffMerge, SnapshotRepo, SnapshotRepoError, SnapshotScan};
pub use store::{StoreError, VmRecord, VmStore};
pub use telemetry::{NoopTelemetry, Telemetry, TelemetryEvent};
