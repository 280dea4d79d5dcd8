//! Process metrics read from /proc: CPU seconds, resident memory, open file
//! descriptors, start time and uptime. Parsing is kept apart from reading so it
//! can be tested on fixed text; readers return None rather than fail, because a
//! missing sample must never disturb the scrape or the service.

use std::path::Path;

/// Clock ticks per second of the times in /proc/PID/stat. The kernel exports
/// them in USER_HZ, which its ABI fixes at 100 on every architecture VMCP
/// runs on (x86_64, aarch64); reading it via sysconf would need unsafe code.
const USER_HZ: f64 = 100.0;

/// The fields of /proc/self/stat that the metrics need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Start time, seconds after boot.
    pub start_after_boot_seconds: f64,
}

/// Parses /proc/PID/stat. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the command: field 3 (state) is index 0, so field N is index N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field =
        |n: usize| -> Option<f64> { fields.get(n - 3)?.parse::<u64>().ok().map(|v| v as f64) };
    let utime = field(14)?;
    let stime = field(15)?;
    let start = field(22)?;
    Some(ProcStat {
        cpu_seconds: (utime + stime) / USER_HZ,
        start_after_boot_seconds: start / USER_HZ,
    })
}

/// Parses the `VmRSS:` line of /proc/PID/status into bytes.
pub fn parse_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        Some(_) => None,
        None => Some(value),
    }
}

/// Parses the `btime` line (boot time, Unix seconds) of /proc/stat.
pub fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads this process's CPU time and start offset.
pub fn read_stat() -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// Reads this process's resident memory in bytes.
pub fn read_rss_bytes() -> Option<u64> {
    parse_rss_bytes(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Counts this process's open file descriptors.
pub fn read_open_fds() -> Option<u64> {
    count_entries(Path::new("/proc/self/fd"))
}

fn count_entries(dir: &Path) -> Option<u64> {
    // The directory handle used for listing is itself one open descriptor;
    // it is counted, as every /proc-based exporter does.
    Some(std::fs::read_dir(dir).ok()?.filter(|e| e.is_ok()).count() as u64)
}

/// This process's start time as Unix seconds, from boot time and start offset.
pub fn read_start_time_unix() -> Option<f64> {
    let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    Some(boot as f64 + read_stat()?.start_after_boot_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (vmcp (api) x) S 1 4242 4242 0 -1 4194560 2020 0 0 0 250 130 0 0 20 0 9 0 123456 1000000 500 18446744073709551615";
        let s = parse_stat(line).expect("parse");
        assert!((s.cpu_seconds - 3.8).abs() < 1e-9, "{}", s.cpu_seconds);
        assert!((s.start_after_boot_seconds - 1234.56).abs() < 1e-9);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn rss_is_converted_from_kilobytes() {
        let status = "Name:\tvmcp\nVmPeak:\t  999 kB\nVmRSS:\t    2048 kB\nThreads:\t4\n";
        assert_eq!(parse_rss_bytes(status), Some(2048 * 1024));
        assert_eq!(parse_rss_bytes("Name: x\n"), None);
    }

    #[test]
    fn boot_time_is_read_from_btime() {
        assert_eq!(
            parse_boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_boot_time("cpu 1\n"), None);
    }

    #[test]
    fn entries_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        assert_eq!(count_entries(dir.path()), Some(3));
        assert_eq!(count_entries(&dir.path().join("missing")), None);
    }

    #[test]
    fn live_process_readings_are_plausible() {
        let stat = read_stat().expect("/proc/self/stat");
        assert!(stat.cpu_seconds >= 0.0);
        assert!(read_rss_bytes().expect("rss") > 1024 * 1024);
        assert!(
            read_open_fds().expect("fds") >= 3,
            "stdin, stdout, stderr at least"
        );
        let start = read_start_time_unix().expect("start");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(
            start <= now + 2.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
    }
}
