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
use std::fmt::Write as _;

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

use super::log_writer::{BatchedWriter, FLUSH_EVERY, FlushGuard};
use super::{OtelError, OtelHandle};
use crate::adapters::inbound::rpc_layer::{self, context as rpc_context};

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
/// the global subscriber, writing to stdout in batches (see [`log_writer`]);
/// keep the guard until logging ends: dropping it writes what still waits.
///
/// [`log_writer`]: super::log_writer
pub fn init_logging(filter: &str, handle: &OtelHandle) -> Result<FlushGuard, OtelError> {
    let (writer, guard) =
        BatchedWriter::new(std::io::stdout(), FLUSH_EVERY).map_err(OtelError::LogWriter)?;
    let subscriber = subscriber(filter, handle, writer)?;
    tracing::subscriber::set_global_default(subscriber).map_err(OtelError::LoggingInstalled)?;
    Ok(guard)
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
        .with_target(rpc_layer::ACCESS_LOG_TARGET, LevelFilter::OFF)
}

/// One JSON object per event: `timestamp`, `level`, `target`, `message`, the
/// event's fields, `span` (the innermost span's name, `rpc` inside an RPC),
/// `vm_id` (the event's own `vm_id` field, else the nearest span that
/// recorded `vm.id`, else the RPC's), and `trace_id` / `span_id` when the
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
        // Written straight into the layer's line buffer: no JSON values are
        // built, only the event's fields are gathered first (the message goes
        // before them, whatever order they were recorded in).
        let mut fields = FieldWriter::default();
        event.record(&mut fields);
        fields.result?;

        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(event.metadata().level().as_str())?;
        writer.write_str("\",\"target\":")?;
        write_json_str(&mut writer, event.metadata().target())?;
        writer.write_str(",\"message\":")?;
        match &fields.message {
            Some(m) => writer.write_str(m)?,
            None => writer.write_str("null")?,
        }
        writer.write_str(&fields.rest)?;

        let (mut named, mut vm_known) = (false, fields.vm_id.is_some());
        if let Some(scope) = ctx.event_scope() {
            for (depth, span) in scope.enumerate() {
                if depth == 0 {
                    writer.write_str(",\"span\":")?;
                    write_json_str(&mut writer, span.name())?;
                    named = true;
                }
                if vm_known {
                    break;
                }
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<VmIdField>>()
                    && !f.fields.is_empty()
                {
                    writer.write_str(",\"vm_id\":")?;
                    write_json_str(&mut writer, &f.fields)?;
                    vm_known = true;
                    break;
                }
            }
        }
        if !named || !vm_known {
            rpc_context::with_current(|vm_id| {
                if !named {
                    writer.write_str(",\"span\":")?;
                    write_json_str(&mut writer, rpc_layer::SPAN_NAME)?;
                }
                match vm_id {
                    Some(id) if !vm_known => {
                        writer.write_str(",\"vm_id\":")?;
                        write_json_str(&mut writer, id)
                    }
                    _ => Ok(()),
                }
            })
            .transpose()?;
        }
        if let Some(own) = &fields.vm_id {
            writer.write_str(",\"vm_id\":")?;
            writer.write_str(own)?;
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
            write!(
                writer,
                ",\"trace_id\":\"{}\",\"span_id\":\"{}\"",
                sc.trace_id(),
                sc.span_id()
            )?;
        }
        writer.write_str("}\n")
    }
}

/// `s` as a JSON string, quotes included.
fn write_json_str(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        w.write_str(&s[start..i])?;
        if escape.is_empty() {
            write!(w, "\\u{b:04x}")?;
        } else {
            w.write_str(escape)?;
        }
        start = i + 1;
    }
    w.write_str(&s[start..])?;
    w.write_char('"')
}

/// Writes an event's fields as JSON members (`,"key":value`), the message
/// and `vm_id` apart; another field named like one of the line's own keys
/// becomes `field.<name>`.
struct FieldWriter {
    /// The message, as a JSON value.
    message: Option<String>,
    /// The event's own `vm_id`, as a JSON value.
    vm_id: Option<String>,
    /// The other fields, each as `,"key":value`.
    rest: String,
    /// The first failed write, if any.
    result: Result<(), fmt::Error>,
}

impl Default for FieldWriter {
    fn default() -> Self {
        Self {
            message: None,
            vm_id: None,
            rest: String::new(),
            result: Ok(()),
        }
    }
}

impl FieldWriter {
    /// Where `field`'s value goes, with its key written; None to skip it.
    fn slot(&mut self, field: &Field) -> Option<&mut String> {
        let name = field.name();
        if name == "message" {
            return Some(self.message.insert(String::new()));
        }
        if name == "vm_id" {
            return Some(self.vm_id.insert(String::new()));
        }
        if name.starts_with("log.") {
            return None;
        }
        self.rest.push(',');
        let written = if RESERVED.contains(&name) {
            write_json_str(&mut self.rest, &format!("field.{name}"))
        } else {
            write_json_str(&mut self.rest, name)
        };
        self.rest.push(':');
        self.result = self.result.and(written);
        Some(&mut self.rest)
    }

    fn put_str(&mut self, field: &Field, value: &str) {
        if let Some(out) = self.slot(field) {
            let written = write_json_str(out, value);
            self.result = self.result.and(written);
        }
    }

    fn put_display(&mut self, field: &Field, value: impl fmt::Display) {
        if let Some(out) = self.slot(field) {
            let written = write!(out, "{value}");
            self.result = self.result.and(written);
        }
    }
}

impl Visit for FieldWriter {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.put_display(field, value);
        } else {
            self.put_str(field, &value.to_string());
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put_display(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put_display(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put_display(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put_str(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.put_str(field, &text);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put_str(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
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

    /// The lines written while `f` runs under the JSON logger at `info`.
    fn logged(f: impl FnOnce()) -> Vec<Value> {
        let capture = Capture::default();
        let handle = OtelHandle::disabled();
        let sub = subscriber("info", &handle, capture.clone()).expect("subscriber");
        tracing::subscriber::with_default(sub, f);
        capture.lines()
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
        let lines = logged(|| {
            let span = tracing::info_span!("rpc", vm.id = tracing::field::Empty);
            let _g = span.enter();
            span.record("vm.id", "vm-1");
            let _inner = tracing::info_span!("hypervisor.call", op = "boot").entered();
            tracing::info!(code = "ok", duration_ms = 1.5, count = 3u64, "rpc finished");
            tracing::debug!("filtered out");
        });
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

    #[test]
    fn an_events_own_vm_id_wins_over_the_spans() {
        let lines = logged(|| {
            let span = tracing::info_span!("hypervisor.call", vm.id = "vm-span");
            let _g = span.enter();
            tracing::info!(vm_id = "vm-own", "about another VM");
            tracing::info!("about the span's VM");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["vm_id"], "vm-own");
        assert!(lines[0].get("field.vm_id").is_none(), "{}", lines[0]);
        assert_eq!(lines[1]["vm_id"], "vm-span");
        assert_eq!(lines[1]["span"], "hypervisor.call");
    }

    #[test]
    fn any_text_and_value_stays_valid_json() {
        let nasty = "quote \" backslash \\ newline \n tab \t bell \u{7} nul \u{0} é 🦀";
        let lines = logged(|| {
            let span = tracing::info_span!("rpc", vm.id = tracing::field::Empty);
            let _g = span.enter();
            span.record("vm.id", nasty);
            tracing::warn!(
                level = "mine",
                text = nasty,
                debug = ?nasty,
                nan = f64::NAN,
                inf = f64::INFINITY,
                whole = 2.0,
                negative = -7i64,
                flag = true,
                "{nasty}"
            );
            tracing::info!(no_message = 1u64);
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["level"], "WARN", "the line's own key wins");
        assert_eq!(
            l["field.level"], "mine",
            "a field named like a key is renamed"
        );
        assert_eq!(l["message"], nasty);
        assert_eq!(l["text"], nasty);
        assert_eq!(l["debug"], format!("{nasty:?}"));
        assert_eq!(l["vm_id"], nasty);
        assert_eq!(l["nan"], "NaN");
        assert_eq!(l["inf"], "inf");
        assert_eq!(l["whole"], 2.0);
        assert_eq!(l["negative"], -7);
        assert_eq!(l["flag"], true);
        assert_eq!(lines[1]["message"], Value::Null);
        assert_eq!(lines[1]["no_message"], 1);
    }
}
