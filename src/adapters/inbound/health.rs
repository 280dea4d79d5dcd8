//! Health endpoints: `GET /health` (liveness, always `{"status":"ok"}`) and
//! `GET /_/health` (readiness with backend, system, descriptor, connection and
//! check details; 503 unless healthy). Both are served without credentials and never cached.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::ports::{BackendHealth, HealthCheck, ServiceHealth};

/// Overall status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything works.
    Healthy,
    /// VMs can be served but something is off (recovery running, telemetry failing).
    Degraded,
    /// The backend cannot be used.
    Unhealthy,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// Decides the overall status from the backend and service state.
pub fn overall(backend: &BackendHealth, service: &ServiceHealth) -> Status {
    if !backend.healthy {
        Status::Unhealthy
    } else if service.recovering
        || !matches!(service.telemetry.as_str(), "ok" | "disabled")
        || service.descriptors.is_some_and(|d| d.tight())
    {
        Status::Degraded
    } else {
        Status::Healthy
    }
}

/// Builds the `/_/health` document and its HTTP status.
pub async fn detailed(check: &dyn HealthCheck) -> (http::StatusCode, serde_json::Value) {
    let backend = check.backend().await;
    let service = check.service();
    let status = overall(&backend, &service);
    let code = if status == Status::Healthy {
        http::StatusCode::OK
    } else {
        http::StatusCode::SERVICE_UNAVAILABLE
    };
    let sys = system();
    let backend_status = if backend.healthy {
        "healthy"
    } else {
        "unhealthy"
    };
    let body = json!({
        "status": status.as_str(),
        "timestamp": rfc3339_now(),
        "version": env!("CARGO_PKG_VERSION"),
        "backend": {
            "type": backend.kind,
            "status": backend_status,
            "version": backend.version,
            "error": backend.error,
        },
        "system": sys,
        "recovery": if service.recovering { "running" } else { "done" },
        "vms": service
            .vm_counts
            .iter()
            .map(|(s, n)| (s.as_str(), n))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "telemetry": service.telemetry,
        "descriptors": service.descriptors.map(|d| json!({
            "status": if d.tight() { "tight" } else { "ok" },
            "limit": d.limit,
            "in_use": d.in_use,
            "free": d.free,
            "reserved_for_vms": d.reserved_for_vms,
            "vm_operation_needs": d.vm_operation_needs,
        })),
        "connections": service.descriptors.map(|d| json!({
            "open": d.connections_open,
            "max": d.max_connections,
            "max_per_client": d.max_connections_per_client,
        })),
        "checks": {
            "backend": {
                "status": backend_status,
                "duration_ms": backend.duration.as_secs_f64() * 1000.0,
                "error": backend.error,
            }
        }
    });
    (code, body)
}

fn system() -> serde_json::Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let total = kib("MemTotal:");
    let available = kib("MemAvailable:");
    let used = total.saturating_sub(available);
    let used_percent = if total == 0 {
        0.0
    } else {
        used as f64 * 100.0 / total as f64
    };
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    json!({
        "hostname": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        "cpu": {
            "architecture": std::env::consts::ARCH,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "model": model,
        },
        "memory": {
            "total_bytes": total,
            "used_bytes": used,
            "available_bytes": available,
            "used_percent": used_percent,
        },
        "uptime_seconds": uptime as u64,
    })
}

/// The current UTC time as RFC 3339 with second precision.
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), valid for all dates after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::DescriptorHealth;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_706_136), "2026-11-26T15:15:36Z");
    }

    fn backend(healthy: bool) -> BackendHealth {
        BackendHealth {
            kind: "cloudhypervisor",
            healthy,
            version: String::new(),
            error: String::new(),
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn status_follows_backend_recovery_and_telemetry() {
        let ok = ServiceHealth {
            telemetry: "ok".into(),
            ..Default::default()
        };
        assert_eq!(overall(&backend(true), &ok), Status::Healthy);
        assert_eq!(overall(&backend(false), &ok), Status::Unhealthy);
        let recovering = ServiceHealth {
            recovering: true,
            ..ok.clone()
        };
        assert_eq!(overall(&backend(true), &recovering), Status::Degraded);
        let failing = ServiceHealth {
            telemetry: "export failed: connection refused".into(),
            ..ok
        };
        assert_eq!(overall(&backend(true), &failing), Status::Degraded);
    }

    #[test]
    fn tight_descriptors_degrade_the_status() {
        let fds = DescriptorHealth {
            limit: 1000,
            in_use: 900,
            free: 100,
            reserved_for_vms: 200,
            vm_operation_needs: 32,
            connections_open: 700,
            max_connections: 700,
            max_connections_per_client: 64,
        };
        let roomy = ServiceHealth {
            telemetry: "ok".into(),
            descriptors: Some(fds),
            ..Default::default()
        };
        assert_eq!(overall(&backend(true), &roomy), Status::Healthy);
        let tight = ServiceHealth {
            descriptors: Some(DescriptorHealth {
                in_use: 990,
                free: 10,
                ..fds
            }),
            ..roomy
        };
        assert_eq!(overall(&backend(true), &tight), Status::Degraded);
    }
}
