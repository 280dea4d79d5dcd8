//! A VM's console output file: reading it by offset, and capping it.
//!
//! Both VMMs write the guest's serial output to a file (Cloud Hypervisor's
//! `serial: File`, Firecracker's `serial_out_path`), without `O_APPEND`: each
//! writes at its own file offset. Truncating the file under such a writer
//! would make it write on past a hole at its old offset, so the cap drops old
//! output by *punching a hole* at the front of the file instead
//! (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): the blocks are freed, the writer's
//! offset and the offsets of every later byte stay as they were, and the
//! first byte kept is found again with `lseek(SEEK_DATA)` — no state outside
//! the file, so a restarted VMCP reads and caps the same way.
//!
//! A new VMM process starts the file over (Cloud Hypervisor creates it,
//! Firecracker's console is truncated before each start), and so does
//! Cloud Hypervisor's `vm.reboot`: offsets count bytes of the current
//! process's console, and a reader whose offset lies beyond the end learns
//! it from a `next_offset` below the one it asked for.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use rustix::fs::{FallocateFlags, SeekFrom};

use crate::ports::ConsoleChunk;

/// Holes are punched in whole blocks of this size, so that `SEEK_DATA`
/// finds exactly the first byte kept.
const BLOCK: u64 = 4096;

/// Reads at most `max_bytes` from `offset` (or from the first byte kept,
/// when the cap dropped the bytes at `offset`). A missing file reads as an
/// empty console.
pub fn read(path: &Path, offset: u64, max_bytes: usize) -> io::Result<ConsoleChunk> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(ConsoleChunk::default()),
        Err(e) => return Err(e),
    };
    let end = file.metadata()?.len();
    if offset >= end {
        // Nothing new, or the console started over (the end is below the offset).
        return Ok(ConsoleChunk {
            offset: end,
            data: Vec::new(),
            next_offset: end,
        });
    }
    let start = offset.max(first_kept(&file, end)?);
    let want = usize::try_from(end - start)
        .unwrap_or(usize::MAX)
        .min(max_bytes);
    let mut data = vec![0; want];
    let mut got = 0;
    while got < want {
        match file.read_at(&mut data[got..], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(got);
    Ok(ConsoleChunk {
        offset: start,
        next_offset: start + got as u64,
        data,
    })
}

/// The offset of the first byte the cap kept: the first data after any hole
/// punched at the front (`end` when all of it was dropped).
fn first_kept(file: &File, end: u64) -> io::Result<u64> {
    match rustix::fs::seek(file, SeekFrom::Data(0)) {
        Ok(at) => Ok(at.min(end)),
        // ENXIO: no data at or after 0, the whole file is a hole.
        Err(rustix::io::Errno::NXIO) => Ok(end),
        // A file system without SEEK_DATA: nothing was dropped from it.
        Err(rustix::io::Errno::INVAL) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Keeps the console's stored bytes under `max_bytes`: when it holds more,
/// drops old output from the front so that about half of the cap is kept.
/// Answers how many bytes were dropped (0 when under the cap).
/// `Unsupported` from a file system that cannot punch holes.
pub fn cap(path: &Path, max_bytes: u64) -> io::Result<u64> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let end = meta.len();
    let stored = meta.blocks() * 512;
    if stored <= max_bytes || end <= max_bytes {
        return Ok(0);
    }
    let first = first_kept(&file, end)?;
    let keep = max_bytes / 2;
    let cut = (end - keep) / BLOCK * BLOCK;
    if cut <= first {
        return Ok(0);
    }
    rustix::fs::fallocate(
        &file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        first,
        cut - first,
    )?;
    Ok(cut - first)
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, Write};

    use super::*;

    /// A file written like the VMMs write it: one descriptor, no O_APPEND.
    struct Writer(File);

    impl Writer {
        fn new(path: &Path) -> Self {
            Self(File::create(path).expect("create console"))
        }
        fn write(&mut self, data: &[u8]) {
            self.0.write_all(data).expect("write console");
        }
        fn position(&mut self) -> u64 {
            self.0.stream_position().expect("position")
        }
    }

    #[test]
    fn reads_by_offset_and_says_where_to_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        assert_eq!(
            read(&path, 0, 10).expect("missing file"),
            ConsoleChunk::default()
        );
        let mut w = Writer::new(&path);
        w.write(b"hello, console\n");
        let c = read(&path, 0, 5).expect("read");
        assert_eq!(
            (c.offset, c.data.as_slice(), c.next_offset),
            (0, &b"hello"[..], 5)
        );
        let c = read(&path, 5, 1024).expect("read");
        assert_eq!(c.data, b", console\n");
        assert_eq!(c.next_offset, 15);
        let c = read(&path, 15, 1024).expect("read at the end");
        assert!(c.data.is_empty());
        assert_eq!(c.next_offset, 15);
    }

    #[test]
    fn an_offset_past_the_end_shows_that_the_console_started_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        let mut w = Writer::new(&path);
        w.write(b"first boot\n");
        drop(w);
        // A new VMM process truncates the file and writes from 0.
        let mut w = Writer::new(&path);
        w.write(b"again\n");
        let c = read(&path, 11, 1024).expect("read");
        assert!(c.data.is_empty());
        assert_eq!(c.next_offset, 6, "below the offset asked for: start over");
        assert_eq!(read(&path, 0, 1024).expect("read").data, b"again\n");
    }

    #[test]
    fn the_cap_drops_old_output_and_later_offsets_stay_put() {
        cap_keeps_offsets(
            "the_cap_drops_old_output_and_later_offsets_stay_put",
            tempfile::tempdir().expect("tempdir"),
        );
    }

    /// /run, where runtime directories live in production, is a tmpfs.
    #[test]
    fn the_cap_works_on_tmpfs_too() {
        match tempfile::tempdir_in("/dev/shm") {
            Ok(dir) => cap_keeps_offsets("the_cap_works_on_tmpfs_too", dir),
            Err(e) => {
                crate::test_skips::skip("the_cap_works_on_tmpfs_too", &format!("no /dev/shm: {e}"))
            }
        }
    }

    fn cap_keeps_offsets(test: &str, dir: tempfile::TempDir) {
        let path = dir.path().join("serial.log");
        let mut w = Writer::new(&path);
        let line = |i: u32| format!("line {i:06}\n").into_bytes();
        for i in 0..20_000 {
            w.write(&line(i));
        }
        let end = w.position();
        let dropped = match cap(&path, 64 * 1024) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                crate::test_skips::skip(test, &format!("this file system cannot punch holes: {e}"));
                return;
            }
            Err(e) => panic!("cap: {e}"),
        };
        assert!(dropped > 0, "over the cap: something is dropped");
        let stored = std::fs::metadata(&path).expect("stat").blocks() * 512;
        assert!(stored <= 64 * 1024, "stored {stored} bytes after the cap");
        // The writer goes on at its own offset; no byte moved.
        w.write(b"after the cap\n");
        let c = read(&path, 0, usize::MAX).expect("read from 0");
        assert_eq!(
            c.offset, dropped,
            "reading from 0 starts at the first byte kept"
        );
        assert_eq!(c.next_offset, end + 14);
        let mut written: Vec<u8> = (0..20_000).flat_map(line).collect();
        written.extend_from_slice(b"after the cap\n");
        let kept = usize::try_from(c.offset).expect("fits");
        assert_eq!(c.data, written[kept..], "every kept byte at its own offset");
        // A reader that had an offset inside the kept part reads on from it.
        let c2 = read(&path, end - 12, 12).expect("read");
        assert_eq!(c2.data, line(19_999));
        // Under the cap nothing more is dropped.
        assert_eq!(cap(&path, 64 * 1024).expect("cap again"), 0);
    }

    #[test]
    fn a_console_under_the_cap_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        Writer::new(&path).write(b"short\n");
        assert_eq!(cap(&path, 1024).expect("cap"), 0);
        assert_eq!(read(&path, 0, 100).expect("read").data, b"short\n");
        assert_eq!(cap(&dir.path().join("none"), 1).expect("missing"), 0);
    }
}
