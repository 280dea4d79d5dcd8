//! What vmcpctl prints: aligned plain-text tables and key/value blocks for
//! people, or one pretty proto3 JSON document per call (the API's own
//! schema, so a script reads the same fields it would get from curl).
//! Every write goes through `io::Result`, so a closed pipe ends the command
//! quietly instead of panicking.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use buffa::EnumValue;
use serde::Serialize;
use vmcp::proto::vmm::v1 as pb;

use crate::cli::Output;
use crate::error::CtlError;

/// `RUNNING` for `VM_STATE_RUNNING`.
pub fn state_name(state: pb::VmState) -> &'static str {
    match state {
        pb::VmState::VM_STATE_UNSPECIFIED => "UNSPECIFIED",
        pb::VmState::VM_STATE_CREATED => "CREATED",
        pb::VmState::VM_STATE_RUNNING => "RUNNING",
        pb::VmState::VM_STATE_PAUSED => "PAUSED",
        pb::VmState::VM_STATE_SHUTDOWN => "SHUTDOWN",
        pb::VmState::VM_STATE_FAILED => "FAILED",
    }
}

/// A state as received: known by name, a newer server's state by number.
/// A reason on one table line: a VMM's last log lines (a crash reason) are
/// joined with spaces so the table's lines stay one per VM or event.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn state_text(state: &EnumValue<pb::VmState>) -> String {
    match state.as_known() {
        Some(s) => state_name(s).to_owned(),
        None => format!("UNKNOWN({})", state.to_i32()),
    }
}

/// `on-failure` for `RESTART_POLICY_ON_FAILURE`, as `create --restart-policy` takes it.
fn restart_policy_text(policy: &EnumValue<pb::RestartPolicy>) -> String {
    match policy.as_known() {
        Some(pb::RestartPolicy::RESTART_POLICY_UNSPECIFIED) => "host default".to_owned(),
        Some(pb::RestartPolicy::RESTART_POLICY_NEVER) => "never".to_owned(),
        Some(pb::RestartPolicy::RESTART_POLICY_ON_FAILURE) => "on-failure".to_owned(),
        Some(pb::RestartPolicy::RESTART_POLICY_ALWAYS) => "always".to_owned(),
        None => format!("UNKNOWN({})", policy.to_i32()),
    }
}

/// Prints to stdout in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    pub output: Output,
}

impl Printer {
    /// One JSON document, or the given lines of text.
    fn emit(&self, doc: &impl Serialize, text: impl FnOnce() -> String) -> Result<(), CtlError> {
        let mut out = std::io::stdout().lock();
        let written = match self.output {
            Output::Json => serde_json::to_writer_pretty(&mut out, doc)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out)),
            Output::Table => out.write_all(text().as_bytes()),
        };
        written.and_then(|()| out.flush()).map_err(CtlError::Output)
    }

    /// The answer of an operation on one VM: `web-1  RUNNING`.
    pub fn vm_state(
        &self,
        doc: &impl Serialize,
        vm_id: &str,
        state: &EnumValue<pb::VmState>,
    ) -> Result<(), CtlError> {
        self.emit(doc, || format!("{vm_id}\t{}\n", state_text(state)))
    }

    /// Any answer: its JSON, or `text` as a table.
    pub fn document(
        &self,
        doc: &impl Serialize,
        text: impl FnOnce() -> String,
    ) -> Result<(), CtlError> {
        self.emit(doc, text)
    }

    /// The answer of a delete.
    pub fn deleted(&self, doc: &pb::DeleteVmResponse, vm_id: &str) -> Result<(), CtlError> {
        self.emit(doc, || format!("{vm_id}\tDELETED\n"))
    }

    /// `info`: everything GetVmInfo says, as key/value lines.
    pub fn info(&self, info: &pb::GetVmInfoResponse) -> Result<(), CtlError> {
        self.emit(info, || info_text(info, now()))
    }

    /// `list`: one row per VM, then a hint when more pages follow.
    pub fn list(&self, list: &pb::ListVmsResponse) -> Result<(), CtlError> {
        self.emit(list, || list_text(list, now()))
    }

    /// Raw text (completions, man page), whatever the format.
    pub fn raw(bytes: &[u8]) -> Result<(), CtlError> {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(CtlError::Output)
    }
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn list_text(list: &pb::ListVmsResponse, now: i64) -> String {
    let mut rows = vec![
        [
            "ID", "STATE", "VCPUS", "MEMORY", "AGE", "METADATA", "REASON",
        ]
        .map(String::from),
    ];
    for vm in &list.vms {
        rows.push([
            vm.vm_id.clone(),
            state_text(&vm.state),
            vm.vcpu_count.to_string(),
            memory_text(vm.memory_size_bytes),
            age(now, vm.created_timestamp),
            sorted_pairs(&vm.metadata),
            one_line(&vm.state_reason),
        ]);
    }
    let mut text = table(&rows);
    if list.vms.is_empty() {
        text = "No VMs.\n".to_owned();
    }
    if !list.next_page_token.is_empty() {
        text.push_str(&format!(
            "{} of {} VMs; next page: --page-token {} (or --all)\n",
            list.vms.len(),
            list.total_count,
            list.next_page_token
        ));
    }
    text
}

fn info_text(info: &pb::GetVmInfoResponse, now: i64) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("ID", info.vm_id.clone()),
        ("State", state_text(&info.state)),
    ];
    if !info.state_reason.is_empty() {
        lines.push(("Reason", info.state_reason.clone()));
    }
    lines.push(("Generation", info.generation.to_string()));
    lines.push(("Created", timestamp(now, info.created_timestamp)));
    lines.push(("Modified", timestamp(now, info.modified_timestamp)));
    let config = &info.config;
    lines.push(("vCPUs", config.cpu.vcpu_count.to_string()));
    if config.cpu.max_vcpu_count > 0 {
        lines.push(("Max vCPUs", config.cpu.max_vcpu_count.to_string()));
    }
    lines.push(("Memory", memory_text(config.memory.size_bytes)));
    lines.push(("Kernel", config.boot.kernel_path.clone()));
    if !config.boot.initrd_path.is_empty() {
        lines.push(("Initrd", config.boot.initrd_path.clone()));
    }
    if !config.boot.kernel_args.is_empty() {
        lines.push(("Cmdline", config.boot.kernel_args.clone()));
    }
    for d in &config.storage {
        let mut flags = vec![if d.read_only { "ro" } else { "rw" }];
        if d.is_root_device {
            flags.push("root");
        }
        lines.push((
            "Disk",
            format!("{} {} ({})", d.id, d.path, flags.join(", ")),
        ));
    }
    for n in &config.network {
        let mac = if n.mac_address.is_empty() {
            "MAC chosen by the VMM"
        } else {
            &n.mac_address
        };
        lines.push(("Network", format!("{} {} {mac}", n.id, n.tap_device)));
    }
    if config.console.enabled {
        lines.push(("Console", "recorded (serial_output in Backend)".to_owned()));
    }
    if !config.metadata.is_empty() {
        lines.push(("Metadata", sorted_pairs(&config.metadata)));
    }
    lines.push((
        "Restart policy",
        restart_policy_text(&config.restart_policy),
    ));
    if info.metrics_sampled_timestamp_ms > 0 {
        let m = &info.metrics;
        lines.push((
            "Metrics",
            format!(
                "cpu {:.1}%, memory {}, uptime {}s (sampled {})",
                m.cpu_usage_percent,
                memory_text(m.memory_usage_bytes),
                m.uptime_seconds,
                age(now, info.metrics_sampled_timestamp_ms / 1000) + " ago"
            ),
        ));
        lines.push((
            "Network I/O",
            format!(
                "rx {} B / {} packets, tx {} B / {} packets",
                m.network_stats.bytes_received,
                m.network_stats.packets_received,
                m.network_stats.bytes_transmitted,
                m.network_stats.packets_transmitted
            ),
        ));
        lines.push((
            "Disk I/O",
            format!(
                "read {} B / {} ops, written {} B / {} ops",
                m.storage_stats.bytes_read,
                m.storage_stats.read_operations,
                m.storage_stats.bytes_written,
                m.storage_stats.write_operations
            ),
        ));
    }
    let mut backend: Vec<_> = info.backend_info.iter().collect();
    backend.sort();
    for (k, v) in backend {
        lines.push(("Backend", format!("{k}={v}")));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `k1=v1,k2=v2`, sorted by key.
fn sorted_pairs<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<_> = map.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(",")
}

/// `512 MiB`, `2 GiB`.
fn memory_text(bytes: i64) -> String {
    const MIB: i64 = 1 << 20;
    const GIB: i64 = 1 << 30;
    if bytes > 0 && bytes % GIB == 0 {
        format!("{} GiB", bytes / GIB)
    } else if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} B")
    }
}

/// How long ago a Unix time was: `45s`, `12m`, `3h`, `2d`.
pub(crate) fn age(now: i64, then: i64) -> String {
    if then <= 0 {
        return "-".to_owned();
    }
    let secs = now.saturating_sub(then).max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// `2026-05-01 12:00:00 UTC (3h ago)`.
fn timestamp(now: i64, secs: i64) -> String {
    if secs <= 0 {
        return "-".to_owned();
    }
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC ({} ago)",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        age(now, secs)
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ages() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(
            timestamp(1_704_067_200 + 7200, 1_704_067_200),
            "2024-01-01 00:00:00 UTC (2h ago)"
        );
        assert_eq!(age(100, 55), "45s");
        assert_eq!(age(10_000, 10_000 - 720), "12m");
        assert_eq!(age(1_000_000, 1_000_000 - 2 * 86400), "2d");
        assert_eq!(age(100, 0), "-");
    }

    #[test]
    fn memory_is_shown_in_whole_units() {
        assert_eq!(memory_text(512 << 20), "512 MiB");
        assert_eq!(memory_text(2 << 30), "2 GiB");
        assert_eq!(memory_text(1000), "1000 B");
    }

    #[test]
    fn list_columns_line_up() {
        let list = pb::ListVmsResponse {
            vms: vec![
                pb::VmInfo {
                    vm_id: "a".into(),
                    state: pb::VmState::VM_STATE_RUNNING.into(),
                    vcpu_count: 2,
                    memory_size_bytes: 1 << 30,
                    created_timestamp: 955,
                    ..Default::default()
                },
                pb::VmInfo {
                    vm_id: "long-name".into(),
                    state: EnumValue::Unknown(9),
                    vcpu_count: 1,
                    memory_size_bytes: 64 << 20,
                    metadata: [("team".to_owned(), "edge".to_owned())]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                },
            ],
            next_page_token: "tok".into(),
            total_count: 5,
            ..Default::default()
        };
        let text = list_text(&list, 1000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID         STATE       VCPUS  MEMORY  AGE  METADATA   REASON"
        );
        assert_eq!(lines[1], "a          RUNNING     2      1 GiB   45s");
        assert_eq!(
            lines[2],
            "long-name  UNKNOWN(9)  1      64 MiB  -    team=edge"
        );
        assert_eq!(
            lines[3],
            "2 of 5 VMs; next page: --page-token tok (or --all)"
        );
    }
}
