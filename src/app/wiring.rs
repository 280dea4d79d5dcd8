//! Wiring: builds the manager over a backend and a store, fits the
//! connection cap into the descriptor budget, recovers VMs, starts the API
//! server and stops it gracefully. VMs are never stopped by
//! VMCP's own shutdown: their VMMs run in their own sessions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::adapters::inbound::connections::ConnectionGate;
use crate::adapters::inbound::server::{self, ConnectionPolicy, RpcHttpService, RpcLimits};
use crate::domain::VmError;
use crate::domain::VmState;
use crate::ports::{Clock, Hypervisor, Telemetry, VmStore};

use super::descriptors::{BudgetError, DescriptorBudget};
use super::manager::{ManagerHealth, VmManager};
use super::security::Security;

/// Receives VM counts per state.
pub type VmCountsSink = Arc<dyn Fn(&[(VmState, u64)]) + Send + Sync>;

/// What `start` needs besides the backend and the store.
pub struct StartOptions {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Request limits.
    pub limits: RpcLimits,
    /// Timeout of one hypervisor call.
    pub hypervisor_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Remove VMMs that belong to no VM at start-up (else only report them).
    pub remove_orphans: bool,
    /// Telemetry sink.
    pub telemetry: Arc<dyn Telemetry>,
    /// Telemetry pipeline state for `/_/health`.
    pub telemetry_status: Arc<dyn Fn() -> String + Send + Sync>,
    /// Wraps the RPC service (e.g. with the telemetry layer).
    pub wrap_rpc: Box<dyn FnOnce(RpcHttpService) -> RpcHttpService + Send>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Receives VM counts per state every few seconds (for the VMs-by-state gauge).
    pub on_vm_counts: Option<VmCountsSink>,
    /// Authentication, TLS, API limits and create admission ([`Security::open`] for none).
    pub security: Security,
}

impl std::fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartOptions")
            .field("addr", &self.addr)
            .field("hypervisor_timeout", &self.hypervisor_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("remove_orphans", &self.remove_orphans)
            .finish_non_exhaustive()
    }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (bounded), ends the VMs'
    /// owner tasks (each after its current operation; the VMMs run on) and
    /// waits for all of it.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server ends on its own.
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Why start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host-local API socket could not be bound.
    #[error("cannot listen on the API socket {path}: {source}")]
    BindSocket {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Stored VM records could not be read.
    #[error("cannot recover VMs: {0}")]
    Recovery(#[source] VmError),
    /// The descriptor limit leaves no room for the reserve and the connections.
    #[error(transparent)]
    Descriptors(#[from] BudgetError),
}

/// Starts the service: recovers stored VMs, then serves the API.
pub async fn start<H: Hypervisor, S: VmStore>(
    hypervisor: Arc<H>,
    store: Arc<S>,
    opts: StartOptions,
) -> Result<Running, StartError> {
    let listener = TcpListener::bind(opts.addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: opts.addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: opts.addr,
        source,
    })?;
    let api_socket = match &opts.security.api_socket {
        Some(path) => Some((
            server::bind_api_socket(path).map_err(|source| StartError::BindSocket {
                path: path.clone(),
                source,
            })?,
            path.clone(),
        )),
        None => None,
    };
    let tls = opts.security.tls_acceptor();
    let tls_on = tls.is_some();
    // Measured after the listener and the store are open, so the cap fits what is left.
    let budget = DescriptorBudget::of_this_process(opts.security.reserved_descriptors);
    let limits = opts.security.connections;
    let max_connections = budget.connection_cap(limits.max_connections)?;
    let gate = Arc::new(ConnectionGate::new(
        max_connections,
        limits.max_connections_per_client.min(max_connections),
    ));
    let fds = budget.now();
    tracing::info!(
        limit = fds.limit,
        in_use = fds.in_use,
        reserved_for_vms = fds.reserved,
        max_connections,
        max_connections_per_client = gate.max_per_client(),
        "descriptor budget"
    );
    let policy = ConnectionPolicy {
        limits,
        gate: Arc::clone(&gate),
        telemetry: Arc::clone(&opts.telemetry),
    };
    let manager = VmManager::with_admission(
        hypervisor,
        store,
        opts.telemetry,
        opts.clock,
        opts.hypervisor_timeout,
        opts.security.admission,
        super::manager::Policies {
            watch: opts.security.watch,
            restart: opts.security.restart,
        },
    );
    manager.set_descriptor_budget(budget);
    if let Some(snapshots) = opts.security.snapshots {
        manager.set_snapshots(snapshots);
    }
    if let Some(network) = opts.security.network {
        manager.set_network(network);
    }
    let health = Arc::new(
        ManagerHealth::new(Arc::clone(&manager), opts.telemetry_status).with_connections(Arc::new(
            move || {
                (
                    gate.open() as u64,
                    gate.max_total() as u64,
                    gate.max_per_client() as u64,
                )
            },
        )),
    );
    let rpc = (opts.wrap_rpc)(server::protect(
        server::rpc_service(Arc::clone(&manager), opts.limits),
        opts.security.auth,
        opts.security.api_limits,
    ));
    // Health is served while recovery runs; VM calls answer `unavailable` until it ends.
    manager.set_remove_orphans(opts.remove_orphans);
    manager.mark_recovering();
    let (tx, rx) = oneshot::channel::<()>();
    let grace = opts.shutdown_grace;
    let feed = Arc::clone(manager.feed());
    let owners = manager.owners().clone();
    // An owner ends after the operation it is in, each bounded by the call timeout.
    let owners_grace = opts.hypervisor_timeout + grace;
    let task = tokio::spawn(async move {
        let (unix, socket_path) = api_socket.unzip();
        server::serve_with_tls(
            server::Listeners {
                tcp: listener,
                unix,
                tls,
            },
            rpc,
            health,
            policy,
            async move {
                let _ = rx.await;
                // Watch streams end (telling clients where to resume) so the drain is not held up.
                feed.close();
            },
            grace,
        )
        .await;
        if let Some(path) = socket_path
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the API socket");
        }
        // Nothing samples, restarts or records a VM once the server has ended:
        // the VMMs run on, and the next start reads what the store holds now.
        if tokio::time::timeout(owners_grace, owners.stop())
            .await
            .is_err()
        {
            tracing::warn!(
                busy = owners.live(),
                "VM owners still in an operation at shutdown; the next start reconciles those VMs"
            );
        }
    });
    let mut running = Running {
        local_addr,
        shutdown: Some(tx),
        task,
    };
    match manager.recover().await {
        Ok(done) => {
            tracing::info!(
                adopted = done.adopted,
                without_vmm = done.without_vmm,
                removed = done.removed,
                orphans = done.orphans,
                orphan_taps = done.taps.orphans,
                recreated_taps = done.taps.recreated,
                missing_taps = done.taps.missing,
                "recovered VMs from the store"
            );
        }
        Err(e) => {
            if let Some(tx) = running.shutdown.take() {
                let _ = tx.send(());
            }
            let _ = (&mut running.task).await;
            return Err(StartError::Recovery(e));
        }
    }
    if let Some(sink) = opts.on_vm_counts {
        let weak = Arc::downgrade(&manager);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { return };
                let counts: Vec<(VmState, u64)> = m.counts_by_state().iter().collect();
                sink(&counts);
            }
        });
    }
    tracing::info!(%local_addr, tls = tls_on, "VMCP API listening");
    Ok(running)
}
