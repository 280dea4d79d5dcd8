//! JSON log lines on stdout, one object per line, with the trace and span ids
//! of the OpenTelemetry span the event happened in, so a log line leads to its
//! trace. The formatter is ours rather than tracing-subscriber's JSON format
//! because that one knows nothing of OpenTelemetry ids and nests the message.
//!
//! Logs and traces are filtered apart: the log level (`RUST_LOG`, else
//! `UNKEY_VMCP_LOG_LEVEL`, else `info`) only decides what is printed, while
//! spans and events at INFO and above always reach the OpenTelemetry layer, so
//! `RUST_LOG=warn` does not silently turn tracing off. The SDK's own and the
//! HTTP client's events never become spans (that would feed back into export).

use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use opentelemetry::trace::TraceContextExt;

use super::{OtelError, OtelHandle};

/// The log filter: `RUST_LOG` if set, else `UNKEY_VMCP_LOG_LEVEL`, else `info`.
pub fn log_filter_from_env() -> String {
    log_filter_from(
        std::env::var("RUST_LOG").ok(),
        std::env::var("UNKEY_VMCP_LOG_LEVEL").ok(),
    )
}

fn log_filter_from(rust_log: Option<String>, vmcp_level: Option<String>) -> String {
    [rust_log, vmcp_level]
        .into_iter()
        .flatten()
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| "info".to_owned())
}

/// Installs the JSON logger (and the OpenTelemetry layer when OTLP is on) as
/// the global subscriber, writing to stdout.
pub fn init_logging(filter: &str, handle: &OtelHandle) -> Result<(), OtelError> {
    let subscriber = subscriber(filter, handle, std::io::stdout)?;
    tracing::subscriber::set_global_default(subscriber).map_err(OtelError::LoggingInstalled)
}

/// Builds the subscriber [`init_logging`] installs, writing to `writer`
/// (tests capture the lines this way).
pub fn subscriber<W>(
    filter: &str,
    handle: &OtelHandle,
    writer: W,
) -> Result<impl Subscriber + Send + Sync + 'static, OtelError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let env_filter = EnvFilter::try_new(filter).map_err(|source| OtelError::LogFilter {
        filter: filter.to_owned(),
        source,
    })?;
    let fmt = tracing_subscriber::fmt::layer()
        .fmt_fields(VmIdField)
        .event_format(JsonLines)
        .with_writer(writer)
        .with_filter(env_filter);
    let otel = handle.tracer().map(|tracer| {
        // Thread ids, busy/idle timings (a clock read per enter and exit),
        // source location and target are allocations on every span that say
        // little in an async server: the span name and attributes identify it.
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_target(false)
            .with_filter(trace_targets())
    });
    Ok(Registry::default().with(otel).with(fmt))
}

/// What becomes OpenTelemetry spans and span events.
fn trace_targets() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
        .with_target("opentelemetry_http", LevelFilter::OFF)
        .with_target("reqwest", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("h2", LevelFilter::OFF)
        .with_target(
            crate::adapters::inbound::rpc_layer::ACCESS_LOG_TARGET,
            LevelFilter::OFF,
        )
}

/// One JSON object per event: `timestamp`, `level`, `target`, `message`, the
/// event's fields, `span` (the innermost span's name), `vm_id` (from the
/// nearest span that recorded `vm.id`), and `trace_id` / `span_id` when the
/// event is inside an OpenTelemetry span.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

const RESERVED: [&str; 8] = [
    "timestamp",
    "level",
    "target",
    "message",
    "span",
    "vm_id",
    "trace_id",
    "span_id",
];

/// Keeps only a span's `vm.id` for the log layer. Formatting every span field
/// as JSON on each `record` (what tracing-subscriber's JSON fields do) cost
/// more than the rest of an RPC's telemetry together; the full set of span
/// attributes is in the trace, which `trace_id` leads to.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmIdField;

#[derive(Default)]
struct VmIdVisitor(Option<String>);

impl Visit for VmIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "vm.id" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "vm.id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<'w> FormatFields<'w> for VmIdField {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = VmIdVisitor::default();
        fields.record(&mut visitor);
        match visitor.0 {
            Some(id) => writer.write_str(&id),
            None => Ok(()),
        }
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut visitor = VmIdVisitor::default();
        fields.record(&mut visitor);
        if let Some(id) = visitor.0 {
            current.fields.clear();
            current.fields.push_str(&id);
        }
        Ok(())
    }
}

impl<S> FormatEvent<S, VmIdField> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, VmIdField>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;

        let mut fields = FieldMap::default();
        event.record(&mut fields);

        let mut line: Vec<(String, Value)> = vec![
            ("timestamp".into(), Value::String(timestamp)),
            (
                "level".into(),
                Value::String(event.metadata().level().to_string()),
            ),
            (
                "target".into(),
                Value::String(event.metadata().target().to_owned()),
            ),
            (
                "message".into(),
                fields.message.take().unwrap_or(Value::Null),
            ),
        ];
        for (k, v) in fields.map {
            let key = if RESERVED.contains(&k.as_str()) {
                format!("field.{k}")
            } else {
                k
            };
            line.push((key, v));
        }

        if let Some(scope) = ctx.event_scope() {
            let mut vm_id = None;
            for (depth, span) in scope.enumerate() {
                if depth == 0 {
                    line.push(("span".into(), Value::String(span.name().to_owned())));
                }
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<VmIdField>>()
                    && !f.fields.is_empty()
                {
                    vm_id = Some(f.fields.clone());
                    break;
                }
            }
            if let Some(id) = vm_id {
                line.push(("vm_id".into(), Value::String(id)));
            }
        }

        // The ids come from the OpenTelemetry context the OpenTelemetry layer
        // attaches when a span is entered, not from the spans this layer
        // sees: with RUST_LOG=warn the INFO RPC span is hidden from the log
        // filter, yet a warning inside it still belongs to its trace. (The
        // dispatcher cannot be asked here: it is busy dispatching this event.)
        let otel_cx = opentelemetry::Context::current();
        let otel_span = otel_cx.span();
        let sc = otel_span.span_context();
        if sc.is_valid() {
            line.push(("trace_id".into(), Value::String(sc.trace_id().to_string())));
            line.push(("span_id".into(), Value::String(sc.span_id().to_string())));
        }

        writer.write_char('{')?;
        for (i, (k, v)) in line.iter().enumerate() {
            if i > 0 {
                writer.write_char(',')?;
            }
            let key = serde_json::to_string(k).map_err(|_| fmt::Error)?;
            let value = serde_json::to_string(v).map_err(|_| fmt::Error)?;
            write!(writer, "{key}:{value}")?;
        }
        writer.write_str("}\n")
    }
}

/// Collects an event's fields as JSON values.
#[derive(Default)]
struct FieldMap {
    message: Option<Value>,
    map: Vec<(String, Value)>,
}

impl FieldMap {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            self.message = Some(value);
        } else if !name.starts_with("log.") {
            self.map.push((name.to_owned(), value));
        }
    }
}

impl Visit for FieldMap {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.put(field, v);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.put(field, Value::String(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// Captures written lines for assertions.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Capture {
        fn lines(&self) -> Vec<Value> {
            let bytes = self.0.lock().expect("capture").clone();
            String::from_utf8(bytes)
                .expect("utf8")
                .lines()
                .map(|l| serde_json::from_str(l).expect("each line is JSON"))
                .collect()
        }
    }

    #[test]
    fn filter_prefers_rust_log_then_vmcp_level() {
        assert_eq!(
            log_filter_from(Some("debug".into()), Some("warn".into())),
            "debug"
        );
        assert_eq!(
            log_filter_from(Some(" ".into()), Some("warn".into())),
            "warn"
        );
        assert_eq!(log_filter_from(None, None), "info");
    }

    #[test]
    fn invalid_filter_is_an_error() {
        let handle = OtelHandle::disabled();
        let err = subscriber("info,[", &handle, Capture::default())
            .err()
            .expect("bad filter");
        assert!(err.to_string().contains("info,["), "{err}");
    }

    #[test]
    fn lines_are_flat_json_with_fields_and_span() {
        let capture = Capture::default();
        let handle = OtelHandle::disabled();
        let sub = subscriber("info", &handle, capture.clone()).expect("subscriber");
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("rpc", vm.id = tracing::field::Empty);
            let _g = span.enter();
            span.record("vm.id", "vm-1");
            let _inner = tracing::info_span!("hypervisor.call", op = "boot").entered();
            tracing::info!(code = "ok", duration_ms = 1.5, count = 3u64, "rpc finished");
            tracing::debug!("filtered out");
        });
        let lines = capture.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["message"], "rpc finished");
        assert_eq!(l["code"], "ok");
        assert_eq!(l["duration_ms"], 1.5);
        assert_eq!(l["count"], 3);
        assert_eq!(l["span"], "hypervisor.call");
        assert_eq!(l["vm_id"], "vm-1");
        assert!(l["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(
            l.get("trace_id").is_none(),
            "no OpenTelemetry layer, no ids"
        );
    }
}
