//! What one connection may cost and for how long: the timeouts and caps
//! ([`ConnectionLimits`]) and HTTP/2's own limits ([`H2Limits`]), set on
//! hyper's connection builder.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;

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
            tls_handshake_timeout: crate::adapters::inbound::tls::HANDSHAKE_TIMEOUT,
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_connections_per_client: 512,
            h2: H2Limits::default(),
        }
    }
}

impl ConnectionLimits {
    /// A connection builder with the HTTP/2 limits and keep-alive pings set.
    /// HTTP/1.1 head timing is [`drive`](super::drive())'s, so hyper's own header timer is off.
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
