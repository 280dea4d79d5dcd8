//! Firecracker's metrics file, turned into cumulative counters. Firecracker
//! appends one JSON object per flush (on `FlushMetrics` and every 60 s after
//! boot), and its counters are *deltas since the previous flush*, so the
//! totals for a process are the sum over every line it wrote. The reader keeps
//! its file offset and running sums, reads only what was appended, and never
//! counts a half-written last line.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::ports::{NetworkStats, StorageStats};

/// Cumulative counters for one Firecracker process.
#[derive(Debug, Default, Clone)]
pub struct MetricsReader {
    offset: u64,
    partial: Vec<u8>,
    network: NetworkStats,
    storage: StorageStats,
    skipped_lines: u64,
}

impl MetricsReader {
    /// A reader for a new process (all counters zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads whatever was appended to `path` since the last call. A missing
    /// file means nothing was flushed yet.
    pub fn read_new(&mut self, path: &Path) -> std::io::Result<()> {
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        let n = f.read_to_end(&mut buf)?;
        self.offset += n as u64;
        self.feed(&buf);
        Ok(())
    }

    /// Adds the complete lines in `bytes` (continuing any partial line).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.add_line(&line[..end]);
        }
    }

    /// Network counters summed over all flushes.
    pub fn network(&self) -> NetworkStats {
        self.network
    }

    /// Block counters summed over all flushes.
    pub fn storage(&self) -> StorageStats {
        self.storage
    }

    /// Complete lines that were not a metrics object (a bug on one side).
    pub fn skipped_lines(&self) -> u64 {
        self.skipped_lines
    }

    fn add_line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            self.skipped_lines += 1;
            return;
        };
        let get = |group: &str, key: &str| -> i64 {
            v.get(group)
                .and_then(|g| g.get(key))
                .and_then(serde_json::Value::as_u64)
                .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX))
        };
        let n = &mut self.network;
        n.bytes_received = n
            .bytes_received
            .saturating_add(get("net", "rx_bytes_count"));
        n.bytes_transmitted = n
            .bytes_transmitted
            .saturating_add(get("net", "tx_bytes_count"));
        n.packets_received = n
            .packets_received
            .saturating_add(get("net", "rx_packets_count"));
        n.packets_transmitted = n
            .packets_transmitted
            .saturating_add(get("net", "tx_packets_count"));
        let s = &mut self.storage;
        s.bytes_read = s.bytes_read.saturating_add(get("block", "read_bytes"));
        s.bytes_written = s.bytes_written.saturating_add(get("block", "write_bytes"));
        s.read_operations = s.read_operations.saturating_add(get("block", "read_count"));
        s.write_operations = s
            .write_operations
            .saturating_add(get("block", "write_count"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(rx: u64, tx: u64, rd: u64, wr: u64) -> String {
        format!(
            "{}\n",
            serde_json::json!({
                "utc_timestamp_ms": 1,
                "net": {"rx_bytes_count": rx, "tx_bytes_count": tx, "rx_packets_count": 1, "tx_packets_count": 2},
                "net_eth0": {"rx_bytes_count": rx},
                "block": {"read_bytes": rd, "write_bytes": wr, "read_count": 3, "write_count": 4},
            })
        )
    }

    #[test]
    fn deltas_are_summed_across_flushes() {
        let mut r = MetricsReader::new();
        r.feed(line(100, 10, 4096, 512).as_bytes());
        r.feed(line(50, 5, 1024, 0).as_bytes());
        assert_eq!(
            r.network(),
            NetworkStats {
                bytes_received: 150,
                bytes_transmitted: 15,
                packets_received: 2,
                packets_transmitted: 4
            }
        );
        assert_eq!(
            r.storage(),
            StorageStats {
                bytes_read: 5120,
                bytes_written: 512,
                read_operations: 6,
                write_operations: 8
            }
        );
    }

    #[test]
    fn a_half_written_line_waits_for_its_end() {
        let mut r = MetricsReader::new();
        let l = line(7, 0, 0, 0);
        let (a, b) = l.split_at(l.len() / 2);
        r.feed(a.as_bytes());
        assert_eq!(r.network().bytes_received, 0);
        r.feed(b.as_bytes());
        assert_eq!(r.network().bytes_received, 7);
    }

    #[test]
    fn garbage_lines_are_counted_not_summed() {
        let mut r = MetricsReader::new();
        r.feed(b"not json\n\n");
        r.feed(line(1, 0, 0, 0).as_bytes());
        assert_eq!(r.skipped_lines(), 1);
        assert_eq!(r.network().bytes_received, 1);
    }

    #[test]
    fn read_new_reads_only_what_was_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("metrics.json");
        let mut r = MetricsReader::new();
        r.read_new(&p).expect("missing file is no error");
        std::fs::write(&p, line(10, 0, 0, 0)).expect("write");
        r.read_new(&p).expect("read");
        r.read_new(&p).expect("read again: nothing new");
        assert_eq!(r.network().bytes_received, 10);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        std::io::Write::write_all(&mut f, line(5, 0, 0, 0).as_bytes()).expect("append");
        r.read_new(&p).expect("read");
        assert_eq!(r.network().bytes_received, 15);
    }
}
