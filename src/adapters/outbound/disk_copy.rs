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
}
