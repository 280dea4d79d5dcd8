//! Telemetry: OpenTelemetry traces and metrics pushed over OTLP/HTTP, a
//! Prometheus pull endpoint, and JSON logs carrying trace ids.
//!
//! [`init`] builds everything from [`OtelSettings`] and returns an
//! [`OtelHandle`], which owns the providers, implements the
//! [`Telemetry`](crate::ports::Telemetry) port (events become metrics, never
//! blocking), reports the pipeline's health and flushes on shutdown. OTLP push
//! (`enabled`) and Prometheus pull (`prometheus_enabled`) are independent: with
//! push off no exporter, tracer or batch thread exists and tracing spans cost
//! only what the log layer costs; with both off the meter is the no-op meter.
//! Exports run on the SDK's own threads with a bounded queue, so a dead
//! collector shows up in [`OtelHandle::health`] and never in an RPC.

pub mod health;
pub mod log_writer;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod sampling;
pub mod scrape;
pub mod settings;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{ExporterBuildError, Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider};

use crate::domain::VmState;
use crate::ports::{BackendKind, Telemetry, TelemetryEvent};

pub use health::{ExportState, SignalHealth, TelemetryHealth};
pub use logging::{init_logging, log_filter_from_env, subscriber};
pub use sampling::TailLimits;
pub use scrape::serve_metrics;
pub use settings::{OtelSettings, OtelSettingsError};

use health::{ObservedMetricExporter, ObservedSpanExporter, SignalState, TailStats};
use metrics::{ProcessInstruments, VmInstruments};
use sampling::{KeepErrorsProcessor, RecordAllSampler};

/// How long one OTLP request may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the instrumentation scope of VMCP's tracer and meter.
pub const SCOPE: &str = "vmcp";

/// Why telemetry could not be set up, flushed or shut down.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// A setting is invalid.
    #[error(transparent)]
    Settings(#[from] OtelSettingsError),
    /// The OTLP exporter for a signal could not be built.
    #[error("building the OTLP {signal} exporter failed")]
    Exporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The SDK's reason.
        #[source]
        source: ExporterBuildError,
    },
    /// The Prometheus exporter could not be built.
    #[error("building the Prometheus exporter failed")]
    Prometheus(#[source] OTelSdkError),
    /// Metrics could not be encoded in the text format.
    #[error("encoding metrics for Prometheus failed")]
    Encode(#[source] prometheus::Error),
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?} (from RUST_LOG or UNKEY_VMCP_LOG_LEVEL)")]
    LogFilter {
        /// The filter as given.
        filter: String,
        /// The parser's reason.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// Another global subscriber was installed first.
    #[error("a global tracing subscriber is already installed")]
    LoggingInstalled(#[source] tracing::subscriber::SetGlobalDefaultError),
    /// The thread that writes batched log lines could not start.
    #[error("starting the log writer thread failed")]
    LogWriter(#[source] std::io::Error),
    /// Flushing or shutting down a signal's pipeline failed.
    #[error("{action} of {signal} failed")]
    Pipeline {
        /// `flush` or `shutdown`.
        action: &'static str,
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The SDK's reason.
        #[source]
        source: OTelSdkError,
    },
    /// Shutdown did not finish in the time given.
    #[error("telemetry shutdown did not finish within {0:?}")]
    ShutdownTimedOut(Duration),
}

/// The running telemetry pipeline. Cheap to clone; every clone shares it.
#[derive(Clone)]
pub struct OtelHandle {
    inner: Arc<Inner>,
}

struct Inner {
    otlp_enabled: bool,
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    meter: Meter,
    registry: Option<prometheus::Registry>,
    vm: VmInstruments,
    _process: Option<ProcessInstruments>,
    traces: Arc<SignalState>,
    metrics: Arc<SignalState>,
    tail: Arc<TailStats>,
}

impl std::fmt::Debug for OtelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtelHandle")
            .field("otlp_enabled", &self.inner.otlp_enabled)
            .field("prometheus_enabled", &self.inner.registry.is_some())
            .finish_non_exhaustive()
    }
}

/// Sets telemetry up as `settings` say. Must run inside a Tokio runtime only
/// if the caller later serves `/metrics`; the exporters use their own threads.
pub fn init(settings: &OtelSettings) -> Result<OtelHandle, OtelError> {
    init_with_limits(settings, TailLimits::default())
}

/// [`init`] with explicit bounds for the spans held while a trace is undecided.
pub fn init_with_limits(
    settings: &OtelSettings,
    limits: TailLimits,
) -> Result<OtelHandle, OtelError> {
    settings.validate()?;
    // Built only for a provider that exports: with OTLP and Prometheus both off, the resource
    // detectors' code is never run (and never resident).
    let built = std::cell::OnceCell::new();
    let resource = || {
        built
            .get_or_init(|| {
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .with_attribute(KeyValue::new(
                        "service.version",
                        settings.service_version.clone(),
                    ))
                    .build()
            })
            .clone()
    };
    let traces = Arc::new(SignalState::new(settings.enabled));
    let metrics_state = Arc::new(SignalState::new(settings.enabled));
    let tail = Arc::new(TailStats::default());

    let tracer_provider = if settings.enabled {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.signal_url("traces")?)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| OtelError::Exporter {
                signal: "traces",
                source,
            })?;
        let batch =
            BatchSpanProcessor::builder(ObservedSpanExporter::new(exporter, traces.clone()))
                .build();
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource())
                .with_sampler(RecordAllSampler::new(settings.sampling_rate))
                .with_span_processor(KeepErrorsProcessor::new(batch, limits, tail.clone()))
                .build(),
        )
    } else {
        None
    };

    let registry = settings.prometheus_enabled.then(prometheus::Registry::new);
    let meter_provider = if settings.enabled || settings.prometheus_enabled {
        let mut builder = SdkMeterProvider::builder().with_resource(resource());
        if let Some(registry) = &registry {
            let reader = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .scope_info_enabled(false)
                .build()
                .map_err(OtelError::Prometheus)?;
            builder = builder.with_reader(reader);
        }
        if settings.enabled {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(settings.signal_url("metrics")?)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|source| OtelError::Exporter {
                    signal: "metrics",
                    source,
                })?;
            let reader = PeriodicReader::builder(ObservedMetricExporter::new(
                exporter,
                metrics_state.clone(),
            ))
            .with_interval(settings.metrics_interval)
            .build();
            builder = builder.with_reader(reader);
        }
        Some(builder.build())
    } else {
        None
    };

    let meter = match &meter_provider {
        Some(provider) => provider.meter(SCOPE),
        None => opentelemetry::metrics::noop::NoopMeterProvider::new().meter(SCOPE),
    };
    let vm = VmInstruments::new(&meter);
    let process = meter_provider
        .as_ref()
        .map(|_| ProcessInstruments::new(&meter));
    Ok(OtelHandle {
        inner: Arc::new(Inner {
            otlp_enabled: settings.enabled,
            tracer_provider,
            meter_provider,
            meter,
            registry,
            vm,
            _process: process,
            traces,
            metrics: metrics_state,
            tail,
        }),
    })
}

impl OtelHandle {
    /// A handle that records and exports nothing (OTLP and Prometheus off).
    pub fn disabled() -> Self {
        let meter = opentelemetry::metrics::noop::NoopMeterProvider::new().meter(SCOPE);
        OtelHandle {
            inner: Arc::new(Inner {
                otlp_enabled: false,
                tracer_provider: None,
                meter_provider: None,
                vm: VmInstruments::new(&meter),
                meter,
                registry: None,
                _process: None,
                traces: Arc::new(SignalState::new(false)),
                metrics: Arc::new(SignalState::new(false)),
                tail: Arc::default(),
            }),
        }
    }

    /// The meter for VMCP's instruments (the no-op meter when nothing exports).
    pub fn meter(&self) -> Meter {
        self.inner.meter.clone()
    }

    /// The tracer behind tracing spans, when OTLP push is on.
    pub fn tracer(&self) -> Option<SdkTracer> {
        self.inner.tracer_provider.as_ref().map(|p| p.tracer(SCOPE))
    }

    /// Sets the number of VMs per state for one backend (the `vmcp_vms` gauge).
    pub fn set_vm_counts(&self, backend: BackendKind, counts: &[(VmState, u64)]) {
        self.inner.vm.set_vm_counts(backend, counts);
    }

    /// The pipeline's state, for `/_/health`.
    pub fn health(&self) -> TelemetryHealth {
        let tail = &self.inner.tail;
        TelemetryHealth {
            otlp_enabled: self.inner.otlp_enabled,
            prometheus_enabled: self.inner.registry.is_some(),
            traces: self.inner.traces.snapshot(),
            metrics: self.inner.metrics.snapshot(),
            held_spans: tail.held_spans.load(Ordering::Relaxed),
            traces_dropped: tail.traces_dropped.load(Ordering::Relaxed),
            error_traces_kept: tail.error_traces_kept.load(Ordering::Relaxed),
            traces_decided_early: tail.traces_decided_early.load(Ordering::Relaxed),
        }
    }

    /// The metrics in Prometheus text format, or None when Prometheus is off.
    pub fn render_prometheus(&self) -> Option<Result<String, OtelError>> {
        use prometheus::Encoder as _;
        let registry = self.inner.registry.as_ref()?;
        let mut out = Vec::new();
        let encoded = prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .map_err(OtelError::Encode)
            .map(|()| String::from_utf8_lossy(&out).into_owned());
        Some(encoded)
    }

    /// Exports everything recorded so far. Blocks until the exporters answer
    /// (bounded by their timeout): call it from a blocking context.
    pub fn force_flush(&self) -> Result<(), OtelError> {
        if let Some(p) = &self.inner.tracer_provider {
            p.force_flush().map_err(|source| OtelError::Pipeline {
                action: "flush",
                signal: "traces",
                source,
            })?;
        }
        if let Some(p) = &self.inner.meter_provider {
            p.force_flush().map_err(|source| OtelError::Pipeline {
                action: "flush",
                signal: "metrics",
                source,
            })?;
        }
        Ok(())
    }

    /// Flushes and stops the pipeline, waiting at most `timeout`. Blocks the
    /// calling thread: from async code, run it in `spawn_blocking`. After it,
    /// recording still works but nothing is exported.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), OtelError> {
        let inner = self.inner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let traces = inner
                    .tracer_provider
                    .as_ref()
                    .map_or(Ok(()), |p| p.shutdown_with_timeout(timeout))
                    .map_err(|source| OtelError::Pipeline {
                        action: "shutdown",
                        signal: "traces",
                        source,
                    });
                let metrics = inner
                    .meter_provider
                    .as_ref()
                    .map_or(Ok(()), |p| p.shutdown_with_timeout(timeout))
                    .map_err(|source| OtelError::Pipeline {
                        action: "shutdown",
                        signal: "metrics",
                        source,
                    });
                let result = traces.and(metrics);
                // The receiver may have given up waiting; nothing to do then.
                let _ = tx.send(result);
            })
            .map_err(|_| OtelError::ShutdownTimedOut(Duration::ZERO))?;
        rx.recv_timeout(timeout)
            .unwrap_or(Err(OtelError::ShutdownTimedOut(timeout)))
    }
}

impl Telemetry for OtelHandle {
    fn record(&self, event: TelemetryEvent) {
        self.inner.vm.record(&event);
    }
}
