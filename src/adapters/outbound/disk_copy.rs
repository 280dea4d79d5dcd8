//! Copies of disk images for snapshots and clones: a reflink (`FICLONE`:
//! the copy shares the original's blocks until either is written, so it is
//! instant and takes no space) where the file system has them (XFS, Btrfs,
//! bcachefs), else a full copy (ext4, tmpfs): slower and as big as the
//! image, but a clone still gets a disk of its own. Which one was made is
//! answered, and logged by the callers.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCopy {
    /// Shares the original's blocks, copy-on-write.
    Reflink,
    /// Every byte copied.
    Full,
}

/// Copies `from` to the new file `to` (0600; it must not exist): a reflink
/// when the file system can, else a full copy. A failed copy leaves no `to`.
pub fn copy_disk(from: &Path, to: &Path) -> std::io::Result<DiskCopy> {
    let src = File::open(from)?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    // From here on `to` is ours: a failure removes it.
    let result = copy_into(&src, dst, from, to);
    if result.is_err() {
        let _ = fs::remove_file(to);
    }
    result
}

fn copy_into(src: &File, dst: File, from: &Path, to: &Path) -> std::io::Result<DiskCopy> {
    match rustix::fs::ioctl_ficlone(&dst, src) {
        Ok(()) => {
            dst.sync_all()?;
            return Ok(DiskCopy::Reflink);
        }
        // No reflinks here (EOPNOTSUPP, EINVAL), or across file systems (EXDEV).
        Err(e)
            if e == rustix::io::Errno::OPNOTSUPP
                || e == rustix::io::Errno::INVAL
                || e == rustix::io::Errno::XDEV
                || e == rustix::io::Errno::NOTTY => {}
        Err(e) => return Err(e.into()),
    }
    drop(dst);
    // `fs::copy` uses copy_file_range, which keeps holes on most file systems.
    fs::copy(from, to)?;
    File::open(to)?.sync_all()?;
    Ok(DiskCopy::Full)
}

/// The data extents of `file` (offset, length), found with `SEEK_DATA` /
/// `SEEK_HOLE`: where a sparse file was written. On a file system that
/// does not report holes the whole file is one extent.
pub fn data_extents(file: &File) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let len = file.metadata()?.len();
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(s) => s,
            // No data after `at`.
            Err(e) if e == rustix::io::Errno::NXIO => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, SeekFrom::Hole(start))?.min(len);
        if end > start {
            extents.push((start, end - start));
        }
        at = end;
    }
    Ok(extents)
}

/// Writes the data extents `extents` of `from` over `onto` at the same
/// offsets; answers the bytes written.
pub fn overlay(from: &File, onto: &File, extents: &[(u64, u64)]) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0;
    for &(start, len) in extents {
        let mut done = 0;
        while done < len {
            // At most CHUNK, so it fits in usize.
            let n = (len - done).min(CHUNK) as usize;
            from.read_exact_at(&mut buf[..n], start + done)?;
            onto.write_all_at(&buf[..n], start + done)?;
            done += n as u64;
        }
        written += len;
    }
    Ok(written)
}

/// Whether the file system holding `dir` makes reflinks (probed with two
/// scratch files that are removed again).
pub fn can_reflink(dir: &Path) -> bool {
    let a = dir.join(".reflink-probe-a");
    let b = dir.join(".reflink-probe-b");
    let made = fs::write(&a, b"probe").and_then(|()| copy_disk(&a, &b));
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    matches!(made, Ok(DiskCopy::Reflink))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn a_copy_is_its_own_file_with_the_same_bytes_and_never_overwrites() {
        let tmp = tempfile::tempdir().expect("dir");
        let (a, b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&a, &bytes).expect("write");
        let how = copy_disk(&a, &b).expect("copy");
        let expected = if can_reflink(tmp.path()) {
            DiskCopy::Reflink
        } else {
            DiskCopy::Full
        };
        assert_eq!(how, expected);
        assert_eq!(fs::read(&b).expect("read"), bytes);
        fs::write(&b, b"changed").expect("write the copy");
        assert_eq!(
            fs::read(&a).expect("read"),
            bytes,
            "the original is untouched"
        );
        let e = copy_disk(&a, &b).expect_err("the target exists");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).expect("read"), b"changed", "not overwritten");
        let e = copy_disk(&tmp.path().join("missing"), &tmp.path().join("c")).expect_err("missing");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(
            !tmp.path().join("c").exists(),
            "a failed copy leaves nothing"
        );
    }

    #[test]
    fn extents_are_where_a_sparse_file_was_written_and_overlay_copies_only_them() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().expect("dir");
        let page = 4096u64;
        let sparse = File::create(tmp.path().join("diff")).expect("create");
        sparse.set_len(64 * page).expect("size");
        sparse.write_all_at(&[1u8; 4096], 3 * page).expect("write");
        sparse.write_all_at(&[2u8; 8192], 10 * page).expect("write");
        sparse.write_all_at(&[3u8; 4096], 63 * page).expect("write");
        let extents = data_extents(&sparse).expect("extents");
        let holes_reported = extents.iter().map(|(_, l)| l).sum::<u64>() < 64 * page;
        if holes_reported {
            // Some file systems round extents to larger blocks; each written page is covered.
            for (off, len) in [(3 * page, page), (10 * page, 2 * page), (63 * page, page)] {
                assert!(
                    extents.iter().any(|&(s, l)| s <= off && off + len <= s + l),
                    "{off}+{len} in {extents:?}"
                );
            }
        }
        let base = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("base"))
            .expect("create");
        base.write_all_at(&vec![9u8; 64 * 4096], 0).expect("fill");
        let sparse = File::open(tmp.path().join("diff")).expect("open");
        let written = overlay(&sparse, &base, &extents).expect("overlay");
        assert_eq!(written, extents.iter().map(|(_, l)| l).sum::<u64>());
        let bytes = fs::read(tmp.path().join("base")).expect("read");
        assert_eq!(bytes.len(), 64 * 4096);
        let at = |p: u64| bytes[(p * page) as usize];
        assert_eq!((at(3), at(10), at(11), at(63)), (1, 2, 2, 3));
        if holes_reported {
            assert_eq!(
                (at(0), at(4), at(12), at(62)),
                (9, 9, 9, 9),
                "the rest is the base's"
            );
        }
    }
}
