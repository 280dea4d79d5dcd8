//! CreateVm request handling from untrusted bytes: decode a `CreateVmRequest`
//! as protobuf binary and as proto3 JSON (the two encodings the API accepts),
//! convert it to the domain exactly as the RPC adapter does, validate it and
//! run the admission arithmetic. Nothing may panic, and the wire ↔ domain
//! conversion must be lossless (domain → wire → domain is the identity), which
//! is what lets validation see every field a client sent.

use buffa::Message;
use vmcp::adapters::inbound::convert::{config_in, config_out, optional_vm_id};
use vmcp::app::admission::{Footprint, VmLimits};
use vmcp::proto::vmm::v1 as pb;

/// How far one input got, for the seed replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    /// It decoded as protobuf binary.
    pub protobuf: bool,
    /// It decoded as proto3 JSON.
    pub json: bool,
    /// A decoded config passed validation (and reached admission).
    pub valid: bool,
}

fn exercise(req: &pb::CreateVmRequest, reached: &mut Reached) {
    let _ = optional_vm_id(&req.vm_id);
    let Some(wire) = req.config.as_option() else {
        return;
    };
    let config = config_in(wire);
    let valid = config.validate();
    let back = config_in(&config_out(&config));
    assert_eq!(back, config, "the conversion dropped or changed a field");
    if valid.is_ok() {
        reached.valid = true;
        let limits = VmLimits::host_defaults();
        let _ = limits.check_vm(&config);
        let _ = limits.check_host([Footprint::of(&config)], &config);
    }
}

/// One fuzz input.
pub fn run(data: &[u8]) -> Reached {
    let mut reached = Reached::default();
    if let Ok(req) = pb::CreateVmRequest::decode_from_slice(data) {
        reached.protobuf = true;
        exercise(&req, &mut reached);
    }
    if let Ok(req) = serde_json::from_slice::<pb::CreateVmRequest>(data) {
        reached.json = true;
        exercise(&req, &mut reached);
    }
    reached
}
