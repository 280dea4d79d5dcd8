//! Log lines written in batches. One `write` per log line is a system call
//! on every RPC (its access-log line); batching makes it one per
//! [`BATCH_BYTES`] or [`FLUSH_EVERY`] under load.
//!
//! - Lines at INFO and below wait in memory until [`BATCH_BYTES`] are
//!   waiting (the line that crosses it writes the batch) or, at the latest,
//!   [`FLUSH_EVERY`] after the first of them (a flusher thread writes them).
//! - A WARN or ERROR line is written at once, together with every line
//!   before it, so problems never wait and the order is kept.
//! - [`FlushGuard`] writes what is left when logging ends (vmcp-api holds it
//!   until it returns). A `kill -9` loses at most the last
//!   [`FLUSH_EVERY`] of INFO lines.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The most a batch holds before the line that crosses it writes it.
pub const BATCH_BYTES: usize = 64 * 1024;
/// The longest an INFO line waits.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// A [`MakeWriter`] batching lines into `W` (normally stdout).
#[derive(Debug)]
pub struct BatchedWriter<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

impl<W: Write + Send + 'static> Clone for BatchedWriter<W> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug)]
struct Shared<W> {
    /// The destination; held while a batch is taken and written, so
    /// batches reach it in the order their lines were written.
    out: Mutex<W>,
    waiting: Mutex<Waiting>,
    /// Wakes the flusher when a batch starts.
    started: Condvar,
}

#[derive(Debug, Default)]
struct Waiting {
    lines: Vec<u8>,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves bytes, never a broken invariant.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<W: Write + Send + 'static> Shared<W> {
    /// Writes every waiting line to `out`.
    fn flush(&self) {
        let mut out = lock(&self.out);
        let lines = std::mem::take(&mut lock(&self.waiting).lines);
        if !lines.is_empty() {
            // Nowhere to report a failed log write; the next batch tries again.
            let _ = out.write_all(&lines);
            let _ = out.flush();
        }
    }

    /// The flusher: after a batch starts, waits [`FLUSH_EVERY`] and writes it.
    fn run_flusher(&self, every: Duration) {
        loop {
            {
                let mut waiting = lock(&self.waiting);
                while waiting.lines.is_empty() && !waiting.closed {
                    waiting = self
                        .started
                        .wait(waiting)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if waiting.closed {
                    return;
                }
            }
            std::thread::sleep(every);
            self.flush();
        }
    }
}

impl<W: Write + Send + 'static> BatchedWriter<W> {
    /// Batches lines into `out`, with a flusher thread writing a batch at the latest `every` after it started.
    pub fn new(out: W, every: Duration) -> std::io::Result<(Self, FlushGuard)> {
        let shared = Arc::new(Shared {
            out: Mutex::new(out),
            waiting: Mutex::new(Waiting::default()),
            started: Condvar::new(),
        });
        let flusher = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("vmcp-log-flush".into())
            .spawn(move || flusher.run_flusher(every))?;
        let stop = Arc::clone(&shared);
        let guard = FlushGuard {
            flush: Box::new(move || {
                lock(&stop.waiting).closed = true;
                stop.started.notify_all();
                stop.flush();
            }),
        };
        Ok((Self { shared }, guard))
    }
}

/// Writes the waiting lines and stops the flusher when dropped.
pub struct FlushGuard {
    flush: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for FlushGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushGuard").finish_non_exhaustive()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        (self.flush)();
    }
}

/// One line's writer: appends to the batch, writes it when urgent or full.
#[derive(Debug)]
pub struct LineWriter<'a, W: Write + Send + 'static> {
    shared: &'a Shared<W>,
    urgent: bool,
}

impl<W: Write + Send + 'static> Write for LineWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut waiting = lock(&self.shared.waiting);
            let started = waiting.lines.is_empty();
            waiting.lines.extend_from_slice(buf);
            let full = waiting.lines.len() >= BATCH_BYTES;
            if started && !full && !self.urgent {
                self.shared.started.notify_one();
            }
            full
        };
        if self.urgent || full {
            self.shared.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for BatchedWriter<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            // WARN and ERROR (tracing orders the more verbose levels higher).
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// What reached the destination, and how many writes it took.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut s = lock(&self.0);
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).0.clone()).expect("utf8")
        }
        fn writes(&self) -> usize {
            lock(&self.0).1
        }
    }

    fn line(w: &BatchedWriter<Sink>, level: Level, text: &str) {
        let mut lw = LineWriter {
            shared: &w.shared,
            urgent: level <= Level::WARN,
        };
        lw.write_all(text.as_bytes()).expect("write");
    }

    #[test]
    fn info_lines_wait_for_the_flusher_and_arrive_in_one_write() {
        let sink = Sink::default();
        let (w, _guard) = BatchedWriter::new(sink.clone(), Duration::from_millis(30)).unwrap();
        for i in 0..100 {
            line(&w, Level::INFO, &format!("line {i}\n"));
        }
        assert_eq!(sink.writes(), 0, "nothing is written at once");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.writes() == 0 {
            assert!(Instant::now() < deadline, "the flusher never wrote");
            std::thread::sleep(Duration::from_millis(5));
        }
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(sink.text(), expected);
        assert_eq!(sink.writes(), 1, "one batch, one write");
    }

    #[test]
    fn a_warning_writes_itself_and_everything_before_it_in_order() {
        let sink = Sink::default();
        let (w, _guard) = BatchedWriter::new(sink.clone(), Duration::from_secs(3600)).unwrap();
        line(&w, Level::INFO, "a\n");
        line(&w, Level::DEBUG, "b\n");
        line(&w, Level::WARN, "c\n");
        assert_eq!(sink.text(), "a\nb\nc\n");
        line(&w, Level::INFO, "d\n");
        line(&w, Level::ERROR, "e\n");
        assert_eq!(sink.text(), "a\nb\nc\nd\ne\n");
        assert_eq!(sink.writes(), 2);
    }

    #[test]
    fn a_full_batch_is_written_by_the_line_that_fills_it() {
        let sink = Sink::default();
        let (w, _guard) = BatchedWriter::new(sink.clone(), Duration::from_secs(3600)).unwrap();
        let big = "x".repeat(1023) + "\n";
        let n = BATCH_BYTES / big.len();
        for _ in 0..n - 1 {
            line(&w, Level::INFO, &big);
        }
        assert_eq!(sink.writes(), 0);
        line(&w, Level::INFO, &big);
        assert_eq!(sink.writes(), 1);
        assert_eq!(sink.text().len(), n * big.len());
    }

    #[test]
    fn dropping_the_guard_writes_what_waits() {
        let sink = Sink::default();
        let (w, guard) = BatchedWriter::new(sink.clone(), Duration::from_secs(3600)).unwrap();
        line(&w, Level::INFO, "last words\n");
        assert_eq!(sink.text(), "");
        drop(guard);
        assert_eq!(sink.text(), "last words\n");
    }

    #[test]
    fn lines_from_many_threads_all_arrive_whole() {
        let sink = Sink::default();
        let (w, guard) = BatchedWriter::new(sink.clone(), Duration::from_millis(1)).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let level = if i % 97 == 0 {
                            Level::WARN
                        } else {
                            Level::INFO
                        };
                        line(&w, level, &format!("{t}:{i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8000);
        for t in 0..4 {
            // Each thread's lines arrive in the order it wrote them.
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("{t}:")))
                .map(|i| i.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..2000).collect::<Vec<_>>());
        }
    }
}
