//! Snapshots on the local file system: `<root>/<id>/` (0700) holds the
//! VMM's files and `snapshot.json`, VMCP's description. A snapshot is
//! written in `<root>/.pending-<id>/` and made usable by renaming that
//! directory into place after its description is on disk (written to a
//! temporary name, fsynced, renamed, and the directories fsynced), so a
//! crash at any point leaves either no snapshot or a whole one; start-up
//! removes what is pending. The description is the durable record of a
//! snapshot: a usable directory without a readable one is removed too.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapters::outbound::disk_copy::{DiskCopy, copy_disk, data_extents, overlay};
use crate::adapters::outbound::store::sqlite::config_json;
use crate::domain::snapshot::{SnapshotId, SnapshotInfo, SnapshotKind};
use crate::domain::{VmConfig, VmId};
use crate::ports::snapshots::{MEMORY_FILE, disk_file};
use crate::ports::{DiffMerge, SnapshotRepo, SnapshotRepoError, SnapshotScan};

/// The description file in each snapshot directory.
pub const DESCRIPTION: &str = "snapshot.json";
const PENDING: &str = ".pending-";
/// The guest page size the VMM writes a diff in (x86-64 Linux hosts).
const PAGE_SIZE: u64 = 4096;
/// The directory of the clones' disk copies, one directory per VM.
pub const CLONES: &str = ".clones";

/// Snapshots under one directory.
#[derive(Debug, Clone)]
pub struct FsSnapshots {
    root: PathBuf,
}

/// `snapshot.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Description {
    snapshot_id: String,
    source_vm_id: String,
    backend: String,
    vmm_version: String,
    /// The VM's config, in the store's JSON encoding.
    config: String,
    created_at: i64,
    size_bytes: u64,
    kind: String,
    /// A diff's parent (absent for a full one, and in older descriptions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent_snapshot_id: Option<String>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotRepoError {
    let context = context.into();
    move |source| SnapshotRepoError::Io { context, source }
}

impl FsSnapshots {
    /// Snapshots under `root` (created 0700 when missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, SnapshotRepoError> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io(format!("cannot create {}", root.display())))?;
        Ok(Self { root })
    }

    fn pending(&self, id: &SnapshotId) -> PathBuf {
        self.root.join(format!("{PENDING}{id}"))
    }

    fn read(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotRepoError> {
        let path = dir.join(DESCRIPTION);
        let text =
            fs::read_to_string(&path).map_err(io(format!("cannot read {}", path.display())))?;
        let corrupt =
            |what: String| SnapshotRepoError::Corrupt(format!("{}: {what}", path.display()));
        let d: Description = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let config: VmConfig =
            config_json::decode(&d.config).map_err(|e| corrupt(format!("config: {e}")))?;
        Ok(SnapshotInfo {
            id: SnapshotId::parse("snapshot_id", &d.snapshot_id)
                .map_err(|e| corrupt(e.to_string()))?,
            source_vm_id: VmId::parse(&d.source_vm_id).map_err(|e| corrupt(e.to_string()))?,
            backend: d.backend,
            vmm_version: d.vmm_version,
            config,
            created_at: d.created_at,
            size_bytes: d.size_bytes,
            kind: SnapshotKind::from_name(&d.kind)
                .ok_or_else(|| corrupt(format!("unknown kind {:?}", d.kind)))?,
            parent: d
                .parent_snapshot_id
                .map(|p| SnapshotId::parse("parent_snapshot_id", &p))
                .transpose()
                .map_err(|e| corrupt(e.to_string()))?,
        })
    }
}

/// Bytes the files in `dir` take on disk (a sparse memory file counts
/// what it holds).
fn disk_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotRepoError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("cannot sync {}", dir.display())))
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl SnapshotRepo for FsSnapshots {
    fn prepare(&self, id: &SnapshotId) -> Result<PathBuf, SnapshotRepoError> {
        let dir = self.pending(id);
        // What an earlier attempt with this id left goes first.
        remove_tree(&dir).map_err(io(format!("cannot clear {}", dir.display())))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("cannot create {}", dir.display())))?;
        Ok(dir)
    }

    fn commit(&self, mut info: SnapshotInfo) -> Result<SnapshotInfo, SnapshotRepoError> {
        let pending = self.pending(&info.id);
        info.size_bytes =
            disk_bytes(&pending).map_err(io(format!("cannot measure {}", pending.display())))?;
        let d = Description {
            snapshot_id: info.id.to_string(),
            source_vm_id: info.source_vm_id.to_string(),
            backend: info.backend.clone(),
            vmm_version: info.vmm_version.clone(),
            config: config_json::encode(&info.config)
                .map_err(|e| SnapshotRepoError::Corrupt(e.to_string()))?,
            created_at: info.created_at,
            size_bytes: info.size_bytes,
            kind: info.kind.as_str().to_owned(),
            parent_snapshot_id: info.parent.as_ref().map(ToString::to_string),
        };
        let text =
            serde_json::to_vec_pretty(&d).map_err(|e| SnapshotRepoError::Corrupt(e.to_string()))?;
        let tmp = pending.join(format!("{DESCRIPTION}.tmp"));
        let written = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
            .and_then(|()| fs::rename(&tmp, pending.join(DESCRIPTION)));
        written.map_err(io(format!("cannot write {}", tmp.display())))?;
        // The VMM's files and the description are durable before the name is.
        for entry in
            fs::read_dir(&pending).map_err(io(format!("cannot list {}", pending.display())))?
        {
            let path = entry.map_err(io("cannot list a pending snapshot"))?.path();
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(format!("cannot sync {}", path.display())))?;
        }
        sync_dir(&pending)?;
        let target = self.path(&info.id);
        fs::rename(&pending, &target).map_err(io(format!(
            "cannot rename {} to {}",
            pending.display(),
            target.display()
        )))?;
        sync_dir(&self.root)?;
        Ok(info)
    }

    fn abort(&self, id: &SnapshotId) {
        let dir = self.pending(id);
        if let Err(e) = remove_tree(&dir) {
            tracing::warn!(snapshot.id = %id, error = %e, "cannot remove a failed snapshot; it is removed at the next start");
        }
    }

    fn path(&self, id: &SnapshotId) -> PathBuf {
        self.root.join(id.as_str())
    }

    fn delete(&self, id: &SnapshotId) -> Result<(), SnapshotRepoError> {
        let dir = self.path(id);
        // Unusable first (the description goes), then the files: a crash in
        // between leaves a directory the next start removes.
        match fs::remove_file(dir.join(DESCRIPTION)) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(io(format!("cannot delete {}", dir.display()))(e));
            }
            _ => {}
        }
        remove_tree(&dir).map_err(io(format!("cannot delete {}", dir.display())))?;
        sync_dir(&self.root)
    }

    fn scan(&self) -> Result<SnapshotScan, SnapshotRepoError> {
        let mut scan = SnapshotScan::default();
        let entries =
            fs::read_dir(&self.root).map_err(io(format!("cannot list {}", self.root.display())))?;
        for entry in entries {
            let entry = entry.map_err(io("cannot list the snapshot directory"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == CLONES {
                continue;
            }
            let path = entry.path();
            let usable = if name.starts_with(PENDING) {
                None
            } else {
                match self.read(&path) {
                    Ok(info) if info.id.as_str() == name => Some(info),
                    Ok(info) => {
                        tracing::warn!(dir = %path.display(), id = %info.id, "snapshot directory names another snapshot");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(dir = %path.display(), error = %e, "unusable snapshot directory");
                        None
                    }
                }
            };
            match usable {
                Some(info) => scan.usable.push(info),
                None => {
                    remove_tree(&path).map_err(io(format!("cannot remove {}", path.display())))?;
                    scan.removed.push(name);
                }
            }
        }
        scan.usable.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(scan)
    }

    fn keep_disks(
        &self,
        id: &SnapshotId,
        disks: &[(usize, PathBuf)],
    ) -> Result<usize, SnapshotRepoError> {
        let dir = self.pending(id);
        let mut full = 0;
        for (index, path) in disks {
            let to = dir.join(disk_file(*index));
            let how = copy_disk(path, &to).map_err(io(format!(
                "cannot copy disk {} into {}",
                path.display(),
                to.display()
            )))?;
            if how == DiskCopy::Full {
                full += 1;
            }
        }
        Ok(full)
    }

    fn has_disk(&self, id: &SnapshotId, index: usize) -> bool {
        self.path(id).join(disk_file(index)).is_file()
    }

    fn clone_disks(
        &self,
        id: &SnapshotId,
        vm: &VmId,
        indices: &[usize],
    ) -> Result<Vec<PathBuf>, SnapshotRepoError> {
        let dir = self.clone_dir(vm);
        remove_tree(&dir).map_err(io(format!("cannot clear {}", dir.display())))?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("cannot create {}", dir.display())))?;
        let mut paths = Vec::with_capacity(indices.len());
        for index in indices {
            let (from, to) = (
                self.path(id).join(disk_file(*index)),
                dir.join(disk_file(*index)),
            );
            match copy_disk(&from, &to) {
                Ok(how) => {
                    tracing::debug!(vm.id = %vm, disk = index, ?how, "disk copied for a clone");
                    paths.push(to);
                }
                Err(e) => {
                    let _ = remove_tree(&dir);
                    return Err(io(format!(
                        "cannot copy {} to {}",
                        from.display(),
                        to.display()
                    ))(e));
                }
            }
        }
        Ok(paths)
    }

    fn remove_clone_disks(&self, vm: &VmId) -> Result<(), SnapshotRepoError> {
        let dir = self.clone_dir(vm);
        remove_tree(&dir).map_err(io(format!("cannot remove {}", dir.display())))?;
        // The last clone takes the directory of clones with it (fails while others remain).
        let _ = fs::remove_dir(self.root.join(CLONES));
        Ok(())
    }

    fn clone_dirs(&self) -> Result<Vec<String>, SnapshotRepoError> {
        let root = self.root.join(CLONES);
        match fs::read_dir(&root) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io(format!("cannot list {}", root.display()))(e)),
            Ok(entries) => Ok(entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()),
        }
    }

    fn clone_dir(&self, vm: &VmId) -> PathBuf {
        self.root.join(CLONES).join(vm.as_str())
    }

    /// The whole memory is built next to the diff (`memory.whole`, in the
    /// pending directory, so a crash leaves nothing the next start keeps)
    /// and renamed over it once synced.
    fn complete_diff(
        &self,
        id: &SnapshotId,
        parent: &SnapshotId,
    ) -> Result<DiffMerge, SnapshotRepoError> {
        let dir = self.pending(id);
        let diff_path = dir.join(MEMORY_FILE);
        let base_path = self.path(parent).join(MEMORY_FILE);
        let whole_path = dir.join(format!("{MEMORY_FILE}.whole"));
        let diff = fs::File::open(&diff_path)
            .map_err(io(format!("cannot open {}", diff_path.display())))?;
        let (diff_meta, base_len) = (
            diff.metadata()
                .map_err(io(format!("cannot read {}", diff_path.display())))?,
            fs::metadata(&base_path)
                .map_err(io(format!("cannot read {}", base_path.display())))?
                .len(),
        );
        if diff_meta.len() != base_len {
            return Err(SnapshotRepoError::Corrupt(format!(
                "{} is {} bytes and its parent's memory {} is {base_len}: not the same guest memory",
                diff_path.display(),
                diff_meta.len(),
                base_path.display()
            )));
        }
        // Extents are whole file-system blocks: a block larger than a page
        // could hold unwritten pages, which would read as zeros over the parent's.
        let block = rustix::fs::fstatvfs(&diff)
            .map_err(|e| {
                io(format!(
                    "cannot stat the file system of {}",
                    diff_path.display()
                ))(e.into())
            })?
            .f_frsize;
        if block > PAGE_SIZE {
            return Err(SnapshotRepoError::Corrupt(format!(
                "{}: the file system allocates {block}-byte blocks, larger than a {PAGE_SIZE}-byte page, so the pages of a diff snapshot cannot be told apart here",
                diff_path.display()
            )));
        }
        let extents = data_extents(&diff).map_err(io(format!(
            "cannot find the data in {}",
            diff_path.display()
        )))?;
        let data: u64 = extents.iter().map(|(_, l)| l).sum();
        // A file system that does not report holes shows a sparse file as all
        // data: its unwritten pages would read as zeros over the parent's.
        let allocated = diff_meta.blocks() * 512;
        if data > allocated + diff_meta.blksize() {
            return Err(SnapshotRepoError::Corrupt(format!(
                "{}: the file system reports {data} bytes of data in a file that takes {allocated}: it does not report holes, so a diff snapshot cannot be completed here",
                diff_path.display()
            )));
        }
        let how = copy_disk(&base_path, &whole_path).map_err(io(format!(
            "cannot copy {} to {}",
            base_path.display(),
            whole_path.display()
        )))?;
        let written = fs::OpenOptions::new()
            .write(true)
            .open(&whole_path)
            .and_then(|whole| {
                let n = overlay(&diff, &whole, &extents)?;
                whole.sync_all()?;
                Ok(n)
            })
            .and_then(|n| fs::rename(&whole_path, &diff_path).map(|()| n));
        match written {
            Ok(changed_bytes) => Ok(DiffMerge {
                reflinked: how == DiskCopy::Reflink,
                changed_bytes,
            }),
            Err(e) => {
                let _ = fs::remove_file(&whole_path);
                Err(io(format!("cannot write {}", whole_path.display()))(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: SnapshotId::parse("snapshot_id", id).expect("valid"),
            source_vm_id: VmId::parse("vm1").expect("valid"),
            backend: "firecracker".into(),
            vmm_version: "v1.16.1".into(),
            config: VmConfig::default(),
            created_at: 7,
            size_bytes: 0,
            kind: SnapshotKind::Full,
            parent: None,
        }
    }

    #[test]
    fn a_committed_snapshot_lists_with_its_size_and_a_pending_one_never_does() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = FsSnapshots::open(tmp.path().join("snapshots")).expect("open");
        let a = info("a");
        let dir = repo.prepare(&a.id).expect("prepare");
        fs::write(dir.join("memory"), vec![1u8; 64 * 1024]).expect("write");
        fs::write(dir.join("vmstate"), b"state").expect("write");
        // A second one is still pending when VMCP "crashes".
        let b = info("b");
        fs::write(
            repo.prepare(&b.id).expect("prepare").join("memory"),
            b"half",
        )
        .expect("write");
        let committed = repo.commit(a.clone()).expect("commit");
        assert!(
            committed.size_bytes >= 64 * 1024,
            "{}",
            committed.size_bytes
        );
        assert_eq!(
            fs::metadata(repo.path(&a.id)).expect("dir").mode() & 0o777,
            0o700
        );

        let scan = FsSnapshots::open(tmp.path().join("snapshots"))
            .expect("reopen")
            .scan()
            .expect("scan");
        assert_eq!(scan.usable.len(), 1);
        assert_eq!(scan.usable[0], committed, "read back as written");
        assert_eq!(scan.removed, [".pending-b"]);
        assert!(!repo.pending(&b.id).exists(), "the half snapshot is gone");

        repo.delete(&a.id).expect("delete");
        assert!(!repo.path(&a.id).exists());
        assert!(repo.scan().expect("scan").usable.is_empty());
    }

    #[test]
    fn a_diff_is_made_whole_from_its_parent_and_a_mismatch_leaves_it_pending() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = FsSnapshots::open(tmp.path()).expect("open");
        let page = 4096usize;
        let parent = info("parent");
        let dir = repo.prepare(&parent.id).expect("prepare");
        fs::write(dir.join(MEMORY_FILE), vec![1u8; 16 * page]).expect("write");
        repo.commit(parent.clone()).expect("commit");

        let mut child = info("child");
        let dir = repo.prepare(&child.id).expect("prepare");
        let f = fs::File::create(dir.join(MEMORY_FILE)).expect("create");
        f.set_len(16 * page as u64).expect("size");
        f.write_all_at(&vec![2u8; page], 5 * page as u64)
            .expect("page");
        f.write_all_at(&vec![0u8; page], 9 * page as u64)
            .expect("a zeroed page");
        drop(f);
        let merge = repo.complete_diff(&child.id, &parent.id).expect("merge");
        assert_eq!(merge.changed_bytes, 2 * page as u64);
        let names: Vec<String> = fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [MEMORY_FILE], "only the whole memory is left");
        child.kind = SnapshotKind::Diff;
        child.parent = Some(parent.id.clone());
        let committed = repo.commit(child.clone()).expect("commit");
        assert!(
            committed.size_bytes >= 16 * page as u64,
            "allocated in full"
        );
        let whole = fs::read(repo.path(&child.id).join(MEMORY_FILE)).expect("read");
        for (i, chunk) in whole.chunks(page).enumerate() {
            let expected = match i {
                5 => 2,
                9 => 0,
                _ => 1,
            };
            assert!(chunk.iter().all(|b| *b == expected), "page {i}");
        }
        // Read back with its parent; deleting the parent leaves it whole.
        repo.delete(&parent.id).expect("delete the parent");
        let scan = repo.scan().expect("scan");
        assert_eq!(scan.usable, [committed]);
        assert_eq!(
            fs::read(repo.path(&child.id).join(MEMORY_FILE)).expect("read"),
            whole
        );

        // A diff of another memory size is no diff of this parent.
        let other = info("other");
        let dir = repo.prepare(&other.id).expect("prepare");
        fs::File::create(dir.join(MEMORY_FILE))
            .and_then(|f| f.set_len(8 * page as u64))
            .expect("create");
        let e = repo
            .complete_diff(&other.id, &child.id)
            .expect_err("sizes differ");
        assert!(matches!(e, SnapshotRepoError::Corrupt(_)), "{e}");
        assert_eq!(
            fs::metadata(dir.join(MEMORY_FILE)).expect("kept").len(),
            8 * page as u64,
            "the pending diff is untouched (the caller aborts it)"
        );
    }

    #[test]
    fn a_directory_without_a_readable_description_is_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = FsSnapshots::open(tmp.path()).expect("open");
        fs::create_dir(tmp.path().join("torn")).expect("mkdir");
        fs::write(tmp.path().join("torn").join("memory"), b"x").expect("write");
        fs::create_dir(tmp.path().join("bad")).expect("mkdir");
        fs::write(tmp.path().join("bad").join(DESCRIPTION), b"{not json").expect("write");
        let scan = repo.scan().expect("scan");
        assert!(scan.usable.is_empty());
        let mut removed = scan.removed;
        removed.sort();
        assert_eq!(removed, ["bad", "torn"]);
        assert!(!tmp.path().join("torn").exists());
        let a = info("a");
        repo.prepare(&a.id).expect("prepare");
        repo.abort(&a.id);
        assert!(!repo.pending(&a.id).exists());
    }
}
