//! The value parsers the declarations name: each turns a variable's text into
//! a setting, or says in a few words what it accepts (the error line adds the
//! variable and the value). Strict: surrounding blanks are the only slack.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::adapters::outbound::vmm::process::MAX_SOCKET_PATH_LEN;
use crate::domain::restart::RestartPolicy;
use crate::ports::BackendKind;

/// A parser turns a value's text into a setting, or says what it accepts.
pub type Parsed<T> = Result<T, String>;

fn number(v: &str, min: u64, max: u64) -> Parsed<u64> {
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("a whole number from {min} to {max}")),
    }
}

/// A whole number from `MIN` to `MAX`, as a `T` that holds that range.
pub fn int<T: TryFrom<u64>, const MIN: u64, const MAX: u64>(v: &str) -> Parsed<T> {
    number(v, MIN, MAX)
        .and_then(|n| T::try_from(n).map_err(|_| format!("a whole number from {MIN} to {MAX}")))
}

/// A whole number of seconds from `MIN` to `MAX`.
pub fn seconds<const MIN: u64, const MAX: u64>(v: &str) -> Parsed<Duration> {
    number(v, MIN, MAX).map(Duration::from_secs)
}

/// A whole number of milliseconds from `MIN` to `MAX`.
pub fn millis<const MIN: u64, const MAX: u64>(v: &str) -> Parsed<Duration> {
    number(v, MIN, MAX).map(Duration::from_millis)
}

/// A list of absolute directories separated by commas or colons.
pub fn dir_list(v: &str) -> Parsed<Vec<PathBuf>> {
    let dirs: Vec<&str> = v.split([',', ':']).map(str::trim).collect();
    if dirs.iter().any(|d| !d.starts_with('/') || d.contains('\0')) {
        return Err("absolute directories separated by commas or colons, e.g. /var/lib/vmcp/images,/srv/kernels".to_owned());
    }
    Ok(dirs.into_iter().map(PathBuf::from).collect())
}

/// 0 (no cap), or at least 64 KiB: the cap keeps half of it, in whole 4 KiB blocks.
pub fn console_cap(v: &str) -> Parsed<u64> {
    match v.trim().parse::<u64>() {
        Ok(n) if n == 0 || (64 << 10..=1 << 40).contains(&n) => Ok(n),
        _ => Err("0 (keep all) or a number of bytes from 65536 to 1099511627776".to_owned()),
    }
}

/// A ratio in [0, 1].
pub fn ratio(v: &str) -> Parsed<f64> {
    match v.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("a number from 0.0 to 1.0".to_owned()),
    }
}

/// true/false, 1/0, yes/no or on/off, in any case.
pub fn boolean(v: &str) -> Parsed<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("true or false (also 1/0, yes/no, on/off)".to_owned()),
    }
}

/// Any text but blanks, trimmed.
/// A Linux interface name (a bridge's), as `config.network[i].bridge` accepts it.
pub fn bridge(v: &str) -> Parsed<String> {
    let ok = !v.is_empty()
        && v.len() <= crate::domain::config::MAX_TAP_NAME_LEN
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err("a Linux interface name: 1 to 15 of [A-Za-z0-9._-]".to_owned())
    }
}

pub fn non_empty(v: &str) -> Parsed<String> {
    match v.trim() {
        "" => Err("a non-empty string".to_owned()),
        s => Ok(s.to_owned()),
    }
}

/// An IPv4 or IPv6 address.
pub fn address(v: &str) -> Parsed<IpAddr> {
    v.trim()
        .parse()
        .map_err(|_| "an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::".to_owned())
}

/// `cloudhypervisor` or `firecracker`.
pub fn backend(v: &str) -> Parsed<BackendKind> {
    match v {
        "cloudhypervisor" => Ok(BackendKind::CloudHypervisor),
        "firecracker" => Ok(BackendKind::Firecracker),
        _ => Err("one of: cloudhypervisor, firecracker".to_owned()),
    }
}

/// `remove` (true) or `report` (false).
pub fn orphans(v: &str) -> Parsed<bool> {
    match v.trim() {
        "remove" => Ok(true),
        "report" => Ok(false),
        _ => Err("remove or report".to_owned()),
    }
}

/// `never`, `on-failure` or `always`.
pub fn restart_policy(v: &str) -> Parsed<RestartPolicy> {
    match v.trim() {
        "never" => Ok(RestartPolicy::Never),
        "on-failure" => Ok(RestartPolicy::OnFailure),
        "always" => Ok(RestartPolicy::Always),
        _ => Err("one of: never, on-failure, always".to_owned()),
    }
}

/// A path or a command name looked up on PATH.
pub fn path(v: &str) -> Parsed<PathBuf> {
    if v.trim().is_empty() || v.contains('\0') {
        return Err("a non-empty path or command name".to_owned());
    }
    Ok(PathBuf::from(v))
}

/// An absolute path.
pub fn abs_path(v: &str) -> Parsed<PathBuf> {
    if !v.starts_with('/') || v.contains('\0') {
        return Err("an absolute path".to_owned());
    }
    Ok(PathBuf::from(v))
}

/// An absolute path short enough for a Unix socket (sun_path holds 107 bytes and a NUL).
pub fn socket_path(v: &str) -> Parsed<PathBuf> {
    if v.len() > MAX_SOCKET_PATH_LEN {
        return Err(format!(
            "an absolute path of at most {MAX_SOCKET_PATH_LEN} bytes"
        ));
    }
    abs_path(v)
}

/// `unix:///absolute/path`.
pub fn unix_endpoint(v: &str) -> Parsed<PathBuf> {
    match v.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') && !p.contains('\0') => Ok(PathBuf::from(p)),
        _ => Err("unix:///absolute/path/to/api.sock".to_owned()),
    }
}
