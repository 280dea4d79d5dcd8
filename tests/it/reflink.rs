//! Reflinks for real. Snapshots and clones copy writable disks with
//! `FICLONE` where the file system can (XFS, Btrfs) and fall back to a full
//! copy elsewhere; the fallback runs in every test on ext4 or tmpfs, this
//! file runs the reflink itself. The test makes an XFS image with reflinks,
//! loop-mounts it in its own temporary directory and unmounts and removes it
//! afterwards. It needs `mkfs.xfs` (Debian's xfsprogs; `.ci/run` installs it)
//! and the right to mount (root, a loop device); without them it passes
//! after one SKIPPED line naming what is missing.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmcp::adapters::outbound::disk_copy::{DiskCopy, can_reflink, copy_disk};

use super::skips::skip;

/// An XFS file system (reflinks on) loop-mounted at `path`; unmounted and
/// removed on drop.
struct Xfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Xfs {
    /// Makes and mounts one, or says what is missing.
    fn mount() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("no temp dir: {e}"))?;
        let image = dir.path().join("xfs.img");
        // XFS's smallest file system is 300 MiB; the image is sparse.
        File::create(&image)
            .and_then(|f| f.set_len(320 << 20))
            .map_err(|e| format!("cannot make the image file: {e}"))?;
        run("mkfs.xfs", &["-q", "-m", "reflink=1"], &image)?;
        let path = dir.path().join("mnt");
        fs::create_dir(&path).map_err(|e| format!("cannot make the mount point: {e}"))?;
        let mount = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !mount.status.success() {
            return Err(format!(
                "cannot loop-mount an XFS image (root and a loop device needed): {}",
                String::from_utf8_lossy(&mount.stderr).trim()
            ));
        }
        Ok(Self { path, _dir: dir })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (a file still open after a failed assertion): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn run(program: &str, args: &[&str], path: &Path) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| format!("missing {program} (Debian: xfsprogs): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Bytes in use on the file system holding `path`.
fn used_bytes(path: &Path) -> u64 {
    let s = rustix::fs::statvfs(path).expect("statvfs");
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

fn sync(path: &Path) {
    File::open(path).and_then(|f| f.sync_all()).expect("sync");
}

#[test]
fn a_disk_copy_on_xfs_is_a_reflink_that_shares_blocks_until_written() {
    let xfs = match Xfs::mount() {
        Ok(x) => x,
        Err(what) => {
            skip(
                "a_disk_copy_on_xfs_is_a_reflink_that_shares_blocks_until_written",
                &what,
            );
            return;
        }
    };
    let dir = &xfs.path;
    assert!(can_reflink(dir), "the probe finds reflinks on XFS");

    const SIZE: usize = 32 << 20;
    let original = dir.join("disk.img");
    let bytes: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    fs::write(&original, &bytes).expect("write the disk");
    sync(&original);
    sync(dir);
    let before = used_bytes(dir);

    let copy = dir.join("clone.img");
    assert_eq!(
        copy_disk(&original, &copy).expect("copy"),
        DiskCopy::Reflink
    );
    sync(dir);
    let grew = used_bytes(dir).saturating_sub(before);
    assert!(
        grew < 1 << 20,
        "a reflink of {SIZE} bytes used {grew} bytes of new space"
    );
    assert!(
        fs::read(&copy).expect("read the copy") == bytes,
        "same bytes"
    );

    // Copy-on-write both ways: a write to either leaves the other as it was.
    let write_at = |path: &Path, data: &[u8], at: u64| {
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(data, at).expect("write");
        f.sync_all().expect("sync");
    };
    write_at(&copy, b"the clone wrote here", 4096);
    write_at(&original, b"the source wrote here", 8 << 20);
    let (now_original, now_copy) = (fs::read(&original).unwrap(), fs::read(&copy).unwrap());
    assert!(now_original[4096..4096 + 20] == bytes[4096..4096 + 20]);
    assert!(&now_copy[4096..4096 + 20] == b"the clone wrote here");
    assert!(now_copy[8 << 20..(8 << 20) + 21] == bytes[8 << 20..(8 << 20) + 21]);
    assert!(&now_original[8 << 20..(8 << 20) + 21] == b"the source wrote here");

    // Across file systems there is no reflink: a full copy, the same bytes.
    let elsewhere = tempfile::tempdir().expect("dir");
    let across = elsewhere.path().join("across.img");
    assert_eq!(copy_disk(&original, &across).expect("copy"), DiskCopy::Full);
    assert!(fs::read(&across).unwrap() == now_original);
}
