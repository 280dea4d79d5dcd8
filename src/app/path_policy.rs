//! Host-path policy: VMCP opens host files on its callers' behalf (kernel,
//! initrd, disks, console output), so with `UNKEY_VMCP_ASSET_DIRS` set every
//! such path must resolve, after `canonicalize` has followed every symlink
//! and `..`, inside one of the allowed directories, and must be the right kind
//! of file: kernels and initrds regular files, disks regular files or block
//! devices, console output a regular file or a new file in an allowed
//! directory. Anything else is `permission_denied` naming the field. The check
//! runs at create time; the directories are assumed writable only by trusted
//! operators (a writer could swap a file after the check).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use crate::domain::{VmConfig, VmConfigError, VmError};

/// Why the allowed directories cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PathPolicyError {
    /// An allowed directory cannot be resolved.
    #[error("asset directory {path} cannot be used: {source}")]
    Resolve {
        /// The directory as configured.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An allowed path is not a directory.
    #[error("asset directory {path} is not a directory")]
    NotADirectory {
        /// The directory as configured.
        path: PathBuf,
    },
}

/// The kinds of file a field accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A regular file (kernel, initrd).
    Regular,
    /// A regular file or a block device (disks).
    Disk,
    /// A regular file, or a file that does not exist yet in an allowed directory.
    Output,
}

/// Which host paths callers may name.
#[derive(Debug, Clone, Default)]
pub struct PathPolicy {
    /// Canonical allowed directories; `None` means unrestricted.
    allowed: Option<Vec<PathBuf>>,
}

impl PathPolicy {
    /// Any path is accepted (the seed's behaviour; VMCP warns at start-up).
    pub fn unrestricted() -> Self {
        Self { allowed: None }
    }

    /// Only paths inside `dirs` (each resolved now, so it must exist and be a directory).
    pub fn new(dirs: &[PathBuf]) -> Result<Self, PathPolicyError> {
        let mut allowed = Vec::with_capacity(dirs.len());
        for d in dirs {
            let canonical =
                std::fs::canonicalize(d).map_err(|source| PathPolicyError::Resolve {
                    path: d.clone(),
                    source,
                })?;
            if !canonical.is_dir() {
                return Err(PathPolicyError::NotADirectory { path: d.clone() });
            }
            allowed.push(canonical);
        }
        Ok(Self {
            allowed: Some(allowed),
        })
    }

    /// Whether paths are restricted at all.
    pub fn is_restricted(&self) -> bool {
        self.allowed.is_some()
    }

    /// The canonical allowed directories (empty when unrestricted).
    pub fn allowed_dirs(&self) -> &[PathBuf] {
        self.allowed.as_deref().unwrap_or_default()
    }

    /// Checks every host path in `config`; the first violation names its field.
    pub fn check(&self, config: &VmConfig) -> Result<(), VmError> {
        let Some(allowed) = &self.allowed else {
            return Ok(());
        };
        check_path(
            allowed,
            "config.boot.kernel_path",
            &config.boot.kernel_path,
            Kind::Regular,
        )?;
        if !config.boot.initrd_path.is_empty() {
            check_path(
                allowed,
                "config.boot.initrd_path",
                &config.boot.initrd_path,
                Kind::Regular,
            )?;
        }
        for (i, d) in config.storage.iter().enumerate() {
            check_path(
                allowed,
                &format!("config.storage[{i}].path"),
                &d.path,
                Kind::Disk,
            )?;
        }
        if !config.console.output.is_empty() {
            check_path(
                allowed,
                "config.console.output",
                &config.console.output,
                Kind::Output,
            )?;
        }
        Ok(())
    }
}

fn denied(field: &str, reason: impl std::fmt::Display) -> VmError {
    VmError::PermissionDenied(format!("{field}: {reason}"))
}

fn inside(allowed: &[PathBuf], p: &Path) -> bool {
    // Path::starts_with compares whole components, so /assets2 is not inside /assets.
    allowed.iter().any(|dir| p.starts_with(dir))
}

/// `p` with `.` and `..` resolved textually (no filesystem access).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn outside(field: &str) -> VmError {
    denied(field, "is outside the allowed asset directories")
}

fn check_path(allowed: &[PathBuf], field: &str, raw: &str, kind: Kind) -> Result<(), VmError> {
    let p = Path::new(raw);
    if !p.is_absolute() {
        // Validation rejects these first; the policy never resolves against VMCP's cwd.
        return Err(VmError::InvalidArgument(VmConfigError::new(
            field,
            format!("must be an absolute path, got {raw:?}"),
        )));
    }
    match std::fs::canonicalize(p) {
        Ok(real) => {
            if !inside(allowed, &real) {
                return Err(outside(field));
            }
            let meta = std::fs::metadata(&real).map_err(|e| unresolvable(field, &e))?;
            let ft = meta.file_type();
            let ok = match kind {
                Kind::Regular | Kind::Output => ft.is_file(),
                Kind::Disk => ft.is_file() || ft.is_block_device(),
            };
            if ok {
                Ok(())
            } else {
                Err(denied(
                    field,
                    match kind {
                        Kind::Regular | Kind::Output => "must be a regular file",
                        Kind::Disk => "must be a regular file or a block device",
                    },
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if kind == Kind::Output {
                return check_new_file(allowed, field, p);
            }
            // Say "missing" only for paths that name a place inside the allowed
            // directories, so the answer is no oracle for files elsewhere.
            if inside(allowed, &lexical(p)) {
                Err(VmError::InvalidArgument(VmConfigError::new(
                    field,
                    "does not exist",
                )))
            } else {
                Err(outside(field))
            }
        }
        Err(e) => Err(if inside(allowed, &lexical(p)) {
            unresolvable(field, &e)
        } else {
            outside(field)
        }),
    }
}

fn unresolvable(field: &str, e: &io::Error) -> VmError {
    denied(field, format_args!("cannot be resolved ({})", e.kind()))
}

/// A console output file that does not exist yet: its directory must resolve
/// inside the allowed directories and its name must be a plain file name.
fn check_new_file(allowed: &[PathBuf], field: &str, p: &Path) -> Result<(), VmError> {
    let (Some(parent), Some(Component::Normal(_))) = (p.parent(), p.components().next_back())
    else {
        return Err(outside(field));
    };
    match std::fs::canonicalize(parent) {
        Ok(dir) if inside(allowed, &dir) && dir.is_dir() => Ok(()),
        Ok(_) => Err(outside(field)),
        Err(e) if inside(allowed, &lexical(parent)) => {
            if e.kind() == io::ErrorKind::NotFound {
                Err(VmError::InvalidArgument(VmConfigError::new(
                    field,
                    "its directory does not exist",
                )))
            } else {
                Err(unresolvable(field, &e))
            }
        }
        Err(_) => Err(outside(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StorageDevice;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _root: tempfile::TempDir,
        assets: PathBuf,
        secret: PathBuf,
        policy: PathPolicy,
    }

    /// `<tmp>/assets/{vmlinux,initrd,disk.img,sub/}` allowed; `<tmp>/secret` outside.
    fn fixture() -> Fixture {
        let root = tempfile::tempdir().expect("tempdir");
        let assets = root.path().join("assets");
        std::fs::create_dir_all(assets.join("sub")).expect("mkdir");
        for f in ["vmlinux", "initrd", "disk.img"] {
            std::fs::write(assets.join(f), b"x").expect("write");
        }
        let secret = root.path().join("secret");
        std::fs::write(&secret, b"root:x:0:0").expect("write");
        let policy = PathPolicy::new(std::slice::from_ref(&assets)).expect("policy");
        Fixture {
            _root: root,
            assets,
            secret,
            policy,
        }
    }

    fn config(kernel: &Path) -> VmConfig {
        let mut c = crate::domain::config::tests::valid();
        c.boot.kernel_path = kernel.to_string_lossy().into_owned();
        c
    }

    fn field_and_code(r: Result<(), VmError>) -> (String, &'static str) {
        match r.expect_err("rejected") {
            VmError::PermissionDenied(m) => (m, "permission_denied"),
            VmError::InvalidArgument(e) => (e.field, "invalid_argument"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn files_inside_are_accepted() {
        let f = fixture();
        let mut c = config(&f.assets.join("vmlinux"));
        c.boot.initrd_path = f.assets.join("initrd").to_string_lossy().into();
        c.storage = vec![StorageDevice {
            id: "root".into(),
            path: f.assets.join("sub/../disk.img").to_string_lossy().into(),
            ..Default::default()
        }];
        c.console.enabled = true;
        c.console.output = f
            .assets
            .join("sub/new-console.log")
            .to_string_lossy()
            .into();
        assert_eq!(f.policy.check(&c), Ok(()));
        assert!(f.policy.is_restricted());
    }

    #[test]
    fn unrestricted_accepts_anything() {
        let p = PathPolicy::unrestricted();
        assert!(!p.is_restricted());
        assert_eq!(p.check(&config(Path::new("/etc/shadow"))), Ok(()));
    }

    #[test]
    fn traversal_out_of_the_directory_is_denied() {
        let f = fixture();
        let escape = f.assets.join("../secret");
        let (m, code) = field_and_code(f.policy.check(&config(&escape)));
        assert_eq!(code, "permission_denied");
        assert!(m.starts_with("config.boot.kernel_path:"), "{m}");
        assert!(m.contains("outside"), "{m}");
        let (m, _) = field_and_code(f.policy.check(&config(Path::new("/etc/passwd"))));
        assert!(m.starts_with("config.boot.kernel_path"), "{m}");
        // A sibling whose name merely starts with the allowed one is outside.
        let sibling = f.assets.with_file_name("assets2");
        std::fs::create_dir(&sibling).expect("mkdir");
        std::fs::write(sibling.join("k"), b"x").expect("write");
        let (m, _) = field_and_code(f.policy.check(&config(&sibling.join("k"))));
        assert!(m.contains("outside"), "{m}");
    }

    #[test]
    fn symlink_escapes_are_denied_for_every_field() {
        let f = fixture();
        let link = f.assets.join("innocent");
        symlink(&f.secret, &link).expect("symlink");
        let dir_link = f.assets.join("up");
        symlink(f.assets.parent().expect("parent"), &dir_link).expect("symlink");

        let (m, code) = field_and_code(f.policy.check(&config(&link)));
        assert_eq!(code, "permission_denied");
        assert!(m.starts_with("config.boot.kernel_path"), "{m}");

        let mut c = config(&f.assets.join("vmlinux"));
        c.boot.initrd_path = dir_link.join("secret").to_string_lossy().into();
        let (m, _) = field_and_code(f.policy.check(&c));
        assert!(m.starts_with("config.boot.initrd_path"), "{m}");

        let mut c = config(&f.assets.join("vmlinux"));
        c.storage = vec![
            StorageDevice {
                id: "ok".into(),
                path: f.assets.join("disk.img").to_string_lossy().into(),
                ..Default::default()
            },
            StorageDevice {
                id: "bad".into(),
                path: link.to_string_lossy().into(),
                ..Default::default()
            },
        ];
        let (m, _) = field_and_code(f.policy.check(&c));
        assert!(m.starts_with("config.storage[1].path"), "{m}");

        // Console output: an existing symlink out, and a new file under a linked directory.
        for out in [link.clone(), dir_link.join("new.log")] {
            let mut c = config(&f.assets.join("vmlinux"));
            c.console.enabled = true;
            c.console.output = out.to_string_lossy().into();
            let (m, code) = field_and_code(f.policy.check(&c));
            assert_eq!(code, "permission_denied", "{out:?}");
            assert!(m.starts_with("config.console.output"), "{m}");
        }
    }

    #[test]
    fn symlinks_that_stay_inside_are_fine() {
        let f = fixture();
        let link = f.assets.join("sub/current-kernel");
        symlink(f.assets.join("vmlinux"), &link).expect("symlink");
        assert_eq!(f.policy.check(&config(&link)), Ok(()));
    }

    #[test]
    fn device_files_and_directories_are_denied() {
        let f = fixture();
        // /dev allowed on purpose, so only the file-kind rule can refuse /dev/null.
        let policy = PathPolicy::new(&[f.assets.clone(), PathBuf::from("/dev")]).expect("policy");
        let (m, code) = field_and_code(policy.check(&config(Path::new("/dev/null"))));
        assert_eq!(code, "permission_denied");
        assert!(
            m.contains("config.boot.kernel_path: must be a regular file"),
            "{m}"
        );

        let mut c = config(&f.assets.join("vmlinux"));
        c.storage = vec![StorageDevice {
            id: "d".into(),
            path: "/dev/null".into(),
            ..Default::default()
        }];
        let (m, _) = field_and_code(policy.check(&c));
        assert!(
            m.contains("config.storage[0].path: must be a regular file or a block device"),
            "{m}"
        );

        c.storage[0].path = f.assets.join("sub").to_string_lossy().into();
        let (m, _) = field_and_code(policy.check(&c));
        assert!(m.starts_with("config.storage[0].path"), "{m}");

        let mut c = config(&f.assets.join("vmlinux"));
        c.console.enabled = true;
        c.console.output = "/dev/null".into();
        let (m, _) = field_and_code(policy.check(&c));
        assert!(
            m.contains("config.console.output: must be a regular file"),
            "{m}"
        );
        // A directory as the console output is refused, and so is a name ending in `..`.
        for out in [f.assets.join("sub"), f.assets.join("sub/..")] {
            c.console.output = out.to_string_lossy().into();
            let (m, _) = field_and_code(policy.check(&c));
            assert!(m.starts_with("config.console.output"), "{m}");
        }
    }

    #[test]
    fn relative_paths_are_refused_without_resolving_them() {
        let f = fixture();
        let (field, code) = field_and_code(f.policy.check(&config(Path::new("vmlinux"))));
        assert_eq!(code, "invalid_argument");
        assert_eq!(field, "config.boot.kernel_path");
        let mut c = config(&f.assets.join("vmlinux"));
        c.boot.initrd_path = "../initrd".into();
        let (field, _) = field_and_code(f.policy.check(&c));
        assert_eq!(field, "config.boot.initrd_path");
    }

    #[test]
    fn missing_files_inside_are_invalid_outside_are_denied() {
        let f = fixture();
        let (field, code) = field_and_code(f.policy.check(&config(&f.assets.join("nope"))));
        assert_eq!(
            (field.as_str(), code),
            ("config.boot.kernel_path", "invalid_argument")
        );
        // No existence oracle outside the allowed directories.
        let (m, code) = field_and_code(f.policy.check(&config(Path::new("/nonexistent/x"))));
        assert_eq!(code, "permission_denied");
        assert!(m.contains("outside"), "{m}");
        let (m, code) = field_and_code(f.policy.check(&config(&f.assets.join("../nope"))));
        assert_eq!(code, "permission_denied", "{m}");
        let mut c = config(&f.assets.join("vmlinux"));
        c.console.enabled = true;
        c.console.output = f.assets.join("nodir/console.log").to_string_lossy().into();
        let (field, code) = field_and_code(f.policy.check(&c));
        assert_eq!(
            (field.as_str(), code),
            ("config.console.output", "invalid_argument")
        );
    }

    #[test]
    fn allowed_directories_must_exist_and_be_directories() {
        let f = fixture();
        assert!(matches!(
            PathPolicy::new(&[f.assets.join("missing")]),
            Err(PathPolicyError::Resolve { .. })
        ));
        assert!(matches!(
            PathPolicy::new(&[f.assets.join("vmlinux")]),
            Err(PathPolicyError::NotADirectory { .. })
        ));
        // Allowed directories are kept in canonical form.
        let link = f.assets.join("sub/alias");
        symlink(&f.assets, &link).expect("symlink");
        let p = PathPolicy::new(&[link]).expect("policy");
        assert_eq!(
            p.allowed_dirs(),
            std::slice::from_ref(&f.assets.canonicalize().expect("canonical"))
        );
    }
}
