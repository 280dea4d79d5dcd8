//! The process entry point behind `vmcp-api`: read the configuration, set up
//! logging and telemetry, build the configured backend and store, serve until
//! SIGINT or SIGTERM, then drain and exit 0. VMs are left running.

use std::process::ExitCode;
use std::sync::Arc;

use crate::adapters::inbound::server::RpcLimits;
use crate::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use crate::adapters::outbound::firecracker::jailer::JailerSettings;
use crate::adapters::outbound::firecracker::{Firecracker, FirecrackerSettings};
use crate::adapters::outbound::store::sqlite::SqliteStore;
use crate::adapters::outbound::vmm::UdsClient;
use std::time::Duration;

use http_body_util::BodyExt;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

use crate::adapters::inbound::rpc_layer::RpcTelemetryLayer;
use crate::adapters::outbound::otel::{self, OtelHandle, OtelSettings, health::TelemetryHealth};
use crate::ports::{BackendKind, Hypervisor, SystemClock};

use super::config::Config;
use super::descriptors::raise_nofile_limit;
use super::security::{Security, startup_warnings};
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
    let settings = OtelSettings {
        enabled: config.otel.enabled,
        service_name: config.otel.service_name.clone(),
        service_version: config.otel.service_version.clone(),
        sampling_rate: config.otel.sampling_rate,
        endpoint: config.otel.endpoint.clone(),
        prometheus_enabled: config.otel.prometheus_enabled,
        prometheus_port: config.otel.prometheus_port,
        ..Default::default()
    };
    let otel = match otel::init(&settings) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("vmcp-api: telemetry: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_level.clone());
    // Held until `run` returns: dropping it writes the log lines still waiting.
    let _log_flush = match otel::init_logging(&filter, &otel) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("vmcp-api: logging: {e}");
            return ExitCode::from(2);
        }
    };
    // Before anything opens descriptors: the budget is measured against the raised limit.
    match raise_nofile_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(
                from = before,
                to = after,
                "raised the soft descriptor limit to the hard limit"
            );
        }
        Ok((_, limit)) => {
            tracing::debug!(limit, "the soft descriptor limit is already the hard limit")
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the soft descriptor limit"),
    }
    for warning in startup_warnings(&config) {
        tracing::warn!("{warning}");
    }
    let security = match Security::from_config(&config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "security settings");
            eprintln!("vmcp-api: {e}");
            return ExitCode::from(2);
        }
    };
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
    probe_seed_endpoint(&config).await;
    let result = match config.backend {
        BackendKind::CloudHypervisor => {
            let ch = CloudHypervisor::new(
                &config.ch_binary,
                &config.runtime_dir,
                config.hypervisor_timeout,
            )
            .with_console_max_bytes(config.console_max_bytes);
            serve(ch, store, &config, &otel, security).await
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
            let fc = Firecracker::new(settings).with_console_max_bytes(config.console_max_bytes);
            serve(fc, store, &config, &otel, security).await
        }
    };
    // Flush what telemetry holds, bounded; the exporters block, so off the runtime.
    let flushing = otel.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.shutdown(Duration::from_secs(5))).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "vmcp-api stopped");
            eprintln!("vmcp-api: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<H: Hypervisor>(
    hypervisor: H,
    store: Arc<SqliteStore>,
    config: &Config,
    otel: &OtelHandle,
    security: Security,
) -> Result<(), Box<dyn std::error::Error>> {
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if config.otel.prometheus_enabled {
        let addr = std::net::SocketAddr::from((config.address, config.otel.prometheus_port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for /metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "Prometheus metrics at /metrics");
        tokio::spawn(otel::serve_metrics(listener, otel.clone(), async {
            let _ = metrics_stopped.await;
        }));
    }
    let meter = otel.meter();
    let tracer = otel.tracer();
    let health_handle = otel.clone();
    let counts_handle = otel.clone();
    let backend = hypervisor.kind();
    let running = start(
        Arc::new(hypervisor),
        store,
        StartOptions {
            addr: (config.address, config.port).into(),
            limits: RpcLimits {
                max_request_bytes: config.max_request_bytes,
                max_deadline: config.max_deadline,
            },
            hypervisor_timeout: config.hypervisor_timeout,
            shutdown_grace: config.shutdown_grace,
            remove_orphans: config.remove_orphans,
            telemetry: Arc::new(otel.clone()),
            telemetry_status: Arc::new(move || telemetry_status(&health_handle.health())),
            wrap_rpc: Box::new(move |rpc| {
                BoxCloneService::new(
                    RpcTelemetryLayer::new(&meter)
                        .with_tracer(tracer.clone())
                        .layer(rpc)
                        .map_response(|r| r.map(|b| b.boxed_unsync())),
                )
            }),
            clock: Arc::new(SystemClock),
            on_vm_counts: Some(Arc::new(move |counts| {
                counts_handle.set_vm_counts(backend, counts)
            })),
            security,
        },
    )
    .await?;
    tracing::info!(addr = %running.local_addr, backend = config.backend.as_str(), "vmcp-api serving");
    shutdown_signal().await;
    tracing::info!("signal received: draining requests; VMs keep running");
    running.shutdown().await;
    let _ = metrics_stop.send(());
    tracing::info!("vmcp-api stopped");
    Ok(())
}

/// The seed ran one shared VMM on `UNKEY_VMCP_CH_ENDPOINT` / `UNKEY_VMCP_FC_ENDPOINT`. VMCP runs
/// one VMM per VM under the runtime directory instead; a VMM still answering on the seed's
/// endpoint is reported at start-up (with its version) so an operator can migrate or stop it.
/// VMCP never touches it: it has no record of what that VMM runs.
async fn probe_seed_endpoint(config: &Config) {
    let (socket, path) = match config.backend {
        BackendKind::CloudHypervisor => (&config.ch_endpoint, "/api/v1/vmm.ping"),
        BackendKind::Firecracker => (&config.fc_endpoint, "/"),
    };
    if !socket.exists() {
        tracing::debug!(socket = %socket.display(), "no seed VMM endpoint");
        return;
    }
    let client = UdsClient::new(Duration::from_secs(1));
    match client.call(socket, http::Method::GET, path, None).await {
        Ok(r) if r.is_success() => tracing::warn!(
            socket = %socket.display(),
            answer = %r.text(),
            "a VMM from the single-socket setup answers on the seed endpoint; VMCP runs one VMM per VM \
             under UNKEY_VMCP_RUNTIME_DIR and leaves this one untouched: migrate its VM and stop it"
        ),
        Ok(r) => {
            tracing::warn!(socket = %socket.display(), status = %r.status, "something answers on the seed endpoint but it is not a usable VMM")
        }
        Err(e) => {
            tracing::info!(socket = %socket.display(), error = %e, "stale seed endpoint socket (nothing answers); VMCP does not use it")
        }
    }
}

/// One word (or the failure) for `/_/health`'s telemetry field.
fn telemetry_status(h: &TelemetryHealth) -> String {
    if !h.otlp_enabled {
        return if h.prometheus_enabled {
            "ok".to_owned()
        } else {
            "disabled".to_owned()
        };
    }
    if h.degraded() {
        let err = h
            .traces
            .last_error
            .clone()
            .or_else(|| h.metrics.last_error.clone())
            .unwrap_or_default();
        return format!("export failing: {err}");
    }
    "ok".to_owned()
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
