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
//!
//! The parts: `limits` (the settings), `gate` (the caps at accept), `drive`
//! (one connection's timing) and `after_write` (bookkeeping about an answer,
//! run once the answer is written).

mod after_write;
mod drive;
mod gate;
mod limits;
#[cfg(test)]
mod tests;

pub use self::after_write::{AfterWrite, Deferred};
pub use self::drive::{
    Activity, Closed, Ended, GracefulConnection, GuardedBody, Observed, RequestGuard, drive,
};
pub use self::gate::{ConnectionGate, Permit, REFUSAL_LOG_INTERVAL, Refusal, RefusalLog};
pub use self::limits::{ConnectionLimits, H2Limits};
