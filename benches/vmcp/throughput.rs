//! Read throughput from outside (issue 14, items 1 and 7): the `vmcp-api`
//! binary with the production stack (bearer-token auth, request limits, the
//! connection layer, JSON access log, telemetry) answering GetVmInfo and
//! ListVms to 64 connections, over HTTP/1.1 and h2c, against a bare hyper
//! server in its own process answering the same protobuf bytes; and the
//! same vmcp-api with OpenTelemetry on (sampling 1.0, OTLP/HTTP to a
//! receiver that answers 200 with an empty body) and off.
//!
//! The load is raw hyper connections (one request in flight on each), so
//! the client is as cheap for both servers; it shares the 2 cores with
//! them, which lowers both and keeps the ratio fair.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use buffa::Message;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use vmcp::proto::vmm::v1 as pb;

use super::otel::start_sink;
use super::scale::{Api, fake_wrapper};
use super::vmm::{create_req, runtime_dir};

const TOKEN: &str = "bench-token-0123456789abcdef0123456789abcdef";
const CONNECTIONS: usize = 64;
const RUN: Duration = Duration::from_secs(2);
/// Runs per server and cell (the median is reported).
const ROUNDS: usize = 3;

/// Child mode: a bare hyper server (HTTP/1.1 and h2c) answering every POST
/// whose path ends in `GetVmInfo` with `info`, any other with `list`.
pub async fn bare_child(info: Bytes, list: Bytes) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (info, list) = (info.clone(), list.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let body = if req.uri().path().ends_with("GetVmInfo") {
                    info.clone()
                } else {
                    list.clone()
                };
                async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/proto")
                            .body(Full::new(body))
                            .unwrap(),
                    )
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The bare server as a child process of this bench, killed on drop.
struct Bare {
    child: std::process::Child,
    port: u16,
}

impl Bare {
    fn start(info: &[u8], list: &[u8]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(
                "VMCP_BENCH_BARE",
                format!("{},{}", hex::encode(info), hex::encode(list)),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("bare server starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("port");
        Self {
            child,
            port: line.trim().parse().expect("port number"),
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Wire {
    Http1,
    H2c,
}

/// Requests answered 200 by `port` on `CONNECTIONS` connections for `RUN`, per second.
async fn load(port: u16, wire: Wire, method: &'static str, body: Bytes) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (done, stop, counting, body) = (
            Arc::clone(&done),
            Arc::clone(&stop),
            Arc::clone(&counting),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            stream.set_nodelay(true).unwrap();
            let io = TokioIo::new(stream);
            let request = || {
                Request::post(format!("http://127.0.0.1:{port}/vmm.v1.VmService/{method}"))
                    .header("content-type", "application/proto")
                    .header("connect-protocol-version", "1")
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .body(Full::new(body.clone()))
                    .unwrap()
            };
            macro_rules! drive {
                ($sender:expr) => {{
                    let mut sender = $sender;
                    while !stop.load(Ordering::Relaxed) {
                        if sender.ready().await.is_err() {
                            return;
                        }
                        let res = sender.send_request(request()).await.expect("answer");
                        assert_eq!(res.status(), 200, "{method} answered {}", res.status());
                        res.into_body().collect().await.expect("body");
                        if counting.load(Ordering::Relaxed) {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }};
            }
            match wire {
                Wire::Http1 => {
                    let (sender, conn) =
                        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
                            .await
                            .expect("handshake");
                    tokio::spawn(conn);
                    drive!(sender);
                }
                Wire::H2c => {
                    let (sender, conn) =
                        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
                            TokioExecutor::new(),
                            io,
                        )
                        .await
                        .expect("handshake");
                    tokio::spawn(conn);
                    drive!(sender);
                }
            }
        }));
    }
    // Half a second of warm-up, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    counting.store(true, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(RUN).await;
    let n = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / elapsed.as_secs_f64()
}

/// vmcp-api with ten VMs, OTel on or off.
async fn vmcp(dir: &Path, fake: &Path, otel: Option<&str>) -> Api {
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let token = dir.join("token").display().to_string();
    let mut env = vec![
        ("UNKEY_VMCP_AUTH_TOKEN_FILE".to_owned(), token),
        ("UNKEY_VMCP_RATE_LIMIT_RPS".to_owned(), "1000000".to_owned()),
        ("UNKEY_VMCP_LOG_LEVEL".to_owned(), "info".to_owned()),
    ];
    if let Some(endpoint) = otel {
        env.push(("UNKEY_VMCP_OTEL_ENABLED".into(), "true".into()));
        env.push(("UNKEY_VMCP_OTEL_ENDPOINT".into(), endpoint.into()));
        env.push(("UNKEY_VMCP_OTEL_SAMPLING_RATE".into(), "1.0".into()));
    }
    Api::start_with(dir, fake, &env, Some(TOKEN)).await.0
}

pub async fn section() {
    let Some(fake) = super::scale::fake_firecracker() else {
        println!(
            "SKIPPED: throughput: missing the fake-firecracker example (run `cargo build --release --examples`)"
        );
        return;
    };
    let fake = fake.as_path();
    println!();
    println!(
        "== Read throughput from outside: vmcp-api (auth, limits, access log) vs a bare hyper server, {CONNECTIONS} connections, {} s each ==",
        RUN.as_secs()
    );
    let root = runtime_dir();
    let wrapper = fake_wrapper(root.path(), fake);
    let (sink, sink_counts) = start_sink().await;
    let info_req = Bytes::from(
        pb::GetVmInfoRequest {
            vm_id: "vm-00000".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let list_req = Bytes::from(pb::ListVmsRequest::default().encode_to_vec());

    // All three servers run side by side and each cell loads them in
    // turn, ROUNDS times with the order rotating, so that a slow moment of
    // this shared host lands on each of them alike; each figure is the
    // median of its rounds.
    let mut apis = Vec::new();
    for otel in [None, Some(sink.as_str())] {
        let dir = root.path().join(if otel.is_some() { "on" } else { "off" });
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("k"), b"kernel").unwrap();
        let api = vmcp(&dir, &wrapper, otel).await;
        let c = api.client();
        for i in 0..10 {
            c.create_vm(create_req(&format!("vm-{i:05}"), &dir.join("k")))
                .await
                .expect("create");
        }
        apis.push(api);
    }
    let c = apis[0].client();
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "vm-00000".into(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned()
        .encode_to_vec();
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned()
        .encode_to_vec();
    let bare = Bare::start(&info, &list);
    let servers = [
        ("vmcp, OTel off", apis[0].port()),
        ("vmcp, OTel on", apis[1].port()),
        ("bare hyper", bare.port),
    ];
    let mut results = Vec::new();
    for wire in [Wire::Http1, Wire::H2c] {
        for (method, req) in [("GetVmInfo", &info_req), ("ListVms", &list_req)] {
            let mut runs: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
            for round in 0..ROUNDS {
                for k in 0..servers.len() {
                    let i = (k + round) % servers.len();
                    runs[i].push(load(servers[i].1, wire, method, req.clone()).await);
                }
            }
            for (i, (label, _)) in servers.iter().enumerate() {
                runs[i].sort_by(f64::total_cmp);
                results.push((*label, wire, method, runs[i][runs[i].len() / 2]));
            }
        }
    }
    drop(bare);
    for api in &apis {
        let c = api.client();
        for i in 0..10 {
            let _ = c
                .delete_vm(pb::DeleteVmRequest {
                    vm_id: format!("vm-{i:05}"),
                    force: true,
                    ..Default::default()
                })
                .await;
        }
    }
    println!(
        "response sizes: GetVmInfo {} B, ListVms (10 VMs) {} B; the OTLP receiver got {} trace posts; medians of {ROUNDS} rounds, the three servers loaded in turn",
        info.len(),
        list.len(),
        sink_counts.traces.load(Ordering::Relaxed)
    );
    let rps = |who: &str, wire: Wire, method: &str| {
        results
            .iter()
            .find(|r| r.0 == who && r.1 == wire && r.2 == method)
            .map(|r| r.3)
            .unwrap_or(0.0)
    };
    println!(
        "{:<10} {:<10} {:>11} {:>15} {:>14} {:>12} {:>10}",
        "wire", "method", "bare req/s", "OTel off req/s", "OTel on req/s", "off / bare", "on / off"
    );
    for wire in [Wire::Http1, Wire::H2c] {
        for method in ["GetVmInfo", "ListVms"] {
            let (b, off, on) = (
                rps("bare hyper", wire, method),
                rps("vmcp, OTel off", wire, method),
                rps("vmcp, OTel on", wire, method),
            );
            println!(
                "{:<10} {:<10} {:>11.0} {:>15.0} {:>14.0} {:>11.2}× {:>9.2}×",
                if wire == Wire::Http1 {
                    "HTTP/1.1"
                } else {
                    "h2c"
                },
                method,
                b,
                off,
                on,
                off / b,
                on / off
            );
        }
    }
}
