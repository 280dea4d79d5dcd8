//! Connection hygiene for the API port: what one connection may cost and for
//! how long. A [`ConnectionGate`] caps connections in total and per client
//! address at accept (over the cap a connection is closed before a byte is
//! read); each admitted connection is driven by [`drive`], which closes it
//! when its request head does not arrive within the header-read timeout or
//! when it has carried no request for the idle timeout, and shuts it down
//! gracefully when the server stops. A connection with a request in flight
//! (a streaming response included) is never idle. HTTP/2 limits (streams,
//! header list size, reset streams, keep-alive pings) are hyper's, set from
//! [`H2Limits`] in [`ConnectionLimits::configure`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::server::Body;

/// HTTP/2 limits per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Limits {
    /// Streams a client may have open at once.
    pub max_concurrent_streams: u32,
    /// Largest header list (decoded) a client may send.
    pub max_header_list_bytes: u32,
    /// Streams reset by the client before the server accepted them; more ends
    /// the connection (the rapid-reset attack).
    pub max_pending_reset_streams: usize,
    /// Streams the server resets because of client protocol errors; more ends the connection.
    pub max_local_error_resets: usize,
    /// Interval of keep-alive pings.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Default for H2Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            max_header_list_bytes: 16 * 1024,
            max_pending_reset_streams: 20,
            max_local_error_resets: 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Timeouts and caps for client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a client may take to send a complete request head (HTTP/1.1)
    /// or the HTTP/2 preface, from accept (after TLS) or from the first byte
    /// of a later request head.
    pub header_read_timeout: Duration,
    /// How long the TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// A connection without a request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections in all; `None` for the default, lowered to fit the descriptor budget.
    pub max_connections: Option<usize>,
    /// Open connections per client IP address.
    pub max_connections_per_client: usize,
    /// HTTP/2 limits.
    pub h2: H2Limits,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: super::tls::HANDSHAKE_TIMEOUT,
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_connections_per_client: 512,
            h2: H2Limits::default(),
        }
    }
}

impl ConnectionLimits {
    /// A connection builder with the HTTP/2 limits and keep-alive pings set.
    /// HTTP/1.1 head timing is [`drive`]'s, so hyper's own header timer is off.
    pub fn configure(&self) -> Builder<TokioExecutor> {
        let mut builder = Builder::new(TokioExecutor::new());
        builder.http1().header_read_timeout(None).keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2.max_concurrent_streams)
            .max_header_list_size(self.h2.max_header_list_bytes)
            .max_pending_accept_reset_streams(self.h2.max_pending_reset_streams)
            .max_local_error_reset_streams(self.h2.max_local_error_resets)
            .keep_alive_interval(self.h2.keepalive_interval)
            .keep_alive_timeout(self.h2.keepalive_timeout);
        builder
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The total cap is reached.
    Total,
    /// The client's address holds its cap.
    PerClient,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerClient => "max_connections_per_client",
        }
    }
}

/// Counts open connections in all and per client address.
#[derive(Debug)]
pub struct ConnectionGate {
    max_total: usize,
    max_per_client: usize,
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionGate {
    /// A gate admitting `max_total` connections, `max_per_client` per address.
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        Self {
            max_total,
            max_per_client,
            open: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one connection from `ip`, or says which cap refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let ip = ip.to_canonical();
        let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if self.open.load(Ordering::Acquire) >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = per_client.entry(ip).or_insert(0);
        if *n >= self.max_per_client {
            return Err(Refusal::PerClient);
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::AcqRel);
        Ok(Permit {
            gate: Arc::clone(self),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The total cap.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// The per-address cap.
    pub fn max_per_client(&self) -> usize {
        self.max_per_client
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<ConnectionGate>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut per_client = self
            .gate
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_client.remove(&self.ip);
            }
        }
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often refusals are logged at most.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Rate limit for the refusal log line: the first refusal is logged, then at
/// most one line per interval carrying how many were refused in between.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// A log that writes at most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Notes one refusal at `now`; `Some(n)` when a line should be written
    /// now, covering `n` refusals (this one included).
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// Why [`drive`] closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The request head (or HTTP/2 preface) did not arrive in time.
    HeaderTimeout,
    /// No request for the idle timeout.
    Idle,
}

impl Closed {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header",
            Closed::Idle => "idle",
        }
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Unknown,
    Http1,
    Http2,
}

#[derive(Debug)]
struct Timing {
    proto: Proto,
    served_any: bool,
    idle_since: Instant,
    head_started: Option<Instant>,
}

/// What a connection's requests and reads tell its driver.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    timing: Mutex<Timing>,
    changed: Notify,
}

impl Activity {
    /// A connection that starts now.
    pub fn new() -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            started: now,
            in_flight: AtomicUsize::new(0),
            timing: Mutex::new(Timing {
                proto: Proto::Unknown,
                served_any: false,
                idle_since: now,
                head_started: None,
            }),
            changed: Notify::new(),
        })
    }

    fn timing(&self) -> std::sync::MutexGuard<'_, Timing> {
        self.timing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request reached the service; the guard ends it (carry it in the response body).
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        {
            let mut t = self.timing();
            t.served_any = true;
            t.head_started = None;
        }
        self.changed.notify_one();
        RequestGuard {
            activity: Arc::clone(self),
        }
    }

    fn read(&self, proto: Option<Proto>) {
        let mut t = self.timing();
        if let Some(p) = proto {
            t.proto = p;
        }
        // Bytes while no request is in flight start an HTTP/1.1 head; HTTP/2
        // frames between requests (pings, settings) do not.
        if t.served_any
            && t.proto == Proto::Http1
            && t.head_started.is_none()
            && self.in_flight.load(Ordering::Acquire) == 0
        {
            t.head_started = Some(Instant::now());
            drop(t);
            self.changed.notify_one();
        }
    }

    /// When the connection must be closed if nothing changes, and why.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, Closed)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let t = self.timing();
        if !t.served_any && t.proto != Proto::Http2 {
            return Some((
                self.started + limits.header_read_timeout,
                Closed::HeaderTimeout,
            ));
        }
        if let Some(head) = t.head_started {
            return Some((head + limits.header_read_timeout, Closed::HeaderTimeout));
        }
        Some((t.idle_since + limits.idle_timeout, Closed::Idle))
    }
}

/// One request in flight; dropped when its response is sent or abandoned.
#[derive(Debug)]
pub struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.activity.timing().idle_since = Instant::now();
            self.activity.changed.notify_one();
        }
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
pub struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl GuardedBody {
    /// `inner`, ending `guard` when done.
    pub fn new(inner: Body, guard: RequestGuard) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's byte stream, reporting reads to its [`Activity`] and
/// telling HTTP/1.1 from HTTP/2 by the first bytes.
pub struct Observed<T> {
    inner: T,
    activity: Arc<Activity>,
    prefix: [u8; 24],
    prefix_len: usize,
    known: bool,
}

impl<T> Observed<T> {
    /// Observes `inner` for `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            prefix: [0; 24],
            prefix_len: 0,
            known: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Observed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if matches!(res, Poll::Ready(Ok(()))) && !new.is_empty() {
            let mut proto = None;
            if !self.known {
                let this = &mut *self;
                let take = new.len().min(24 - this.prefix_len);
                this.prefix[this.prefix_len..this.prefix_len + take].copy_from_slice(&new[..take]);
                this.prefix_len += take;
                if this.prefix[..this.prefix_len] != H2_PREFACE[..this.prefix_len] {
                    this.known = true;
                    proto = Some(Proto::Http1);
                } else if this.prefix_len == 24 {
                    this.known = true;
                    proto = Some(Proto::Http2);
                }
            }
            self.activity.read(proto);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Observed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A hyper connection that can be asked to finish gracefully.
pub trait GracefulConnection: Future {
    /// Starts a graceful shutdown (HTTP/2 GOAWAY; HTTP/1.1 close after the current response).
    fn start_graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulConnection
    for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    <S as hyper::service::Service<http::Request<hyper::body::Incoming>>>::Future: 'static,
    <S as hyper::service::Service<http::Request<hyper::body::Incoming>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper_util::server::conn::auto::HttpServerConnExec<
            <S as hyper::service::Service<http::Request<hyper::body::Incoming>>>::Future,
            B,
        >,
    E: hyper_util::server::conn::auto::HttpServerConnExec<
            <S as hyper::service::HttpService<hyper::body::Incoming>>::Future,
            B,
        >,
{
    fn start_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// How a driven connection ended.
#[derive(Debug)]
pub enum Ended<E> {
    /// The connection finished (the client closed, or a graceful shutdown completed).
    Done(Result<(), E>),
    /// [`drive`] closed it.
    Closed(Closed),
    /// A graceful shutdown did not finish within its bound; the connection was dropped.
    Abandoned,
}

/// Drives `conn` until it ends, closing it on a header or idle timeout and
/// shutting it down gracefully when `shutdown` turns true. A timed-out head is
/// dropped at once (nothing is answered); an idle connection gets a graceful
/// shutdown bounded by the header-read timeout.
pub async fn drive<C, E>(
    conn: C,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Ended<E>
where
    C: GracefulConnection<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let mut closing: Option<(Instant, Closed)> = None;
    let mut stopping = *shutdown.borrow();
    if stopping {
        conn.as_mut().start_graceful_shutdown();
    }
    loop {
        let deadline = match closing {
            Some((bound, _)) => Some(bound),
            None if stopping => None,
            None => activity.deadline(&limits).map(|(at, _)| at),
        };
        let changed = activity.changed.notified();
        tokio::select! {
            res = conn.as_mut() => {
                return match closing {
                    Some((_, why)) => match res {
                        Ok(()) => Ended::Closed(why),
                        Err(e) => Ended::Done(Err(e)),
                    },
                    None => Ended::Done(res),
                };
            }
            () = changed => {}
            r = shutdown.changed(), if !stopping => {
                // A dropped sender means the server is gone: stop as well.
                let _ = r;
                stopping = true;
                if closing.is_none() {
                    conn.as_mut().start_graceful_shutdown();
                }
            }
            () = sleep_until_opt(deadline) => {
                if closing.is_some() {
                    return Ended::Abandoned;
                }
                let now = Instant::now();
                match activity.deadline(&limits) {
                    Some((at, Closed::HeaderTimeout)) if at <= now => {
                        return Ended::Closed(Closed::HeaderTimeout);
                    }
                    Some((at, Closed::Idle)) if at <= now => {
                        conn.as_mut().start_graceful_shutdown();
                        closing = Some((now + limits.header_read_timeout, Closed::Idle));
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_per_client_and_in_total_and_frees_on_drop() {
        let gate = Arc::new(ConnectionGate::new(3, 2));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        let a1 = gate.admit(a).expect("a1");
        let a2 = gate.admit(a).expect("a2");
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerClient));
        // The same address written as IPv4-mapped IPv6 is the same client.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(gate.admit(mapped).err(), Some(Refusal::PerClient));
        let b1 = gate.admit(b).expect("b1");
        assert_eq!(gate.admit(c).err(), Some(Refusal::Total));
        assert_eq!(gate.open(), 3);
        drop(a1);
        assert_eq!(gate.open(), 2);
        let c1 = gate.admit(c).expect("c1 after a1 left");
        drop((a2, b1, c1));
        assert_eq!(gate.open(), 0);
        assert!(
            gate.per_client.lock().expect("lock").is_empty(),
            "no entry left behind"
        );
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10));
        assert_eq!(log.note(t0), Some(1), "the first refusal is logged");
        for i in 1..=500u64 {
            assert_eq!(log.note(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            log.note(t0 + Duration::from_secs(10)),
            Some(501),
            "the next line counts the refusals in between"
        );
        assert_eq!(log.note(t0 + Duration::from_secs(11)), None);
    }

    #[tokio::test]
    async fn deadlines_follow_heads_requests_and_idleness() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let a = Activity::new();
        let start = a.started;
        assert_eq!(
            a.deadline(&limits),
            Some((start + limits.header_read_timeout, Closed::HeaderTimeout)),
            "the first head is due a header timeout after accept"
        );
        a.read(Some(Proto::Http1));
        let guard = a.begin();
        let second = a.begin();
        assert_eq!(
            a.deadline(&limits),
            None,
            "never idle with a request in flight"
        );
        drop(guard);
        assert_eq!(a.deadline(&limits), None, "one request is still in flight");
        drop(second);
        let idle = a.timing().idle_since;
        assert!(idle >= start);
        assert_eq!(
            a.deadline(&limits),
            Some((idle + limits.idle_timeout, Closed::Idle))
        );
        a.read(None);
        let head = a.timing().head_started.expect("a head started");
        assert_eq!(
            a.deadline(&limits),
            Some((head + limits.header_read_timeout, Closed::HeaderTimeout)),
            "bytes of the next HTTP/1.1 head start the header timer"
        );
        drop(a.begin());
        assert_eq!(a.timing().head_started, None, "a request ends the head");

        let h2 = Activity::new();
        h2.read(Some(Proto::Http2));
        assert_eq!(
            h2.deadline(&limits),
            Some((h2.started + limits.idle_timeout, Closed::Idle)),
            "an HTTP/2 connection past its preface waits for requests up to the idle timeout"
        );
        drop(h2.begin());
        h2.read(None);
        assert!(
            matches!(h2.deadline(&limits), Some((_, Closed::Idle))),
            "HTTP/2 frames between requests do not start a header timer"
        );
    }

    #[tokio::test]
    async fn observed_streams_tell_http2_from_http1() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (bytes, want) in [
            (&H2_PREFACE[..], Proto::Http2),
            (&b"GET / HTTP/1.1\r\n"[..], Proto::Http1),
            (&b"PRI * HTTP/1.1"[..], Proto::Http1),
        ] {
            let (mut client, server) = tokio::io::duplex(64);
            let activity = Activity::new();
            let mut observed = Observed::new(server, Arc::clone(&activity));
            client.write_all(bytes).await.expect("write");
            drop(client);
            let mut sink = Vec::new();
            observed.read_to_end(&mut sink).await.expect("read");
            assert_eq!(activity.timing().proto, want, "{bytes:?}");
        }
    }
}
