//! Cloud Hypervisor's REST API on one VMM's socket: one function per
//! endpoint VMCP uses, and the one place where CH's answers become domain
//! errors. CH answers errors as a JSON array of strings (outermost context
//! first, e.g. `["Error from API","The VM could not be paused","VM is not
//! running"]`) with 404 when no VM is created and 500 when the VM's state
//! forbids the action (also 405 per the spec); all of those are
//! [`HypervisorError::InvalidState`]. A 400 means VMCP sent something CH
//! cannot parse, a bug: [`HypervisorError::Protocol`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Deserialize;

use crate::adapters::outbound::vmm::{Response, UdsClient};
use crate::domain::{VmConfigError, VmState};
use crate::ports::HypervisorError;

use super::config::ChVmConfig;

/// `GET /api/v1/vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Ping {
    /// Semantic version, e.g. `53.0.0`.
    pub version: String,
    /// Build version, e.g. `v53.0`.
    #[serde(default)]
    pub build_version: String,
    /// The VMM's pid.
    #[serde(default)]
    pub pid: Option<i64>,
}

/// `GET /api/v1/vm.info`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VmInfo {
    /// `Created`, `Running`, `Shutdown`, `Paused` (or `BreakPoint` under gdb).
    pub state: String,
    /// The config CH holds.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Guest memory currently plugged, bytes.
    #[serde(default)]
    pub memory_actual_size: Option<i64>,
}

/// `GET /api/v1/vm.counters`: device id → counter name → value.
pub type Counters = BTreeMap<String, BTreeMap<String, i64>>;

/// `VmResize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
struct Resize {
    #[serde(skip_serializing_if = "Option::is_none")]
    desired_vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    desired_ram: Option<i64>,
}

impl VmInfo {
    /// The size `vm.info`'s config reports: boot vCPUs (updated by
    /// `vm.resize`) and memory (boot size, which ACPI hot-plug raises, plus
    /// any virtio-mem hot-plugged size). None when the config lacks them.
    pub fn size(&self) -> Option<crate::domain::VmSize> {
        let cpus = self.config.get("cpus")?.get("boot_vcpus")?.as_u64()?;
        let memory = self.config.get("memory")?;
        let size = memory.get("size")?.as_i64()?;
        let hotplugged = memory
            .get("hotplugged_size")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        Some(crate::domain::VmSize {
            vcpu_count: i32::try_from(cpus).ok()?,
            memory_bytes: size.checked_add(hotplugged)?,
        })
    }
}

/// Maps a vm.info state name to the domain state.
pub fn parse_state(state: &str) -> Result<VmState, HypervisorError> {
    match state {
        "Created" => Ok(VmState::Created),
        "Running" => Ok(VmState::Running),
        "Paused" => Ok(VmState::Paused),
        "Shutdown" => Ok(VmState::Shutdown),
        // Only reachable with CH's gdb stub: the vCPUs are stopped.
        "BreakPoint" => Ok(VmState::Paused),
        other => Err(HypervisorError::Protocol(format!(
            "vm.info reported unknown state {other:?}"
        ))),
    }
}

/// CH's error body as one line: the strings of its JSON array joined by
/// ": " without the generic "Error from API" head, or the raw text.
pub fn error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<Vec<String>>(body) {
        Ok(parts) => parts
            .into_iter()
            .filter(|p| p != "Error from API")
            .collect::<Vec<_>>()
            .join(": "),
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    }
}

/// Turns a non-2xx answer into the domain error for `endpoint`.
pub fn error_from(endpoint: &str, response: &Response) -> HypervisorError {
    let text = error_text(&response.body);
    match response.status {
        StatusCode::NOT_FOUND
        | StatusCode::METHOD_NOT_ALLOWED
        | StatusCode::INTERNAL_SERVER_ERROR => {
            HypervisorError::InvalidState(format!("{endpoint}: {text}"))
        }
        status => HypervisorError::Protocol(format!("{endpoint} answered {status}: {text}")),
    }
}

/// The API of one Cloud Hypervisor process.
#[derive(Debug, Clone, Copy)]
pub struct ChApi<'a> {
    http: &'a UdsClient,
    socket: &'a Path,
}

impl<'a> ChApi<'a> {
    /// The API on `socket`.
    pub fn new(http: &'a UdsClient, socket: &'a Path) -> Self {
        Self { http, socket }
    }

    async fn put(&self, endpoint: &str) -> Result<(), HypervisorError> {
        let r = self
            .http
            .call(
                self.socket,
                Method::PUT,
                &format!("/api/v1/{endpoint}"),
                None,
            )
            .await?;
        if r.is_success() {
            Ok(())
        } else {
            Err(error_from(endpoint, &r))
        }
    }

    /// `GET vmm.ping`, bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<Ping, HypervisorError> {
        let r = self
            .http
            .call_with_timeout(self.socket, Method::GET, "/api/v1/vmm.ping", None, timeout)
            .await?;
        if r.is_success() {
            Ok(r.json()?)
        } else {
            Err(error_from("vmm.ping", &r))
        }
    }

    /// `PUT vm.create`. CH refusing the config is `InvalidConfig`.
    pub async fn create(&self, config: &ChVmConfig) -> Result<(), HypervisorError> {
        let r = self
            .http
            .send_json(self.socket, Method::PUT, "/api/v1/vm.create", config)
            .await?;
        if r.is_success() {
            Ok(())
        } else if r.status == StatusCode::INTERNAL_SERVER_ERROR
            && error_text(&r.body).contains("already created")
        {
            Err(error_from("vm.create", &r))
        } else {
            Err(HypervisorError::InvalidConfig(VmConfigError::new(
                "config",
                format!("rejected by cloudhypervisor: {}", error_text(&r.body)),
            )))
        }
    }

    /// `PUT vm.boot`.
    pub async fn boot(&self) -> Result<(), HypervisorError> {
        self.put("vm.boot").await
    }

    /// `PUT vm.shutdown` (hard stop; CH v53 then reports Created).
    pub async fn shutdown(&self) -> Result<(), HypervisorError> {
        self.put("vm.shutdown").await
    }

    /// `PUT vm.power-button` (ACPI power button; the guest decides).
    pub async fn power_button(&self) -> Result<(), HypervisorError> {
        self.put("vm.power-button").await
    }

    /// `PUT vm.reboot`.
    pub async fn reboot(&self) -> Result<(), HypervisorError> {
        self.put("vm.reboot").await
    }

    /// `PUT vm.pause`.
    pub async fn pause(&self) -> Result<(), HypervisorError> {
        self.put("vm.pause").await
    }

    /// `PUT vm.resume`.
    pub async fn resume(&self) -> Result<(), HypervisorError> {
        self.put("vm.resume").await
    }

    /// `PUT vm.delete`.
    pub async fn delete(&self) -> Result<(), HypervisorError> {
        self.put("vm.delete").await
    }

    /// `PUT vmm.shutdown` (the process exits).
    pub async fn vmm_shutdown(&self) -> Result<(), HypervisorError> {
        self.put("vmm.shutdown").await
    }

    /// `PUT vm.resize` (ACPI vCPU and memory hot-plug); None leaves that one.
    pub async fn resize(
        &self,
        desired_vcpus: Option<u32>,
        desired_ram: Option<i64>,
    ) -> Result<(), HypervisorError> {
        let body = Resize {
            desired_vcpus,
            desired_ram,
        };
        self.put_json("vm.resize", &body).await
    }

    /// `PUT endpoint` with a JSON body; a refusal carries CH's words.
    async fn put_json(
        &self,
        endpoint: &str,
        body: &impl serde::Serialize,
    ) -> Result<(), HypervisorError> {
        let r = self
            .http
            .send_json(
                self.socket,
                Method::PUT,
                &format!("/api/v1/{endpoint}"),
                body,
            )
            .await?;
        if r.is_success() {
            Ok(())
        } else {
            Err(error_from(endpoint, &r))
        }
    }

    /// `PUT vm.snapshot` into the directory `dir` (the VM must be paused).
    pub async fn snapshot(&self, dir: &Path) -> Result<(), HypervisorError> {
        let body = serde_json::json!({"destination_url": format!("file://{}", dir.display())});
        self.put_json("vm.snapshot", &body).await
    }

    /// `PUT vm.restore` from the directory `dir` into this fresh VMM (the VM is left paused).
    pub async fn restore(&self, dir: &Path) -> Result<(), HypervisorError> {
        let body = serde_json::json!({"source_url": format!("file://{}", dir.display())});
        self.put_json("vm.restore", &body).await
    }

    /// `GET vm.info`.
    pub async fn info(&self) -> Result<VmInfo, HypervisorError> {
        match self.http.get_json(self.socket, "/api/v1/vm.info").await? {
            Ok(info) => Ok(info),
            Err(r) => Err(error_from("vm.info", &r)),
        }
    }

    /// `GET vm.info`, just the state.
    pub async fn state(&self) -> Result<VmState, HypervisorError> {
        parse_state(&self.info().await?.state)
    }

    /// `GET vm.counters` (CH answers 500 unless the VM is running).
    pub async fn counters(&self) -> Result<Counters, HypervisorError> {
        match self
            .http
            .get_json(self.socket, "/api/v1/vm.counters")
            .await?
        {
            Ok(c) => Ok(c),
            Err(r) => Err(error_from("vm.counters", &r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, body: &str) -> Response {
        let status = StatusCode::from_u16(status).expect("status");
        Response::new(status, body.to_owned(), "PUT /api/v1/vm.pause")
    }

    #[test]
    fn states_map_and_unknown_is_a_protocol_error() {
        for (name, state) in [
            ("Created", VmState::Created),
            ("Running", VmState::Running),
            ("Paused", VmState::Paused),
            ("Shutdown", VmState::Shutdown),
            ("BreakPoint", VmState::Paused),
        ] {
            assert_eq!(parse_state(name).expect(name), state);
        }
        assert!(matches!(
            parse_state("Zombie"),
            Err(HypervisorError::Protocol(_))
        ));
    }

    #[test]
    fn error_bodies_are_joined_without_the_generic_head() {
        assert_eq!(
            error_text(br#"["Error from API","The VM could not be paused","VM is not running"]"#),
            "The VM could not be paused: VM is not running"
        );
        assert_eq!(error_text(b"plain text\n"), "plain text");
    }

    #[test]
    fn state_refusals_are_invalid_state() {
        for status in [404, 405, 500] {
            let e = error_from(
                "vm.pause",
                &response(
                    status,
                    r#"["Error from API","The VM could not be paused","VM is not running"]"#,
                ),
            );
            assert!(
                matches!(&e, HypervisorError::InvalidState(m)
                    if m == "vm.pause: The VM could not be paused: VM is not running"),
                "{status}: {e:?}"
            );
        }
        assert!(matches!(
            error_from(
                "vm.pause",
                &response(400, r#"["Failed to deserialize JSON"]"#)
            ),
            HypervisorError::Protocol(_)
        ));
    }
}
