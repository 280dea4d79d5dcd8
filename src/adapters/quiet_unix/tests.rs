use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::QuietUnixStream;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn carries_bytes_both_ways_and_ends() {
    let (ours, mut peer) = UnixStream::pair().expect("pair");
    let rt = runtime();
    let echoed = std::thread::spawn(move || {
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).expect("peer read");
        peer.write_all(b"world").expect("peer write");
        peer.shutdown(std::net::Shutdown::Write)
            .expect("peer shutdown");
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).expect("peer reads to the end");
        (got, rest)
    });
    let read = rt.block_on(async move {
        let mut s = QuietUnixStream::new(ours).expect("register");
        s.write_all(b"hello").await.expect("write");
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.expect("read to the end");
        s.write_all(b"bye")
            .await
            .expect("write after the peer's shutdown");
        s.shutdown().await.expect("shutdown");
        back
    });
    let (got, rest) = echoed.join().expect("peer thread");
    assert_eq!(&got, b"hello");
    assert_eq!(read, b"world");
    assert_eq!(rest, b"bye");
}

/// Far more than a Unix socket buffers: the writes block until the peer,
/// which starts reading late and slowly, makes room. Everything arrives, in
/// order, and the write-side registration is gone once the writes are done.
#[test]
fn a_write_larger_than_the_socket_buffer_waits_for_room() {
    const LEN: usize = 8 * 1024 * 1024;
    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let (ours, mut peer) = UnixStream::pair().expect("pair");
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::with_capacity(LEN);
        let mut chunk = [0u8; 4096];
        loop {
            let n = peer.read(&mut chunk).expect("peer read");
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&chunk[..n]);
        }
    });
    let rt = runtime();
    let waited_at_end = rt.block_on(async move {
        let mut s = QuietUnixStream::new(ours).expect("register");
        // Vectored, as hyper writes: head and body in one call.
        let (head, body) = data.split_at(100);
        let mut sent = 0;
        let mut blocked = false;
        while sent < LEN {
            let bufs = if sent < head.len() {
                vec![
                    std::io::IoSlice::new(&head[sent..]),
                    std::io::IoSlice::new(body),
                ]
            } else {
                vec![std::io::IoSlice::new(&data[sent..])]
            };
            let n = std::future::poll_fn(|cx| {
                let r = std::pin::Pin::new(&mut s).poll_write_vectored(cx, &bufs);
                blocked |= r.is_pending();
                r
            })
            .await
            .expect("write");
            assert!(n > 0, "a write took nothing");
            sent += n;
        }
        assert!(
            blocked,
            "the writes never had to wait: the test proves nothing"
        );
        let waiting = s.write_wait.is_some();
        s.shutdown().await.expect("shutdown");
        waiting
    });
    assert!(
        !waited_at_end,
        "the write-side registration outlived the write that needed it"
    );
    let got = reader.join().expect("reader");
    assert_eq!(got.len(), LEN);
    assert!(got == expected, "the bytes arrived changed or out of order");
}

/// What the runtime thread serving one side goes through while the peer
/// reads `MESSAGES` small writes one at a time: how many times it was put
/// to sleep and woken (its voluntary context switches).
fn wakeups_while_the_peer_reads<S, F>(wrap: F) -> u64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: FnOnce(UnixStream) -> S + Send + 'static,
{
    const MESSAGES: usize = 32;
    const SIZE: usize = 512;
    let (ours, mut peer) = UnixStream::pair().expect("pair");
    let (status_tx, status_rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let me = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        let rt = runtime();
        rt.block_on(async move {
            let mut s = wrap(ours);
            for _ in 0..MESSAGES {
                s.write_all(&[7u8; SIZE]).await.expect("write");
            }
            status_tx
                .send(std::path::Path::new("/proc").join(me).join("status"))
                .expect("send");
            // Parked in epoll_wait until the peer's last byte.
            let mut end = [0u8; 1];
            s.read_exact(&mut end).await.expect("read the end");
        });
    });
    let status = status_rx.recv().expect("the server wrote");
    let switches = || {
        let text = std::fs::read_to_string(&status).expect("thread status");
        text.lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("voluntary_ctxt_switches")
    };
    // Let the thread reach its sleep.
    std::thread::sleep(Duration::from_millis(20));
    let before = switches();
    let mut message = [0u8; SIZE];
    for _ in 0..MESSAGES {
        peer.read_exact(&mut message).expect("peer read");
        // Time for a woken thread to go back to sleep, so wakes do not merge.
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = switches();
    peer.write_all(b"x").expect("the end");
    server.join().expect("server thread");
    after - before
}

/// The point of the type: the peer taking data off the socket does not
/// wake the thread that wrote it. Measured against tokio's own stream on
/// the same path, which shows the measurement sees such wakes.
#[test]
fn the_peer_reading_does_not_wake_the_writer() {
    let plain = wakeups_while_the_peer_reads(|s| {
        s.set_nonblocking(true).expect("non-blocking");
        tokio::net::UnixStream::from_std(s).expect("tokio stream")
    });
    let quiet = wakeups_while_the_peer_reads(|s| QuietUnixStream::new(s).expect("register"));
    assert!(
        plain >= 16,
        "tokio's stream was woken {plain} times for 32 peer reads: the measurement is blind"
    );
    assert!(
        quiet <= 2,
        "woken {quiet} times while the peer read 32 messages (tokio's stream: {plain})"
    );
}
