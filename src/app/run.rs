//! The process entry point behind `vmcp-api`: read the configuration, set up
//! logging and telemetry, build the configured backend and store, serve until
//! SIGINT or SIGTERM, then drain and exit 0. VMs are left running.

use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::adapters::inbound::server::RpcLimits;
use crate::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use crate::adapters::outbound::firecracker::jailer::JailerSettings;
use crate::adapters::outbound::firecracker::{Firecracker, FirecrackerSettings};
use crate::adapters::outbound::store::sqlite::SqliteStore;
use crate::ports::{BackendEvent, BackendKind, Hypervisor, NoopTelemetry, SystemClock};

use super::config::Config;
use super::wiring::{StartOptions, start};

/// Runs the service; returns the process exit code.
pub async fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmcp-api: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    for var in Config::unknown_variables(std::env::vars()) {
        tracing::warn!(variable = %var, "unknown UNKEY_VMCP_ variable ignored (typo?)");
    }
    // A corrupt or unreadable store stops start-up; it is never silently reset.
    let store = match SqliteStore::open(&config.data_dir) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the VM store");
            eprintln!("vmcp-api: cannot open the VM store: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let result = match config.backend {
        BackendKind::CloudHypervisor => {
            let ch = CloudHypervisor::new(
                &config.ch_binary,
                &config.runtime_dir,
                config.hypervisor_timeout,
                tx,
            );
            serve(ch, rx, store, &config).await
        }
        BackendKind::Firecracker => {
            let mut settings = FirecrackerSettings::new(&config.fc_binary, &config.runtime_dir);
            settings.call_timeout = config.hypervisor_timeout;
            settings.jailer = config.fc_jailer.as_ref().map(|j| JailerSettings {
                jailer_binary: j.binary.clone(),
                uid: j.uid,
                gid: j.gid,
                chroot_base: j.chroot_base.clone(),
            });
            serve(Firecracker::new(settings, tx), rx, store, &config).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "vmcp-api stopped");
            eprintln!("vmcp-api: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_level.clone());
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .try_init();
}

async fn serve<H: Hypervisor>(
    hypervisor: H,
    events: mpsc::UnboundedReceiver<BackendEvent>,
    store: Arc<SqliteStore>,
    config: &Config,
) -> Result<(), Box<dyn std::error::Error>> {
    let running = start(
        Arc::new(hypervisor),
        events,
        store,
        StartOptions {
            addr: (config.address, config.port).into(),
            limits: RpcLimits {
                max_request_bytes: config.max_request_bytes,
                max_deadline: config.max_deadline,
            },
            hypervisor_timeout: config.hypervisor_timeout,
            shutdown_grace: config.shutdown_grace,
            telemetry: Arc::new(NoopTelemetry),
            telemetry_status: Arc::new(|| "disabled".to_owned()),
            wrap_rpc: Box::new(|s| s),
            clock: Arc::new(SystemClock),
        },
    )
    .await?;
    tracing::info!(addr = %running.local_addr, backend = config.backend.as_str(), "vmcp-api serving");
    shutdown_signal().await;
    tracing::info!("signal received: draining requests; VMs keep running");
    running.shutdown().await;
    tracing::info!("vmcp-api stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the process can only be killed; wait on Ctrl-C as a fallback.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
