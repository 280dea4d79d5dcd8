//! Sampling that keeps every trace containing an error, at any ratio.
//!
//! A head sampler alone cannot do that: it decides when the root span starts,
//! before anything has failed (the original Go service lost its error spans
//! this way, as children of unsampled roots). So [`RecordAllSampler`] takes the
//! usual parent-based ratio decision but never drops: spans the ratio rejects
//! are still recorded (RecordOnly), only not marked sampled. Then
//! [`KeepErrorsProcessor`] sits in front of the batch exporter: sampled spans
//! pass straight through, unsampled ones are held per trace id until the
//! trace's local root ends, and the whole local trace is exported if any span
//! in it has an error status, dropped otherwise. The SDK hands RecordOnly spans
//! to processors like any other, so without this filter they would all be
//! exported. Held spans are bounded in number and age; a trace that hits a
//! bound is decided with what it has.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::{Link, SpanId, SpanKind, Status, TraceContextExt, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, ShouldSample, Span, SpanData, SpanProcessor,
};

use super::health::TailStats;

/// Parent-based ratio sampling that records what it does not sample.
///
/// A valid parent (remote or local) decides: sampled → sampled, unsampled →
/// record only. Without one, the trace id ratio decides the same way.
#[derive(Debug, Clone)]
pub struct RecordAllSampler {
    ratio: Sampler,
}

impl RecordAllSampler {
    /// Samples `rate` of new root traces (clamped to [0, 1]).
    pub fn new(rate: f64) -> Self {
        Self {
            ratio: Sampler::TraceIdRatioBased(rate.clamp(0.0, 1.0)),
        }
    }
}

impl ShouldSample for RecordAllSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let parent = parent_context
            .map(|cx| cx.span().span_context().clone())
            .filter(|sc| sc.is_valid());
        let (sampled, trace_state) = match parent {
            Some(sc) => (sc.is_sampled(), sc.trace_state().clone()),
            None => {
                let decision = self
                    .ratio
                    .should_sample(None, trace_id, name, span_kind, attributes, links)
                    .decision;
                (
                    decision == SamplingDecision::RecordAndSample,
                    TraceState::default(),
                )
            }
        };
        SamplingResult {
            decision: if sampled {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::RecordOnly
            },
            attributes: Vec::new(),
            trace_state,
        }
    }
}

/// Bounds on what [`KeepErrorsProcessor`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailLimits {
    /// Most unsampled spans held at once, over all traces.
    pub max_held_spans: usize,
    /// Longest an unfinished trace is held after its first span ended.
    pub max_trace_age: Duration,
    /// How many decided trace ids are remembered, for children ending late.
    pub remembered_decisions: usize,
}

impl Default for TailLimits {
    fn default() -> Self {
        Self {
            max_held_spans: 8192,
            max_trace_age: Duration::from_secs(60),
            remembered_decisions: 4096,
        }
    }
}

#[derive(Debug)]
struct Pending {
    spans: Vec<SpanData>,
    keep: bool,
    since: Instant,
}

#[derive(Debug, Default)]
struct Held {
    traces: HashMap<TraceId, Pending>,
    /// Traces in the order their first span ended, for the age bound.
    order: VecDeque<(TraceId, Instant)>,
    held: usize,
    decided: HashMap<TraceId, bool>,
    decided_order: VecDeque<TraceId>,
}

/// Forwards sampled spans at once and unsampled ones only when their local
/// trace contains an error. See the module documentation.
#[derive(Debug)]
pub struct KeepErrorsProcessor<P> {
    inner: P,
    limits: TailLimits,
    state: Mutex<Held>,
    stats: Arc<TailStats>,
}

impl<P: SpanProcessor> KeepErrorsProcessor<P> {
    /// Wraps `inner` (normally a batch processor) with the given bounds.
    pub fn new(inner: P, limits: TailLimits, stats: Arc<TailStats>) -> Self {
        Self {
            inner,
            limits,
            state: Mutex::new(Held::default()),
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forward(&self, spans: Vec<SpanData>) {
        for span in spans {
            self.inner.on_end(span);
        }
    }

    /// Decides `trace_id` now and moves its spans to `out` if kept.
    fn decide(&self, held: &mut Held, trace_id: TraceId, out: &mut Vec<SpanData>) {
        let Some(pending) = held.traces.remove(&trace_id) else {
            return;
        };
        held.held -= pending.spans.len();
        if pending.keep {
            self.stats.error_traces_kept.fetch_add(1, Ordering::Relaxed);
            out.extend(pending.spans);
        } else {
            self.stats.traces_dropped.fetch_add(1, Ordering::Relaxed);
        }
        held.decided.insert(trace_id, pending.keep);
        held.decided_order.push_back(trace_id);
        while held.decided_order.len() > self.limits.remembered_decisions {
            if let Some(old) = held.decided_order.pop_front() {
                held.decided.remove(&old);
            }
        }
    }

    /// Decides the oldest traces while a bound is exceeded.
    fn enforce_bounds(&self, held: &mut Held, now: Instant, out: &mut Vec<SpanData>) {
        while let Some(&(trace_id, since)) = held.order.front() {
            let current = held.traces.get(&trace_id).map(|p| p.since) == Some(since);
            if !current {
                held.order.pop_front();
                continue;
            }
            let too_many = held.held > self.limits.max_held_spans;
            let too_old = now.duration_since(since) > self.limits.max_trace_age;
            if !(too_many || too_old) {
                break;
            }
            held.order.pop_front();
            self.stats
                .traces_decided_early
                .fetch_add(1, Ordering::Relaxed);
            self.decide(held, trace_id, out);
        }
    }

    /// Decides every held trace now (at shutdown).
    fn decide_all(&self) {
        let mut out = Vec::new();
        {
            let mut held = self.lock();
            let ids: Vec<TraceId> = held.traces.keys().copied().collect();
            for id in ids {
                self.decide(&mut held, id, &mut out);
            }
            held.order.clear();
            self.stats.held_spans.store(0, Ordering::Relaxed);
        }
        self.forward(out);
    }
}

fn has_error(span: &SpanData) -> bool {
    matches!(span.status, Status::Error { .. })
}

fn is_local_root(span: &SpanData) -> bool {
    span.parent_span_id == SpanId::INVALID || span.parent_span_is_remote
}

impl<P: SpanProcessor> SpanProcessor for KeepErrorsProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let sampled = span.span_context.is_sampled();
        let trace_id = span.span_context.trace_id();
        let mut out = Vec::new();
        {
            let mut held = self.lock();
            if let Some(&kept) = held.decided.get(&trace_id) {
                // A child that ended after its local root: follow the decision,
                // but never lose an error span.
                if kept || sampled || has_error(&span) {
                    out.push(span);
                }
            } else if sampled && !held.traces.contains_key(&trace_id) {
                out.push(span);
            } else {
                let now = Instant::now();
                let local_root = is_local_root(&span);
                let keep = sampled || has_error(&span);
                let Held { traces, order, .. } = &mut *held;
                let pending = traces.entry(trace_id).or_insert_with(|| {
                    order.push_back((trace_id, now));
                    Pending {
                        spans: Vec::new(),
                        keep: false,
                        since: now,
                    }
                });
                pending.keep |= keep;
                pending.spans.push(span);
                held.held += 1;
                if local_root {
                    self.decide(&mut held, trace_id, &mut out);
                }
                self.enforce_bounds(&mut held, now, &mut out);
            }
            self.stats
                .held_spans
                .store(held.held as u64, Ordering::Relaxed);
        }
        self.forward(out);
    }

    fn force_flush(&self) -> OTelSdkResult {
        let mut out = Vec::new();
        {
            let mut held = self.lock();
            let now = Instant::now();
            self.enforce_bounds(&mut held, now, &mut out);
            self.stats
                .held_spans
                .store(held.held as u64, Ordering::Relaxed);
        }
        self.forward(out);
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.decide_all();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};

    /// Records every span it is given, sampled or not, as the batch
    /// processor would hand it to the exporter.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<SpanData>>>);

    impl SpanProcessor for Recorder {
        fn on_start(&self, _span: &mut Span, _cx: &Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().expect("recorder").push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    fn span(trace: u128, id: u64, parent: u64, remote_parent: bool, sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(trace),
                SpanId::from(id),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: remote_parent,
            span_kind: SpanKind::Internal,
            name: format!("s{id}").into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    fn errored(mut s: SpanData) -> SpanData {
        s.status = Status::error("boom");
        s
    }

    fn setup(limits: TailLimits) -> (KeepErrorsProcessor<Recorder>, Recorder, Arc<TailStats>) {
        let recorder = Recorder::default();
        let stats = Arc::new(TailStats::default());
        let p = KeepErrorsProcessor::new(recorder.clone(), limits, stats.clone());
        (p, recorder, stats)
    }

    fn exported_ids(e: &Recorder) -> Vec<u64> {
        let mut ids: Vec<u64> =
            e.0.lock()
                .expect("recorder")
                .iter()
                .map(|s| u64::from_be_bytes(s.span_context.span_id().to_bytes()))
                .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn unsampled_trace_without_error_is_dropped_whole() {
        let (p, e, stats) = setup(TailLimits::default());
        p.on_end(span(1, 2, 1, false, false));
        p.on_end(span(1, 3, 1, false, false));
        assert_eq!(stats.held_spans.load(Ordering::Relaxed), 2);
        p.on_end(span(1, 1, 0, false, false));
        assert!(exported_ids(&e).is_empty());
        assert_eq!(stats.held_spans.load(Ordering::Relaxed), 0);
        assert_eq!(stats.traces_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn unsampled_trace_with_an_error_child_is_exported_whole() {
        let (p, e, stats) = setup(TailLimits::default());
        p.on_end(errored(span(1, 3, 2, false, false)));
        p.on_end(span(1, 2, 1, false, false));
        assert!(exported_ids(&e).is_empty(), "held until the root ends");
        p.on_end(span(1, 1, 0, false, false));
        assert_eq!(exported_ids(&e), vec![1, 2, 3]);
        assert_eq!(stats.error_traces_kept.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn root_with_remote_parent_ends_the_local_trace() {
        let (p, e, _) = setup(TailLimits::default());
        p.on_end(span(7, 2, 1, false, false));
        p.on_end(errored(span(7, 1, 99, true, false)));
        assert_eq!(exported_ids(&e), vec![1, 2]);
    }

    #[test]
    fn sampled_spans_pass_straight_through() {
        let (p, e, stats) = setup(TailLimits::default());
        p.on_end(span(1, 2, 1, false, true));
        assert_eq!(exported_ids(&e), vec![2]);
        assert_eq!(stats.held_spans.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn late_children_follow_the_decision_but_errors_survive() {
        let (p, e, _) = setup(TailLimits::default());
        p.on_end(span(1, 1, 0, false, false));
        p.on_end(span(1, 2, 1, false, false));
        assert!(exported_ids(&e).is_empty());
        p.on_end(errored(span(1, 3, 1, false, false)));
        assert_eq!(exported_ids(&e), vec![3]);

        p.on_end(errored(span(2, 5, 4, false, false)));
        p.on_end(span(2, 4, 0, false, false));
        p.on_end(span(2, 6, 4, false, false));
        assert_eq!(exported_ids(&e), vec![3, 4, 5, 6]);
    }

    #[test]
    fn held_span_bound_decides_the_oldest_trace() {
        let limits = TailLimits {
            max_held_spans: 3,
            ..TailLimits::default()
        };
        let (p, e, stats) = setup(limits);
        p.on_end(errored(span(1, 11, 10, false, false)));
        p.on_end(span(1, 12, 10, false, false));
        p.on_end(span(2, 21, 20, false, false));
        assert!(exported_ids(&e).is_empty());
        p.on_end(span(2, 22, 20, false, false));
        assert_eq!(exported_ids(&e), vec![11, 12], "oldest trace decided early");
        assert_eq!(stats.held_spans.load(Ordering::Relaxed), 2);
        assert_eq!(stats.traces_decided_early.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn age_bound_decides_stale_traces() {
        let limits = TailLimits {
            max_trace_age: Duration::ZERO,
            ..TailLimits::default()
        };
        let (p, e, stats) = setup(limits);
        p.on_end(errored(span(1, 11, 10, false, false)));
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.held_spans.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            p.force_flush().expect("flush");
            std::thread::yield_now();
        }
        assert_eq!(
            exported_ids(&e),
            vec![11],
            "the root never ended, the age bound decided"
        );
        assert_eq!(stats.traces_decided_early.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn shutdown_decides_everything_held() {
        let (p, e, stats) = setup(TailLimits::default());
        p.on_end(errored(span(1, 11, 10, false, false)));
        p.on_end(span(2, 21, 20, false, false));
        p.shutdown_with_timeout(Duration::from_secs(1))
            .expect("shutdown");
        assert_eq!(exported_ids(&e), vec![11]);
        assert_eq!(stats.held_spans.load(Ordering::Relaxed), 0);
    }

    fn decide(rate: f64, parent: Option<SpanContext>, trace: u128) -> SamplingDecision {
        let cx = parent.map(|sc| Context::new().with_remote_span_context(sc));
        RecordAllSampler::new(rate)
            .should_sample(
                cx.as_ref(),
                TraceId::from(trace),
                "x",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision
    }

    fn remote(sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from(5u128),
            SpanId::from(6u64),
            flags,
            true,
            TraceState::default(),
        )
    }

    #[test]
    fn sampler_records_everything_and_honours_parents() {
        assert_eq!(decide(1.0, None, 42), SamplingDecision::RecordAndSample);
        assert_eq!(decide(0.0, None, 42), SamplingDecision::RecordOnly);
        assert_eq!(
            decide(0.0, Some(remote(true)), 5),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decide(1.0, Some(remote(false)), 5),
            SamplingDecision::RecordOnly
        );
    }

    #[test]
    fn sampler_ratio_is_roughly_respected() {
        let sampled = (0..10_000u128)
            .map(|i| {
                decide(
                    0.25,
                    None,
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
                )
            })
            .filter(|d| *d == SamplingDecision::RecordAndSample)
            .count();
        assert!((2_000..3_000).contains(&sampled), "{sampled}");
    }
}
