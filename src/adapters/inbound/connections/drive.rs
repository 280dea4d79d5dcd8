//! Driving one admitted connection: its requests and reads are observed
//! ([`Activity`], [`Observed`], [`GuardedBody`]), and [`drive`] closes it when
//! its request head does not arrive within the header-read timeout or when
//! it has carried no request for the idle timeout, and shuts it down
//! gracefully when the server stops.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::after_write::{AfterWrite, Queue};
use super::limits::ConnectionLimits;
use crate::adapters::inbound::server::Body;

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

pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    Unknown,
    Http1,
    Http2,
}

#[derive(Debug)]
pub(super) struct Timing {
    pub(super) proto: Proto,
    served_any: bool,
    pub(super) idle_since: Instant,
    pub(super) head_started: Option<Instant>,
}

/// What a connection's requests and reads tell its driver. Nothing here
/// wakes the driver: every change moves the connection's deadline to no
/// earlier than `now + min(header-read, idle timeout)`, and [`drive`] never
/// sleeps longer than that before it looks again (see [`Activity::next_check`]).
/// A wake-up per request would cost a task reschedule, and on a multi-thread
/// runtime a futex wake of another worker, for every RPC.
#[derive(Debug)]
pub struct Activity {
    pub(super) started: Instant,
    in_flight: AtomicUsize,
    timing: Mutex<Timing>,
    /// What runs after the connection's next write.
    pub(super) after_write: Queue,
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
            after_write: Queue::default(),
        })
    }

    /// The handle a request carries to defer work until after the
    /// connection's next write.
    pub fn after_write(self: &Arc<Self>) -> AfterWrite {
        AfterWrite(Arc::clone(self))
    }

    pub(super) fn timing(&self) -> std::sync::MutexGuard<'_, Timing> {
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
        RequestGuard {
            activity: Arc::clone(self),
        }
    }

    pub(super) fn read(&self, proto: Option<Proto>) {
        let mut t = self.timing();
        if let Some(p) = proto {
            t.proto = p;
            if p == Proto::Http2 {
                // Past its preface, an HTTP/2 connection is idle from now.
                t.idle_since = Instant::now();
            }
        }
        // Bytes while no request is in flight start an HTTP/1.1 head; HTTP/2
        // frames between requests (pings, settings) do not.
        if t.served_any
            && t.proto == Proto::Http1
            && t.head_started.is_none()
            && self.in_flight.load(Ordering::Acquire) == 0
        {
            t.head_started = Some(Instant::now());
        }
    }

    /// When the connection must be closed if nothing changes, and why.
    pub(super) fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, Closed)> {
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

    /// When [`drive`] looks again, at `now`: the deadline, but never later
    /// than the soonest deadline a change from now on could set (a request
    /// ending starts an idle period, a byte after it starts a head).
    pub(super) fn next_check(&self, limits: &ConnectionLimits, now: Instant) -> Instant {
        let soonest = now + limits.header_read_timeout.min(limits.idle_timeout);
        self.deadline(limits)
            .map_or(soonest, |(at, _)| at.min(soonest))
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
        }
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
pub struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl std::fmt::Debug for GuardedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedBody")
            .field("guard", &self._guard)
            .finish_non_exhaustive()
    }
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

impl<T> std::fmt::Debug for Observed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("activity", &self.activity)
            .field("known", &self.known)
            .finish_non_exhaustive()
    }
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

impl<T> Drop for Observed<T> {
    fn drop(&mut self) {
        // Nothing writes on this connection again: what waited for a write
        // runs now, and what comes later runs where it is deferred.
        self.activity.after_write.close();
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
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        self.activity.after_write.run();
        Poll::Ready(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        self.activity.after_write.run();
        Poll::Ready(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        self.activity.after_write.run();
        Poll::Ready(flushed)
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
            None => Some(activity.next_check(&limits, Instant::now())),
        };
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
