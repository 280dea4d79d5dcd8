//! The caps at accept: a [`ConnectionGate`] counts open connections in all
//! and per client address and refuses one over either cap before a byte is
//! read; a [`RefusalLog`] keeps the refusals' log line to one per interval.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

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
    pub(super) per_client: Mutex<HashMap<IpAddr, usize>>,
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
