//! A Unix stream socket watched for reads only: [`QuietUnixStream`].
//!
//! Tokio registers every socket it drives for reads and writes at once,
//! edge-triggered. On a Unix stream socket the write side fires whenever the
//! peer takes data off the socket (`unix_write_space` in the kernel), so with
//! a plain `tokio::net::UnixStream` every response the peer reads wakes this
//! side's thread once more for nothing: an extra `epoll_wait` return and a
//! wake-up paid, as a cross-CPU wake, inside the peer's own `recv`. A TCP
//! socket signals write space only after a write found its buffer full, so
//! this costs nothing there.
//!
//! A [`QuietUnixStream`] is registered for reads only. Writes go straight to
//! the socket; only when one would block does it register a second
//! descriptor of the same socket for writes, wait on it, and drop it once the
//! write went through. So an answer that fits the socket's buffer (every
//! unary answer but the largest pages) costs no wake-up after it is sent, as
//! in Firecracker's own API server, which arms `EPOLLOUT` only while a
//! response is pending.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Most bytes one read asks for: what is handed to the kernel is zeroed first.
const MAX_READ: usize = 64 * 1024;

/// A connected Unix stream registered with tokio for reads only; see the
/// module documentation.
#[derive(Debug)]
pub struct QuietUnixStream {
    /// The socket, registered for reads.
    socket: AsyncFd<UnixStream>,
    /// A second descriptor of the socket, registered for writes, only while
    /// a write waits for buffer space.
    write_wait: Option<AsyncFd<UnixStream>>,
}

impl QuietUnixStream {
    /// Takes `stream` (set non-blocking here) and registers it with the
    /// current tokio runtime for reads.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            socket: register(stream, Interest::READABLE)?,
            write_wait: None,
        })
    }

    /// Takes a tokio stream off tokio's read-and-write registration.
    pub fn from_tokio(stream: tokio::net::UnixStream) -> io::Result<Self> {
        Self::new(stream.into_std()?)
    }

    /// Runs `write` on the socket; when it would block, waits for buffer
    /// space on a write-registered descriptor and tries again.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let Some(waiting) = &self.write_wait else {
                match write(self.socket.get_ref()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Registering reports the current state, so space that
                        // freed since the write failed is not missed.
                        let dup = self.socket.get_ref().try_clone()?;
                        self.write_wait = Some(register(dup, Interest::WRITABLE)?);
                        continue;
                    }
                    done => return Poll::Ready(done),
                }
            };
            let mut ready = ready!(waiting.poll_write_ready(cx))?;
            match ready.try_io(|fd| write(fd.get_ref())) {
                Ok(done) => {
                    // Written (or failed): stop watching for space, so the
                    // peer's reads wake nobody again.
                    self.write_wait = None;
                    return Poll::Ready(done);
                }
                // Still full: readiness is cleared, wait again.
                Err(_would_block) => {}
            }
        }
    }
}

/// Registers `socket` with the current tokio runtime for `interest` only.
fn register(socket: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the `AsyncFd` owns `socket` until it is dropped, so its
    // descriptor stays open and refers to the same socket all that time, and
    // `UnixStream::as_raw_fd` always returns that one descriptor.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(socket, interest) };
    Ok(registered?)
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut ready = ready!(this.socket.poll_read_ready(cx))?;
            let room = buf.remaining().min(MAX_READ);
            let unfilled = buf.initialize_unfilled_to(room);
            match ready.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read took all there was: the next read would
                    // only say "would block", so wait for the next edge
                    // instead (as tokio's own streams do).
                    if n > 0 && n < room {
                        ready.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for QuietUnixStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go to the socket directly; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests;
