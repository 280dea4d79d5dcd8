//! File descriptors kept for VM work. Every client connection costs VMCP one
//! descriptor, and so does every VMM socket, log, console file and store
//! handle; without a budget, clients could take them all and leave VMCP
//! unable to start or talk to a VMM. At start-up the soft `RLIMIT_NOFILE` is
//! raised to the hard limit ([`raise_nofile_limit`]), a reserve is set aside
//! for VM work, and the connection cap is fitted below what is left
//! ([`DescriptorBudget::connection_cap`]). VM operations that open
//! descriptors are refused with `resource_exhausted` when fewer than
//! [`VM_OPERATION_DESCRIPTORS`] are free ([`DescriptorBudget::check_vm_work`]),
//! before anything is created.
//!
//! Counting what is open lists `/proc/self/fd`, which costs time in
//! proportion to the count (0.8 ms at 1,000 descriptors and 5.5 ms at
//! 3,000 here, on the path of every VM operation). So the check first asks
//! the kernel for the size of the descriptor table (`FDSize`, an upper
//! bound on what is open, read in constant time) and counts exactly only
//! when that bound leaves too few free. Reading `/proc/self/status` still
//! costs tens of microseconds (about 3% of VMCP's CPU per create+boot
//! here), so a reading is reused for [`UPPER_BOUND_REUSE`], taken as twice
//! what it was, as if the table had grown once since (it doubles when it
//! fills). Only a process that more than doubled its open descriptors
//! within that time could slip past, and neither client connections
//! (capped below the reserve) nor VM operations (a few descriptors each)
//! open that many that fast; near the limit every check reads afresh.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::domain::VmError;

/// Descriptors one VM operation may need at once (VMM API socket connections,
/// spawn pipes, log, console and pid files, the event monitor, store journal).
pub const VM_OPERATION_DESCRIPTORS: u64 = 32;

/// How long a reading of the descriptor table's size is reused by
/// [`DescriptorBudget::check_vm_work`] (as twice the reading).
pub const UPPER_BOUND_REUSE: Duration = Duration::from_millis(100);

/// The default reserve is a quarter of the limit, at most this many.
pub const DEFAULT_MAX_RESERVE: u64 = 4096;

/// The connection cap when `UNKEY_VMCP_MAX_CONNECTIONS` is unset (lowered to fit the budget).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Why the descriptor budget cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BudgetError(pub String);

/// Raises the soft descriptor limit to the hard limit (capped at the kernel's
/// `fs.nr_open` when the hard limit is unlimited). Returns the soft limit
/// before and after.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let now = getrlimit(Resource::Nofile);
    let before = now.current.unwrap_or(u64::MAX);
    let target = match now.maximum {
        Some(hard) => hard,
        None => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20),
    };
    if before >= target {
        return Ok((before, before));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: now.maximum,
        },
    )?;
    Ok((before, target))
}

/// The soft descriptor limit of this process.
pub fn nofile_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Descriptors this process has open (entries of `/proc/self/fd`, the listing's own included).
pub fn count_open() -> Option<u64> {
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .filter(|e| e.is_ok())
            .count() as u64,
    )
}

/// The size of this process's descriptor table (`FDSize` in
/// `/proc/self/status`): every open descriptor is below it, so it bounds the
/// count from above.
pub fn table_size() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))?
        .trim()
        .parse()
        .ok()
}

/// Counts open descriptors (or bounds them from above); `None` when they
/// cannot be counted.
pub type InUse = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// How the descriptor budget stands right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorUse {
    /// The soft `RLIMIT_NOFILE`.
    pub limit: u64,
    /// Open now.
    pub in_use: u64,
    /// `limit - in_use`.
    pub free: u64,
    /// Kept for VM work: client connections are capped below `limit - reserved`.
    pub reserved: u64,
}

impl DescriptorUse {
    /// Too few free for one more VM operation.
    pub fn tight(&self) -> bool {
        self.free < VM_OPERATION_DESCRIPTORS
    }
}

/// The descriptor limit, the reserve for VM work, and a way to count what is open.
#[derive(Clone)]
pub struct DescriptorBudget {
    limit: u64,
    reserved: u64,
    in_use: InUse,
    /// A cheap upper bound on `in_use`, tried first by [`Self::check_vm_work`].
    at_most: Option<UpperBound>,
}

/// A cheap upper bound on the descriptors in use, and its last reading.
#[derive(Clone)]
struct UpperBound {
    read: InUse,
    reuse_for: Duration,
    last: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl UpperBound {
    /// The bound now: twice the last reading while that is younger than
    /// `reuse_for` and still leaves a VM operation's descriptors under
    /// `limit`; otherwise a new reading.
    fn get(&self, limit: u64) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, reading)) = *last {
            let doubled = reading.saturating_mul(2);
            if now.duration_since(at) < self.reuse_for
                && limit.saturating_sub(doubled) >= VM_OPERATION_DESCRIPTORS
            {
                return Some(doubled);
            }
        }
        let reading = (self.read)()?;
        *last = Some((now, reading));
        Some(reading)
    }
}

impl std::fmt::Debug for DescriptorBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DescriptorBudget")
            .field("limit", &self.limit)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl DescriptorBudget {
    /// A budget over `limit` descriptors keeping `reserved` for VM work, counting with `in_use`.
    pub fn new(limit: u64, reserved: u64, in_use: InUse) -> Self {
        Self {
            limit,
            reserved,
            in_use,
            at_most: None,
        }
    }

    /// With `at_most`, a cheap upper bound on the descriptors in use: when it
    /// leaves enough free, [`Self::check_vm_work`] does not count them. A
    /// reading is reused for `reuse_for`, as twice what was read, while that
    /// still leaves enough free.
    pub fn with_upper_bound(mut self, at_most: InUse, reuse_for: Duration) -> Self {
        self.at_most = Some(UpperBound {
            read: at_most,
            reuse_for,
            last: Arc::new(Mutex::new(None)),
        });
        self
    }

    /// This process's budget: its soft limit, `reserved` (default a quarter of
    /// the limit, at most [`DEFAULT_MAX_RESERVE`]), counted from `/proc/self/fd`.
    pub fn of_this_process(reserved: Option<u64>) -> Self {
        let limit = nofile_limit();
        let reserved = reserved.unwrap_or((limit / 4).min(DEFAULT_MAX_RESERVE));
        Self::new(limit, reserved, Arc::new(count_open))
            .with_upper_bound(Arc::new(table_size), UPPER_BOUND_REUSE)
    }

    /// The reserve.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// The current use. When descriptors cannot be counted, none are reported in use.
    pub fn now(&self) -> DescriptorUse {
        let in_use = (self.in_use)().unwrap_or(0).min(self.limit);
        DescriptorUse {
            limit: self.limit,
            in_use,
            free: self.limit - in_use,
            reserved: self.reserved,
        }
    }

    /// The connection cap: `wanted` (or [`DEFAULT_MAX_CONNECTIONS`], lowered
    /// to fit) must leave the reserve free on top of what is open now.
    pub fn connection_cap(&self, wanted: Option<usize>) -> Result<usize, BudgetError> {
        let now = self.now();
        let room = now.free.saturating_sub(self.reserved);
        if room == 0 {
            return Err(BudgetError(format!(
                "UNKEY_VMCP_RESERVED_FDS={} leaves no descriptors for client connections: \
                 the limit is {} and {} are open; raise the hard RLIMIT_NOFILE (LimitNOFILE=) \
                 or lower UNKEY_VMCP_RESERVED_FDS",
                self.reserved, now.limit, now.in_use
            )));
        }
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        match wanted {
            None => Ok(DEFAULT_MAX_CONNECTIONS.min(room)),
            Some(n) if n <= room => Ok(n),
            Some(n) => Err(BudgetError(format!(
                "UNKEY_VMCP_MAX_CONNECTIONS={n} does not fit the descriptor budget: at most {room} \
                 (limit {}, {} open, {} reserved for VM work by UNKEY_VMCP_RESERVED_FDS)",
                now.limit, now.in_use, self.reserved
            ))),
        }
    }

    /// `Ok` when one more VM operation has the descriptors it may need.
    pub fn check_vm_work(&self) -> Result<(), VmError> {
        if let Some(at_most) = self.at_most.as_ref().and_then(|b| b.get(self.limit))
            && self.limit.saturating_sub(at_most) >= VM_OPERATION_DESCRIPTORS
        {
            return Ok(());
        }
        let now = self.now();
        if now.tight() {
            return Err(VmError::ResourceExhausted(format!(
                "too few file descriptors free for VM work: {} of {} free, {} needed; \
                 delete VMs, or raise RLIMIT_NOFILE or UNKEY_VMCP_RESERVED_FDS",
                now.free, now.limit, VM_OPERATION_DESCRIPTORS
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: u64, reserved: u64, open: u64) -> DescriptorBudget {
        DescriptorBudget::new(limit, reserved, Arc::new(move || Some(open)))
    }

    #[test]
    fn the_connection_cap_leaves_the_reserve_free() {
        let b = budget(1000, 200, 50);
        assert_eq!(b.connection_cap(None), Ok(750));
        assert_eq!(b.connection_cap(Some(100)), Ok(100));
        assert_eq!(b.connection_cap(Some(750)), Ok(750));
        let err = b.connection_cap(Some(751)).expect_err("over the room");
        assert!(err.0.contains("UNKEY_VMCP_MAX_CONNECTIONS=751"), "{err}");
        assert!(err.0.contains("at most 750"), "{err}");
        assert_eq!(
            budget(1 << 20, 4096, 10).connection_cap(None),
            Ok(DEFAULT_MAX_CONNECTIONS)
        );
    }

    #[test]
    fn a_reserve_that_leaves_nothing_is_refused_naming_the_variable() {
        let err = budget(300, 290, 10)
            .connection_cap(None)
            .expect_err("no room");
        assert!(err.0.starts_with("UNKEY_VMCP_RESERVED_FDS=290"), "{err}");
        assert!(!err.0.contains('\n'));
    }

    #[test]
    fn vm_work_is_refused_naming_descriptors_only_when_tight() {
        assert_eq!(
            budget(1000, 100, 1000 - VM_OPERATION_DESCRIPTORS).check_vm_work(),
            Ok(())
        );
        match budget(1000, 100, 1000 - VM_OPERATION_DESCRIPTORS + 1).check_vm_work() {
            Err(VmError::ResourceExhausted(m)) => {
                assert!(m.contains("file descriptors"), "{m}");
                assert!(m.contains("31 of 1000 free"), "{m}");
            }
            other => panic!("expected resource_exhausted, got {other:?}"),
        }
    }

    #[test]
    fn an_upper_bound_with_room_spares_the_count_and_a_tight_one_does_not() {
        let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let with = |open: u64, bound: u64| {
            let counted = Arc::clone(&counted);
            DescriptorBudget::new(
                1000,
                100,
                Arc::new(move || {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Some(open)
                }),
            )
            .with_upper_bound(Arc::new(move || Some(bound)), Duration::ZERO)
        };
        let counts = || counted.load(std::sync::atomic::Ordering::Relaxed);
        // The table has room: no count.
        assert_eq!(
            with(10, 1000 - VM_OPERATION_DESCRIPTORS).check_vm_work(),
            Ok(())
        );
        assert_eq!(counts(), 0, "a bound with room needs no count");
        // The table is as large as the limit, but few are open: the count admits.
        assert_eq!(with(10, 1000).check_vm_work(), Ok(()));
        assert_eq!(counts(), 1);
        // The table is full and so are the descriptors: the count refuses.
        assert!(matches!(
            with(990, 1024).check_vm_work(),
            Err(VmError::ResourceExhausted(_))
        ));
        assert_eq!(counts(), 2);
        // A bound that cannot be read falls back to the count.
        let unknown = DescriptorBudget::new(1000, 100, Arc::new(|| Some(990)))
            .with_upper_bound(Arc::new(|| None), Duration::ZERO);
        assert!(unknown.check_vm_work().is_err());
    }

    /// A reading is reused, as twice what was read, while it is fresh and
    /// twice it leaves room; a stale reading, or one whose double would not
    /// leave room, is read again.
    #[test]
    fn a_fresh_reading_of_the_bound_is_reused_doubled_while_that_leaves_room() {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        let reads = Arc::new(AtomicUsize::new(0));
        let table = Arc::new(AtomicU64::new(100));
        let counted = Arc::new(AtomicUsize::new(0));
        let budget = |limit: u64, reuse_for: Duration| {
            let (reads, table, counted) = (reads.clone(), table.clone(), counted.clone());
            DescriptorBudget::new(
                limit,
                100,
                Arc::new(move || {
                    counted.fetch_add(1, Ordering::Relaxed);
                    Some(limit - 1)
                }),
            )
            .with_upper_bound(
                Arc::new(move || {
                    reads.fetch_add(1, Ordering::Relaxed);
                    Some(table.load(Ordering::Relaxed))
                }),
                reuse_for,
            )
        };
        let reads_now = || reads.load(Ordering::Relaxed);
        // Fresh, and twice 100 leaves room under 1,000: one reading serves.
        let b = budget(1000, Duration::from_secs(3600));
        for _ in 0..5 {
            assert_eq!(b.check_vm_work(), Ok(()));
        }
        assert_eq!(reads_now(), 1, "one reading for five checks");
        assert_eq!(b.clone().check_vm_work(), Ok(()), "clones share it");
        assert_eq!(reads_now(), 1);
        // Twice 490 would leave 20 free, fewer than a VM operation needs:
        // each check reads the table again (490 leaves room, so none counts).
        table.store(490, Ordering::Relaxed);
        let b = budget(1000, Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(b.check_vm_work(), Ok(()));
        }
        assert_eq!(reads_now(), 4, "read again each time");
        // A reading that may not be reused is read every time.
        table.store(100, Ordering::Relaxed);
        let b = budget(1000, Duration::ZERO);
        for _ in 0..3 {
            assert_eq!(b.check_vm_work(), Ok(()));
        }
        assert_eq!(reads_now(), 7);
        // A new reading near the limit still falls back to the exact count,
        // which refuses (999 of 1,000 open).
        table.store(1000, Ordering::Relaxed);
        assert!(matches!(
            budget(1000, Duration::from_secs(3600)).check_vm_work(),
            Err(VmError::ResourceExhausted(_))
        ));
        assert_eq!(
            counted.load(Ordering::Relaxed),
            1,
            "only that one was counted"
        );
    }

    #[test]
    fn the_table_size_bounds_what_is_open() {
        let held: Vec<std::fs::File> = (0..300)
            .map(|_| std::fs::File::open("/dev/null").expect("open"))
            .collect();
        // Counted first: the table never shrinks, so its size read after
        // bounds the count even while other tests open descriptors.
        let open = count_open().expect("countable");
        let size = table_size().expect("FDSize is readable");
        assert!(open >= 300, "{open} open");
        assert!(size >= open, "FDSize {size} below {open} open");
        drop(held);
    }

    #[test]
    fn the_default_reserve_is_a_quarter_capped() {
        let b = DescriptorBudget::of_this_process(None);
        let limit = nofile_limit();
        assert_eq!(b.reserved(), (limit / 4).min(DEFAULT_MAX_RESERVE));
        assert_eq!(DescriptorBudget::of_this_process(Some(77)).reserved(), 77);
        let now = b.now();
        assert!(now.in_use >= 3, "stdin, stdout, stderr at least: {now:?}");
        assert_eq!(now.free + now.in_use, now.limit);
    }

    #[test]
    fn raising_the_limit_reaches_the_hard_limit() {
        let (before, after) = raise_nofile_limit().expect("raise");
        assert!(after >= before);
        let hard = getrlimit(Resource::Nofile).maximum;
        if let Some(hard) = hard {
            assert_eq!(nofile_limit(), hard);
        }
    }
}
