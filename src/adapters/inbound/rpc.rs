//! The ConnectRPC face of the VM service: implements the generated
//! `vmm.v1.VmService` trait by converting wire messages to domain calls on
//! the inbound port and mapping errors in one place.

use std::sync::Arc;

use connectrpc::{
    ConnectError, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream,
};
use futures_util::StreamExt;

use crate::domain::VmError;
use crate::ports::{CreateVm, ListQuery, VmService};
use crate::proto::vmm::v1 as pb;

use super::convert::{
    config_in, config_out, non_negative, optional_snapshot_id, optional_vm_id,
    optional_vm_id_named, restart_policy_in, restore_in, snapshot_id, snapshot_kind_in,
    snapshot_out, state_filter_in, state_out, vm_id, watch_event_out, watch_query_in,
};
use super::encoded::{InfoAnswer, ListAnswer};
use super::errors::to_connect;
use super::rpc_layer::record_vm_id;

/// Adapts a [`VmService`] implementation to the generated ConnectRPC trait.
pub struct RpcService<S> {
    inner: Arc<S>,
}

impl<S> std::fmt::Debug for RpcService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcService").finish_non_exhaustive()
    }
}

impl<S> RpcService<S> {
    /// Wraps the service.
    pub fn new(inner: Arc<S>) -> Self {
        Self { inner }
    }
}

/// Most bytes one WriteConsole may send.
pub const MAX_CONSOLE_WRITE: usize = 16 * 1024;

fn fail(e: VmError) -> ConnectError {
    to_connect(&e)
}

// The generated trait returns `impl Encodable`; naming the concrete message type is the point.
#[allow(refining_impl_trait)]
impl<S: VmService> pb::VmService for RpcService<S> {
    async fn create_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CreateVmRequest>,
    ) -> ServiceResult<pb::CreateVmResponse> {
        let req = request.to_owned_message();
        record_vm_id(&req.vm_id);
        if let Some(c) = req.config.as_option() {
            restart_policy_in(c).map_err(fail)?;
        }
        let create = CreateVm {
            vm_id: optional_vm_id(&req.vm_id).map_err(fail)?,
            config: config_in(req.config.as_option().ok_or_else(|| {
                fail(VmError::InvalidArgument(crate::domain::VmConfigError::new(
                    "config",
                    "is required",
                )))
            })?),
        };
        let snap = self.inner.create_vm(create).await.map_err(fail)?;
        record_vm_id(snap.id.as_str());
        Response::ok(pb::CreateVmResponse {
            vm_id: snap.id.to_string(),
            state: state_out(snap.state),
            ..Default::default()
        })
    }

    async fn delete_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::DeleteVmRequest>,
    ) -> ServiceResult<pb::DeleteVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        self.inner
            .delete_vm(id, request.force)
            .await
            .map_err(fail)?;
        Response::ok(pb::DeleteVmResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn boot_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::BootVmRequest>,
    ) -> ServiceResult<pb::BootVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let state = self.inner.boot_vm(id).await.map_err(fail)?;
        Response::ok(pb::BootVmResponse {
            success: true,
            state: state_out(state),
            ..Default::default()
        })
    }

    async fn shutdown_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ShutdownVmRequest>,
    ) -> ServiceResult<pb::ShutdownVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let timeout = non_negative("timeout_seconds", request.timeout_seconds).map_err(fail)?;
        let state = self
            .inner
            .shutdown_vm(id, request.force, timeout)
            .await
            .map_err(fail)?;
        Response::ok(pb::ShutdownVmResponse {
            success: true,
            state: state_out(state),
            ..Default::default()
        })
    }

    async fn pause_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PauseVmRequest>,
    ) -> ServiceResult<pb::PauseVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let state = self.inner.pause_vm(id).await.map_err(fail)?;
        Response::ok(pb::PauseVmResponse {
            success: true,
            state: state_out(state),
            ..Default::default()
        })
    }

    async fn resume_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ResumeVmRequest>,
    ) -> ServiceResult<pb::ResumeVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let state = self.inner.resume_vm(id).await.map_err(fail)?;
        Response::ok(pb::ResumeVmResponse {
            success: true,
            state: state_out(state),
            ..Default::default()
        })
    }

    async fn reboot_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::RebootVmRequest>,
    ) -> ServiceResult<pb::RebootVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let state = self
            .inner
            .reboot_vm(id, request.force)
            .await
            .map_err(fail)?;
        Response::ok(pb::RebootVmResponse {
            success: true,
            state: state_out(state),
            ..Default::default()
        })
    }

    async fn get_vm_info(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetVmInfoRequest>,
    ) -> ServiceResult<InfoAnswer> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let details = self.inner.get_vm_info(id).await.map_err(fail)?;
        Response::ok(InfoAnswer(details))
    }

    async fn list_vms(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ListVmsRequest>,
    ) -> ServiceResult<ListAnswer> {
        let req = request.to_owned_message();
        let query = ListQuery {
            states: state_filter_in(&req.state_filter).map_err(fail)?,
            page_size: non_negative("page_size", req.page_size).map_err(fail)?,
            page_token: req.page_token.clone(),
        };
        let page = self.inner.list_vms(query).await.map_err(fail)?;
        Response::ok(ListAnswer(page))
    }

    async fn watch_vms(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::WatchVmsRequest>,
    ) -> ServiceResult<ServiceStream<pb::WatchVmsResponse>> {
        let query = watch_query_in(&request.to_owned_message()).map_err(fail)?;
        let events = self.inner.watch_vms(query).await.map_err(fail)?;
        Response::stream_ok(events.map(|e| e.map(|e| watch_event_out(&e)).map_err(fail)))
    }

    async fn get_console_output(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetConsoleOutputRequest>,
    ) -> ServiceResult<pb::GetConsoleOutputResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let chunk = self
            .inner
            .get_console_output(id, request.offset, request.max_bytes)
            .await
            .map_err(fail)?;
        Response::ok(pb::GetConsoleOutputResponse {
            data: chunk.data,
            next_offset: chunk.next_offset,
            offset: chunk.offset,
            ..Default::default()
        })
    }

    async fn stream_console(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::StreamConsoleRequest>,
    ) -> ServiceResult<ServiceStream<pb::StreamConsoleResponse>> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let chunks = self
            .inner
            .stream_console(id, request.offset)
            .await
            .map_err(fail)?;
        Response::stream_ok(chunks.map(|c| {
            c.map(|c| pb::StreamConsoleResponse {
                data: c.data,
                next_offset: c.next_offset,
                offset: c.offset,
                ..Default::default()
            })
            .map_err(fail)
        }))
    }

    async fn write_console(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::WriteConsoleRequest>,
    ) -> ServiceResult<pb::WriteConsoleResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        if request.data.len() > MAX_CONSOLE_WRITE {
            return Err(fail(VmError::InvalidArgument(
                crate::domain::VmConfigError::new(
                    "data",
                    format!(
                        "at most {MAX_CONSOLE_WRITE} bytes per call, got {}",
                        request.data.len()
                    ),
                ),
            )));
        }
        let written = self
            .inner
            .write_console(id, request.data.to_vec())
            .await
            .map_err(fail)?;
        Response::ok(pb::WriteConsoleResponse {
            bytes_written: u64::try_from(written).unwrap_or(u64::MAX),
            ..Default::default()
        })
    }

    async fn snapshot_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SnapshotVmRequest>,
    ) -> ServiceResult<pb::SnapshotVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let snapshot_id = optional_snapshot_id(request.snapshot_id).map_err(fail)?;
        let kind = snapshot_kind_in(request.kind).map_err(fail)?;
        let info = self
            .inner
            .snapshot_vm(id, snapshot_id, request.resume, kind)
            .await
            .map_err(fail)?;
        Response::ok(pb::SnapshotVmResponse {
            snapshot: snapshot_out(&info).into(),
            ..Default::default()
        })
    }

    async fn list_snapshots(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ListSnapshotsRequest>,
    ) -> ServiceResult<pb::ListSnapshotsResponse> {
        let source = optional_vm_id_named("source_vm_id", request.source_vm_id).map_err(fail)?;
        let list = self.inner.list_snapshots(source).await.map_err(fail)?;
        Response::ok(pb::ListSnapshotsResponse {
            snapshots: list.iter().map(snapshot_out).collect(),
            ..Default::default()
        })
    }

    async fn get_snapshot(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetSnapshotRequest>,
    ) -> ServiceResult<pb::GetSnapshotResponse> {
        let id = snapshot_id("snapshot_id", request.snapshot_id).map_err(fail)?;
        let info = self.inner.get_snapshot(id).await.map_err(fail)?;
        Response::ok(pb::GetSnapshotResponse {
            snapshot: snapshot_out(&info).into(),
            ..Default::default()
        })
    }

    async fn delete_snapshot(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::DeleteSnapshotRequest>,
    ) -> ServiceResult<pb::DeleteSnapshotResponse> {
        let id = snapshot_id("snapshot_id", request.snapshot_id).map_err(fail)?;
        self.inner.delete_snapshot(id).await.map_err(fail)?;
        Response::ok(pb::DeleteSnapshotResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn restore_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::RestoreVmRequest>,
    ) -> ServiceResult<pb::RestoreVmResponse> {
        let req = request.to_owned_message();
        record_vm_id(&req.vm_id);
        let restore = restore_in(&req).map_err(fail)?;
        let snap = self.inner.restore_vm(restore).await.map_err(fail)?;
        Response::ok(pb::RestoreVmResponse {
            vm_id: snap.id.to_string(),
            state: state_out(snap.state),
            ..Default::default()
        })
    }

    async fn resize_vm(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ResizeVmRequest>,
    ) -> ServiceResult<pb::ResizeVmResponse> {
        record_vm_id(request.vm_id);
        let id = vm_id("vm_id", request.vm_id).map_err(fail)?;
        let snap = self
            .inner
            .resize_vm(id, request.vcpu_count, request.memory_bytes)
            .await
            .map_err(fail)?;
        Response::ok(pb::ResizeVmResponse {
            state: state_out(snap.state),
            config: config_out(&snap.config).into(),
            ..Default::default()
        })
    }
}
