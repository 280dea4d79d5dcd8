//! OTel on vs off: each case runs in its own child process (the bench binary
//! re-executed with `VMCP_BENCH_OTEL=on|off`), because the log lines (and
//! the spans opened inside handlers) go through the global tracing
//! subscriber, which a process can install once. Both children install the same subscriber as `vmcp-api`
//! (`otel::subscriber`, filter `info`, writing the JSON log lines to a sink
//! instead of stdout) and wrap the RPC service in `RpcTelemetryLayer` exactly
//! like `src/app/run.rs`, with the handle's tracer (none when off); only
//! `OtelSettings::enabled` differs. The ON child
//! exports over OTLP/HTTP to a tiny in-process hyper server.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

use vmcp::adapters::inbound::rpc_layer::RpcTelemetryLayer;
use vmcp::adapters::outbound::otel::{self, OtelSettings};

use super::{Stats, read_load, start_double_server};

/// Requests and bytes the sink received, per signal.
#[derive(Default)]
pub struct SinkCounts {
    pub traces: AtomicU64,
    pub metrics: AtomicU64,
    pub bytes: AtomicU64,
}

/// Starts an OTLP/HTTP sink on 127.0.0.1: 200 for POST /v1/traces and /v1/metrics, 404 otherwise.
pub async fn start_sink() -> (String, Arc<SinkCounts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(SinkCounts::default());
    let c = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let c = Arc::clone(&c);
                    async move {
                        let counter = match (req.method(), req.uri().path()) {
                            (&Method::POST, "/v1/traces") => Some(&c.traces),
                            (&Method::POST, "/v1/metrics") => Some(&c.metrics),
                            _ => None,
                        };
                        let n = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        c.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        let status = match counter {
                            Some(k) => {
                                k.fetch_add(1, Ordering::Relaxed);
                                200
                            }
                            None => 404,
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), counts)
}

/// The child side: serve with OTel `on` or off, load it, print one `RESULT` line.
pub async fn child(on: bool, concurrency: usize, dur: Duration) {
    let (endpoint, counts) = start_sink().await;
    let handle = otel::init(&OtelSettings {
        enabled: on,
        endpoint,
        sampling_rate: 1.0,
        prometheus_enabled: false,
        ..Default::default()
    })
    .expect("otel init");
    let subscriber = otel::subscriber("info", &handle, std::io::sink).expect("subscriber");
    tracing::subscriber::set_global_default(subscriber).expect("global subscriber");
    let meter = handle.meter();
    let tracer = handle.tracer();
    let (running, _d) = start_double_server(
        Arc::new(handle.clone()),
        Box::new(move |rpc| {
            BoxCloneService::new(
                RpcTelemetryLayer::new(&meter)
                    .with_tracer(tracer.clone())
                    .layer(rpc)
                    .map_response(|r| r.map(|b| b.boxed_unsync())),
            )
        }),
    )
    .await;
    let s = read_load(running.local_addr, false, concurrency, dur).await;
    running.shutdown().await;
    let flushing = handle.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.shutdown(Duration::from_secs(5))).await;
    let h = handle.health();
    println!(
        "RESULT {} {} {} {} {} {} {} {}",
        s.count,
        s.elapsed.as_secs_f64(),
        s.p50.as_secs_f64(),
        s.p99.as_secs_f64(),
        counts.traces.load(Ordering::Relaxed),
        counts.metrics.load(Ordering::Relaxed),
        counts.bytes.load(Ordering::Relaxed),
        h.degraded()
    );
}

struct ChildResult {
    stats: Stats,
    traces: u64,
    metrics: u64,
    bytes: u64,
    degraded: String,
}

fn run_child(on: bool) -> Option<ChildResult> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .env("VMCP_BENCH_OTEL", if on { "on" } else { "off" })
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let secs = |i: usize| Duration::from_secs_f64(f[i].parse().unwrap_or(0.0));
    let count: usize = f[0].parse().ok()?;
    Some(ChildResult {
        stats: Stats {
            count,
            elapsed: secs(1),
            p50: secs(2),
            p99: secs(3),
        },
        traces: f[4].parse().ok()?,
        metrics: f[5].parse().ok()?,
        bytes: f[6].parse().ok()?,
        degraded: f[7].to_owned(),
    })
}

/// The parent side: off, on, off, on; prints each run and the ratio of the mean throughputs.
pub fn section(bare_rps: f64) {
    println!();
    println!(
        "== OTel on (OTLP/HTTP to a local sink, sampling 1.0) vs off: GetVmInfo, 32 clients, 4 s per run, each run in its own process =="
    );
    let mut on = Vec::new();
    let mut off = Vec::new();
    for round in 0..2 {
        for enabled in [false, true] {
            let Some(r) = run_child(enabled) else {
                println!("OTel child run failed (round {round}, on={enabled})");
                return;
            };
            let label = format!(
                "round {} OTel {}",
                round + 1,
                if enabled { "ON " } else { "OFF" }
            );
            if enabled {
                println!(
                    "{}   sink: {} trace posts, {} metric posts, {} KiB, degraded={}",
                    r.stats.line(&label),
                    r.traces,
                    r.metrics,
                    r.bytes / 1024,
                    r.degraded
                );
                on.push(r.stats.rps());
            } else {
                println!("{}", r.stats.line(&label));
                off.push(r.stats.rps());
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (m_on, m_off) = (mean(&on), mean(&off));
    println!("mean OTel OFF {m_off:.0} req/s, OTel ON {m_on:.0} req/s");
    println!(
        "RATIO OTel ON / OFF throughput: {:.3} (goal >= 0.85)",
        m_on / m_off
    );
    println!(
        "RATIO OTel OFF (layer + JSON logger) / bare server (section 1, no layer, no subscriber): {:.3}",
        m_off / bare_rps
    );
}
