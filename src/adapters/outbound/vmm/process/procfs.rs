//! What /proc says about a process: its identity (pid plus start time, field
//! 22 of /proc/PID/stat, so a recycled pid is never mistaken for a VMM),
//! whether it is alive, and its CPU and memory use.

use std::fs;
use std::io;
use std::time::Duration;

/// CPU and memory of a VMM process, from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcStats {
    /// CPU time used since the process started, percent of one core.
    pub cpu_percent: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Time since the process started.
    pub uptime: Duration,
}

/// The fields of /proc/PID/stat after the command name, so that index 0 is
/// field 3 (`state`).
fn stat_fields(pid: u32) -> io::Result<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may itself contain
    // spaces or parentheses; everything after the last ')' is space-separated.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

fn stat_field(fields: &[String], field: usize) -> io::Result<u64> {
    fields
        .get(field - 3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad stat field {field}"),
            )
        })
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn read_start_time(pid: u32) -> io::Result<u64> {
    stat_field(&stat_fields(pid)?, 22)
}

/// Whether `pid` is a live (not zombie) process that started at `start_time`.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    match stat_fields(pid) {
        Ok(fields) => {
            fields.first().is_some_and(|s| s != "Z" && s != "X")
                && stat_field(&fields, 22).is_ok_and(|t| t == start_time)
        }
        Err(_) => false,
    }
}

/// CPU (since start, percent of one core), RSS and uptime of `pid`, which
/// must still have start time `start_time`.
pub fn proc_stats(pid: u32, start_time: u64) -> io::Result<ProcStats> {
    let fields = stat_fields(pid)?;
    if stat_field(&fields, 22)? != start_time {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("pid {pid} is a different process now"),
        ));
    }
    let ticks = stat_field(&fields, 14)? + stat_field(&fields, 15)?;
    let rss_pages = stat_field(&fields, 24)?;
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    let uptime_text = fs::read_to_string("/proc/uptime")?;
    let system_uptime: f64 = uptime_text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/uptime"))?;
    let alive_secs = (system_uptime - start_time as f64 / hz).max(0.0);
    let cpu_secs = ticks as f64 / hz;
    let cpu_percent = if alive_secs > 0.0 {
        cpu_secs / alive_secs * 100.0
    } else {
        0.0
    };
    Ok(ProcStats {
        cpu_percent,
        rss_bytes: rss_pages * rustix::param::page_size() as u64,
        uptime: Duration::from_secs_f64(alive_secs),
    })
}
