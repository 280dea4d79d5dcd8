//! The state of the telemetry pipeline, for `/_/health`. Exporters are wrapped
//! so that every OTLP push records whether it reached the collector; nothing
//! here can fail or slow an RPC, it only remembers the last outcome.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use serde::Serialize;

/// Where one signal's OTLP push stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportState {
    /// OTLP push is off.
    Disabled,
    /// On, but nothing was exported yet.
    Pending,
    /// The last export reached the collector.
    Ok,
    /// The last export failed.
    Failing,
}

/// Health of one signal's OTLP push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignalHealth {
    /// Outcome of the last export.
    pub state: ExportState,
    /// Exports that reached the collector.
    pub exports_ok: u64,
    /// Exports that failed.
    pub exports_failed: u64,
    /// Unix seconds of the last successful export.
    pub last_success_unix: Option<u64>,
    /// The last export error, as the exporter reported it.
    pub last_error: Option<String>,
}

/// Health of the whole telemetry pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TelemetryHealth {
    /// Whether OTLP push is on.
    pub otlp_enabled: bool,
    /// Whether `/metrics` is served.
    pub prometheus_enabled: bool,
    /// Trace export.
    pub traces: SignalHealth,
    /// Metric export.
    pub metrics: SignalHealth,
    /// Spans of unfinished, unsampled traces held until their local root ends.
    pub held_spans: u64,
    /// Unsampled traces dropped because they had no error.
    pub traces_dropped: u64,
    /// Unsampled traces exported because they contained an error.
    pub error_traces_kept: u64,
    /// Traces decided early because of the held-span or age bound.
    pub traces_decided_early: u64,
}

impl TelemetryHealth {
    /// True when an enabled OTLP export is currently failing.
    pub fn degraded(&self) -> bool {
        self.traces.state == ExportState::Failing || self.metrics.state == ExportState::Failing
    }
}

/// Counters of the keep-errors span processor, shared with the health report.
#[derive(Debug, Default)]
pub struct TailStats {
    /// Spans currently held.
    pub held_spans: AtomicU64,
    /// Unsampled traces dropped.
    pub traces_dropped: AtomicU64,
    /// Unsampled traces kept for an error.
    pub error_traces_kept: AtomicU64,
    /// Traces decided by a bound rather than by their root ending.
    pub traces_decided_early: AtomicU64,
}

/// The last outcomes of one signal's exports.
#[derive(Debug)]
pub struct SignalState {
    enabled: bool,
    inner: Mutex<SignalHealth>,
}

impl SignalState {
    /// A signal whose push is on (`enabled`) or off.
    pub fn new(enabled: bool) -> Self {
        let state = if enabled {
            ExportState::Pending
        } else {
            ExportState::Disabled
        };
        Self {
            enabled,
            inner: Mutex::new(SignalHealth {
                state,
                exports_ok: 0,
                exports_failed: 0,
                last_success_unix: None,
                last_error: None,
            }),
        }
    }

    /// Records the outcome of one export.
    pub fn observe(&self, result: &OTelSdkResult) {
        if !self.enabled {
            return;
        }
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                h.state = ExportState::Ok;
                h.exports_ok += 1;
                h.last_success_unix = Some(unix_now());
            }
            Err(e) => {
                h.state = ExportState::Failing;
                h.exports_failed += 1;
                h.last_error = Some(e.to_string());
            }
        }
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> SignalHealth {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A span exporter that reports each export's outcome to a [`SignalState`].
#[derive(Debug)]
pub struct ObservedSpanExporter<E> {
    inner: E,
    state: std::sync::Arc<SignalState>,
}

impl<E> ObservedSpanExporter<E> {
    /// Wraps `inner`.
    pub fn new(inner: E, state: std::sync::Arc<SignalState>) -> Self {
        Self { inner, state }
    }
}

impl<E: SpanExporter> SpanExporter for ObservedSpanExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.state.observe(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A metric exporter that reports each export's outcome to a [`SignalState`].
#[derive(Debug)]
pub struct ObservedMetricExporter<E> {
    inner: E,
    state: std::sync::Arc<SignalState>,
}

impl<E> ObservedMetricExporter<E> {
    /// Wraps `inner`.
    pub fn new(inner: E, state: std::sync::Arc<SignalState>) -> Self {
        Self { inner, state }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for ObservedMetricExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        self.state.observe(&result);
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkError;

    #[test]
    fn observe_tracks_last_outcome_and_counts() {
        let s = SignalState::new(true);
        assert_eq!(s.snapshot().state, ExportState::Pending);
        s.observe(&Err(OTelSdkError::InternalFailure(
            "connection refused".into(),
        )));
        let h = s.snapshot();
        assert_eq!(h.state, ExportState::Failing);
        assert_eq!(h.exports_failed, 1);
        assert!(
            h.last_error
                .as_deref()
                .is_some_and(|e| e.contains("connection refused"))
        );
        s.observe(&Ok(()));
        let h = s.snapshot();
        assert_eq!(h.state, ExportState::Ok);
        assert_eq!((h.exports_ok, h.exports_failed), (1, 1));
        assert!(h.last_success_unix.is_some());
    }

    #[test]
    fn disabled_signal_stays_disabled() {
        let s = SignalState::new(false);
        s.observe(&Ok(()));
        assert_eq!(s.snapshot().state, ExportState::Disabled);
        assert_eq!(s.snapshot().exports_ok, 0);
    }
}
