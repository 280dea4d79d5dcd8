//! Jailer mode: Firecracker started by `jailer`, which chroots it into
//! `<chroot_base>/<exec file name>/<instance id>/root`, drops to a uid/gid and
//! then execs it in place (same pid, so supervision is unchanged). Everything
//! Firecracker opens must therefore live inside that root: this module builds
//! the jailer's argument list, computes the layout, rewrites the pre-boot paths
//! to in-jail paths and places the VM's files there (hard links; read-only
//! files are copied when a link is impossible, writable drives never are, since
//! a copy would silently lose the guest's writes).
//!
//! The files keep their owner and mode: the jailer's uid/gid must be able to
//! read the kernel, initrd and drives, and write the writable drives.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use super::config::{PreBoot, RuntimeFiles};

/// API socket path inside the jail (short, so the host path stays under the
/// 108-byte `sun_path` limit; VMCP connects through a symlink anyway).
pub const JAIL_SOCKET: &str = "/api.sock";
/// The console file inside the jail (the runtime directory links to it).
pub const JAIL_CONSOLE: &str = "/serial.log";
/// Firecracker's metrics file inside the jail.
pub const JAIL_METRICS: &str = "/metrics.json";

/// How to run Firecracker under the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerSettings {
    /// The `jailer` binary.
    pub jailer_binary: PathBuf,
    /// uid Firecracker runs as.
    pub uid: u32,
    /// gid Firecracker runs as.
    pub gid: u32,
    /// Base directory under which the jailer builds each chroot.
    pub chroot_base: PathBuf,
}

/// Where one VM's jail lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// `<chroot_base>/<exec name>/<id>`: removed as a whole on cleanup.
    pub instance_dir: PathBuf,
    /// `<instance_dir>/root`: what Firecracker sees as `/`.
    pub root: PathBuf,
}

/// A host file to place at a path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The caller's file.
    pub from: PathBuf,
    /// Its host path inside the jail root.
    pub to: PathBuf,
    /// Whether the guest may write it (then it must be a hard link).
    pub writable: bool,
}

impl Jail {
    /// The layout the jailer will build for `exec_file` (already canonical,
    /// as the jailer canonicalizes it) under a canonical `chroot_base`.
    pub fn layout(chroot_base: &Path, exec_file: &Path, instance_id: &str) -> Option<Self> {
        let name = exec_file.file_name()?;
        let instance_dir = chroot_base.join(name).join(instance_id);
        let root = instance_dir.join("root");
        Some(Self { instance_dir, root })
    }

    /// The host path of `inside` (an absolute path as Firecracker sees it).
    pub fn host_path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// The runtime files as Firecracker sees them inside the jail.
    pub fn runtime_files() -> RuntimeFiles {
        RuntimeFiles {
            metrics_path: JAIL_METRICS.into(),
            console_path: JAIL_CONSOLE.into(),
            // The chroot has no /dev/null; the output stays in the jail.
            discard_path: JAIL_CONSOLE.into(),
        }
    }

    /// Rewrites kernel, initrd and drive paths in `pre` to in-jail paths
    /// (`/kernel`, `/initrd`, `/drive_<drive id>`) and lists what to place.
    pub fn stage(&self, pre: &mut PreBoot) -> Vec<Staged> {
        let mut staged = Vec::new();
        let mut relocate = |path: &mut String, inside: String, writable: bool| {
            staged.push(Staged {
                from: PathBuf::from(&*path),
                to: self.host_path(&inside),
                writable,
            });
            *path = inside;
        };
        relocate(
            &mut pre.boot_source.kernel_image_path,
            "/kernel".into(),
            false,
        );
        if let Some(initrd) = pre.boot_source.initrd_path.as_mut() {
            relocate(initrd, "/initrd".into(), false);
        }
        for d in &mut pre.drives {
            let inside = format!("/drive_{}", d.drive_id);
            relocate(&mut d.path_on_host, inside, !d.is_read_only);
        }
        staged
    }
}

/// The jailer's command line: its own flags, then `--` and Firecracker's.
/// The jailer passes `--id` to Firecracker itself, so `fc_args` must not.
pub fn jailer_args(
    settings: &JailerSettings,
    exec_file: &Path,
    instance_id: &str,
    fc_args: &[OsString],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--id".into(),
        instance_id.into(),
        "--exec-file".into(),
        exec_file.into(),
        "--uid".into(),
        settings.uid.to_string().into(),
        "--gid".into(),
        settings.gid.to_string().into(),
        "--chroot-base-dir".into(),
        settings.chroot_base.clone().into(),
        "--".into(),
    ];
    args.extend(fc_args.iter().cloned());
    args
}

/// Places staged files: a hard link when possible; otherwise a copy for
/// read-only files and an error for writable ones.
pub fn place(staged: &[Staged]) -> io::Result<()> {
    for s in staged {
        if let Some(parent) = s.to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::hard_link(&s.from, &s.to) {
            Ok(()) => {}
            Err(e) if s.writable => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot hard-link writable drive {} into the jail ({e}); a copy would lose the guest's writes: put it on the chroot base's filesystem",
                        s.from.display()
                    ),
                ));
            }
            Err(_) => {
                std::fs::copy(&s.from, &s.to).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot place {} into the jail: {e}", s.from.display()),
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// Whether the ELF executable at `path` needs a dynamic loader (has a
/// `PT_INTERP` program header). The jailer copies only the binary into the
/// chroot, so a dynamically linked Firecracker cannot start there ("Failed to
/// exec into Firecracker: No such file or directory"): jailer mode needs a
/// static (musl) build.
pub fn needs_loader(path: &Path) -> io::Result<bool> {
    let bytes = std::fs::read(path)?;
    elf_has_interp(&bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a 64-bit little-endian ELF file", path.display()),
        )
    })
}

/// `Some(true)` if the 64-bit little-endian ELF image has a `PT_INTERP`
/// segment, `None` if it is not such an image.
fn elf_has_interp(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::outbound::firecracker::config;
    use crate::domain::StorageDevice;

    fn settings() -> JailerSettings {
        JailerSettings {
            jailer_binary: "/opt/vmm/jailer".into(),
            uid: 123,
            gid: 456,
            chroot_base: "/srv/jail".into(),
        }
    }

    #[test]
    fn args_put_jailer_flags_before_the_separator() {
        let fc = [OsString::from("--api-sock"), OsString::from(JAIL_SOCKET)];
        let args = jailer_args(&settings(), Path::new("/opt/vmm/firecracker"), "vm-1", &fc);
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect();
        assert_eq!(
            args,
            [
                "--id",
                "vm-1",
                "--exec-file",
                "/opt/vmm/firecracker",
                "--uid",
                "123",
                "--gid",
                "456",
                "--chroot-base-dir",
                "/srv/jail",
                "--",
                "--api-sock",
                "/api.sock"
            ]
        );
    }

    #[test]
    fn layout_follows_the_jailer() {
        let j = Jail::layout(
            Path::new("/srv/jail"),
            Path::new("/opt/vmm/firecracker"),
            "vm-1",
        )
        .expect("has a file name");
        assert_eq!(j.instance_dir, Path::new("/srv/jail/firecracker/vm-1"));
        assert_eq!(j.root, Path::new("/srv/jail/firecracker/vm-1/root"));
        assert_eq!(
            j.host_path(JAIL_SOCKET),
            Path::new("/srv/jail/firecracker/vm-1/root/api.sock")
        );
        assert_eq!(Jail::layout(Path::new("/srv"), Path::new("/"), "x"), None);
    }

    #[test]
    fn stage_rewrites_paths_into_the_jail() {
        let mut c = crate::domain::config::tests::valid();
        c.boot.initrd_path = "/images/initrd".into();
        c.storage = vec![
            StorageDevice {
                id: "root-fs".into(),
                path: "/images/root.img".into(),
                is_root_device: true,
                read_only: true,
                ..Default::default()
            },
            StorageDevice {
                id: "data".into(),
                path: "/images/data.img".into(),
                ..Default::default()
            },
        ];
        let mut pre = config::map(&c, &Jail::runtime_files()).expect("maps");
        let j = Jail::layout(
            Path::new("/srv/jail"),
            Path::new("/opt/firecracker"),
            "vm-1",
        )
        .expect("layout");
        let staged = j.stage(&mut pre);
        assert_eq!(pre.boot_source.kernel_image_path, "/kernel");
        assert_eq!(pre.boot_source.initrd_path.as_deref(), Some("/initrd"));
        assert_eq!(pre.drives[0].path_on_host, "/drive_root_fs");
        assert_eq!(pre.drives[1].path_on_host, "/drive_data");
        assert_eq!(pre.metrics.metrics_path, JAIL_METRICS, "in-jail paths");
        assert_eq!(pre.serial.serial_out_path, JAIL_CONSOLE);
        let root = Path::new("/srv/jail/firecracker/vm-1/root");
        assert_eq!(
            staged,
            [
                Staged {
                    from: "/var/lib/vmcp/vmlinux".into(),
                    to: root.join("kernel"),
                    writable: false
                },
                Staged {
                    from: "/images/initrd".into(),
                    to: root.join("initrd"),
                    writable: false
                },
                Staged {
                    from: "/images/root.img".into(),
                    to: root.join("drive_root_fs"),
                    writable: false
                },
                Staged {
                    from: "/images/data.img".into(),
                    to: root.join("drive_data"),
                    writable: true
                },
            ]
        );
    }

    /// A minimal ELF64 header with program headers of the given types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&u16::try_from(types.len()).expect("few").to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn a_loader_is_found_in_the_program_headers() {
        assert_eq!(elf_has_interp(&elf(&[6, 3, 1])), Some(true));
        assert_eq!(elf_has_interp(&elf(&[1, 1, 4])), Some(false));
        assert_eq!(elf_has_interp(b"#!/bin/sh\n"), None);
        let mut truncated = elf(&[1, 3]);
        truncated.truncate(100);
        assert_eq!(elf_has_interp(&truncated), None);
    }

    #[test]
    fn place_links_files_so_writes_reach_the_original() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("disk.img");
        std::fs::write(&src, b"before").expect("write");
        let to = dir.path().join("jail/root/drive_data");
        place(&[Staged {
            from: src.clone(),
            to: to.clone(),
            writable: true,
        }])
        .expect("placed");
        std::fs::write(&to, b"after").expect("write through the link");
        assert_eq!(std::fs::read(&src).expect("read"), b"after");
        let missing = place(&[Staged {
            from: dir.path().join("absent"),
            to: dir.path().join("jail/root/kernel"),
            writable: false,
        }]);
        assert!(missing.is_err());
    }
}
