//! Firecracker's REST API on one VMM's `--api-sock`: one function per endpoint
//! VMCP uses, and the single place where Firecracker's answers become
//! [`HypervisorError`]s. Firecracker answers 204 on success and 400 with
//! `{"fault_message": "..."}` when it refuses; a refusal because of the
//! microVM's state ("not supported before/after starting the microVM") is
//! `InvalidState`, a refused pre-boot resource is `InvalidConfig` naming the
//! VMCP field it came from, anything else Firecracker refuses is
//! `InvalidState` carrying its message.

use std::path::{Path, PathBuf};

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::config::{BootSource, Drive, MachineConfig, Metrics, NetworkInterface, SerialDevice};
use crate::adapters::outbound::vmm::{Response, UdsClient};
use crate::domain::VmConfigError;
use crate::ports::HypervisorError;

/// `GET /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceInfo {
    /// The `--id` Firecracker was started with.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// Firecracker's version.
    pub vmm_version: String,
    /// `Firecracker`.
    #[serde(default)]
    pub app_name: String,
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Boot the configured microVM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard controller (x86).
    SendCtrlAltDel,
    /// Write the metrics to the metrics file now.
    FlushMetrics,
}

/// `PATCH /vm` target states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmRunState {
    /// Pause the vCPUs.
    Paused,
    /// Resume the vCPUs.
    Resumed,
}

#[derive(Serialize)]
struct ActionBody {
    action_type: Action,
}

#[derive(Serialize)]
struct VmBody {
    state: VmRunState,
}

#[derive(Deserialize)]
struct Fault {
    fault_message: String,
}

/// A client for one Firecracker API socket.
#[derive(Debug, Clone)]
pub struct FcClient {
    http: UdsClient,
    socket: PathBuf,
}

impl FcClient {
    /// A client for `socket`, sharing `http`'s connection pool and timeout.
    pub fn new(http: UdsClient, socket: PathBuf) -> Self {
        Self { http, socket }
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /`: the instance's id, state and version.
    pub async fn describe(&self) -> Result<InstanceInfo, HypervisorError> {
        let r = self.http.call(&self.socket, Method::GET, "/", None).await?;
        ok(&r, None)?;
        Ok(r.json()?)
    }

    /// `GET /vm/config`: everything Firecracker holds, as it reports it.
    pub async fn vm_config(&self) -> Result<serde_json::Value, HypervisorError> {
        let r = self
            .http
            .call(&self.socket, Method::GET, "/vm/config", None)
            .await?;
        ok(&r, None)?;
        Ok(r.json()?)
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, body: &MachineConfig) -> Result<(), HypervisorError> {
        self.put_with("/machine-config", body, |m| {
            if m.contains("vcpu") {
                "config.cpu.vcpu_count"
            } else if m.contains("mem") {
                "config.memory.size_bytes"
            } else {
                "config"
            }
        })
        .await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, body: &BootSource) -> Result<(), HypervisorError> {
        self.put_with("/boot-source", body, |m| {
            if m.contains("initrd") {
                "config.boot.initrd_path"
            } else if m.contains("kernel") {
                "config.boot.kernel_path"
            } else if m.contains("cmdline") || m.contains("boot_args") {
                "config.boot.kernel_args"
            } else {
                "config.boot"
            }
        })
        .await
    }

    /// `PUT /drives/{drive_id}`; `field` names the storage entry it came from.
    pub async fn put_drive(&self, body: &Drive, field: &str) -> Result<(), HypervisorError> {
        self.put(&format!("/drives/{}", body.drive_id), body, Some(field))
            .await
    }

    /// `PUT /network-interfaces/{iface_id}`; `field` names the network entry.
    pub async fn put_network_interface(
        &self,
        body: &NetworkInterface,
        field: &str,
    ) -> Result<(), HypervisorError> {
        self.put(
            &format!("/network-interfaces/{}", body.iface_id),
            body,
            Some(field),
        )
        .await
    }

    /// `PUT /metrics`.
    pub async fn put_metrics(&self, body: &Metrics) -> Result<(), HypervisorError> {
        self.put("/metrics", body, None).await
    }

    /// `PUT /serial`.
    pub async fn put_serial(&self, body: &SerialDevice) -> Result<(), HypervisorError> {
        self.put("/serial", body, Some("config.console.output"))
            .await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action: Action) -> Result<(), HypervisorError> {
        let field = match action {
            // A start refused for a reason other than state is a config
            // Firecracker could not use (e.g. an unloadable kernel).
            Action::InstanceStart => Some("config"),
            Action::SendCtrlAltDel | Action::FlushMetrics => None,
        };
        self.put(
            "/actions",
            &ActionBody {
                action_type: action,
            },
            field,
        )
        .await
    }

    /// `PUT /snapshot/create` (the microVM must be paused): the whole memory,
    /// or with `diff` only the pages written since the previous snapshot (a
    /// sparse file; needs dirty-page tracking).
    pub async fn create_snapshot(
        &self,
        snapshot_path: &str,
        mem_file_path: &str,
        diff: bool,
    ) -> Result<(), HypervisorError> {
        let body = serde_json::json!({
            "snapshot_type": if diff { "Diff" } else { "Full" },
            "snapshot_path": snapshot_path,
            "mem_file_path": mem_file_path,
        });
        self.put("/snapshot/create", &body, None).await
    }

    /// `PUT /snapshot/load` into a fresh process (File memory backend), the
    /// interfaces on the taps `network_overrides` names (iface id, tap);
    /// dirty pages tracked when `track_dirty_pages` (not kept in a snapshot).
    pub async fn load_snapshot(
        &self,
        snapshot_path: &str,
        mem_file_path: &str,
        network_overrides: &[(String, String)],
        resume: bool,
        track_dirty_pages: bool,
    ) -> Result<(), HypervisorError> {
        let overrides: Vec<_> = network_overrides
            .iter()
            .map(|(iface, tap)| serde_json::json!({"iface_id": iface, "host_dev_name": tap}))
            .collect();
        let mut body = serde_json::json!({
            "snapshot_path": snapshot_path,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
            "resume_vm": resume,
            "track_dirty_pages": track_dirty_pages,
        });
        if !overrides.is_empty() {
            body["network_overrides"] = serde_json::Value::Array(overrides);
        }
        self.put("/snapshot/load", &body, None).await
    }

    /// `PATCH /drives/{drive_id}` to another backing file (after a load,
    /// before the guest runs: a clone's own disk copy).
    pub async fn patch_drive_path(
        &self,
        drive_id: &str,
        path_on_host: &str,
    ) -> Result<(), HypervisorError> {
        let body = serde_json::json!({"drive_id": drive_id, "path_on_host": path_on_host});
        let r = self
            .http
            .send_json(
                &self.socket,
                Method::PATCH,
                &format!("/drives/{drive_id}"),
                &body,
            )
            .await?;
        ok(&r, None)
    }

    /// `PATCH /vm`.
    pub async fn patch_vm(&self, state: VmRunState) -> Result<(), HypervisorError> {
        let r = self
            .http
            .send_json(&self.socket, Method::PATCH, "/vm", &VmBody { state })
            .await?;
        ok(&r, None)
    }

    /// PUT whose refusal names a field chosen from the (lower-cased) fault message.
    async fn put_with<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        field_for: impl Fn(&str) -> &'static str,
    ) -> Result<(), HypervisorError> {
        let r = self
            .http
            .send_json(&self.socket, Method::PUT, path, body)
            .await?;
        let message = fault_message(&r).to_ascii_lowercase();
        ok(&r, Some(field_for(&message)))
    }

    async fn put<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        field: Option<&str>,
    ) -> Result<(), HypervisorError> {
        let r = self
            .http
            .send_json(&self.socket, Method::PUT, path, body)
            .await?;
        ok(&r, field)
    }
}

/// Whether a fault message is Firecracker refusing because of the microVM's state.
fn is_state_refusal(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("not supported before starting")
        || m.contains("not supported after starting")
        || m.contains("reinitialization")
}

/// The `fault_message` of an error body, or the body as text.
fn fault_message(r: &Response) -> String {
    serde_json::from_slice::<Fault>(&r.body)
        .map(|f| f.fault_message)
        .unwrap_or_else(|_| r.text())
}

/// Maps a non-2xx answer to an error; `field` is the VMCP config field a
/// refused pre-boot request came from.
pub fn ok(r: &Response, field: Option<&str>) -> Result<(), HypervisorError> {
    if r.is_success() {
        return Ok(());
    }
    let message = fault_message(r);
    Err(match r.status {
        StatusCode::BAD_REQUEST => match field {
            Some(field) if !is_state_refusal(&message) => {
                HypervisorError::InvalidConfig(VmConfigError::new(
                    field,
                    format!("firecracker refused {}: {message}", r.operation),
                ))
            }
            _ => HypervisorError::InvalidState(format!("{}: {message}", r.operation)),
        },
        s if s.is_server_error() => HypervisorError::unavailable(format!(
            "firecracker failed {} ({s}): {message}",
            r.operation
        )),
        s => HypervisorError::Protocol(format!("{} answered {s}: {message}", r.operation)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> Response {
        Response::new(
            StatusCode::from_u16(status).expect("status"),
            body.to_owned(),
            "PUT /drives/rootfs",
        )
    }

    #[test]
    fn success_is_ok() {
        assert!(ok(&resp(204, ""), Some("config.storage[0]")).is_ok());
    }

    #[test]
    fn a_state_refusal_is_invalid_state_even_for_config_calls() {
        let r = resp(
            400,
            r#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#,
        );
        let e = ok(&r, Some("config.storage[0]")).expect_err("refused");
        assert!(
            matches!(&e, HypervisorError::InvalidState(m) if m.contains("after starting")),
            "{e:?}"
        );
    }

    #[test]
    fn a_refused_resource_names_its_field() {
        let r = resp(
            400,
            r#"{"fault_message":"Drive config error: Unable to open the block device backing file"}"#,
        );
        let HypervisorError::InvalidConfig(e) = ok(&r, Some("config.storage[1]")).expect_err("x")
        else {
            panic!("expected InvalidConfig");
        };
        assert_eq!(e.field, "config.storage[1]");
        assert!(
            e.reason.contains("firecracker refused PUT /drives/rootfs"),
            "{e}"
        );
        assert!(e.reason.contains("Unable to open"), "{e}");
    }

    #[test]
    fn refusals_without_a_field_and_odd_statuses() {
        let e = ok(&resp(400, r#"{"fault_message":"nope"}"#), None).expect_err("x");
        assert!(
            matches!(&e, HypervisorError::InvalidState(m) if m == "PUT /drives/rootfs: nope"),
            "{e:?}"
        );
        let e = ok(&resp(500, "boom"), None).expect_err("x");
        assert!(
            matches!(&e, HypervisorError::Unavailable { message, .. } if message.contains("boom")),
            "{e:?}"
        );
        let e = ok(&resp(404, ""), None).expect_err("x");
        assert!(matches!(e, HypervisorError::Protocol(_)));
    }

    #[test]
    fn bodies_serialize_as_firecracker_expects() {
        let v = serde_json::to_value(ActionBody {
            action_type: Action::SendCtrlAltDel,
        })
        .expect("json");
        assert_eq!(v, serde_json::json!({"action_type": "SendCtrlAltDel"}));
        let v = serde_json::to_value(VmBody {
            state: VmRunState::Resumed,
        })
        .expect("json");
        assert_eq!(v, serde_json::json!({"state": "Resumed"}));
    }
}
