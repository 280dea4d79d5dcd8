//! CreateVm request handling from untrusted bytes: decode a `CreateVmRequest`
//! as protobuf binary and as proto3 JSON (the two encodings the API accepts),
//! convert it to the domain exactly as the RPC adapter does, validate it and
//! run the admission arithmetic. Nothing may panic, and the wire ↔ domain
//! conversion must be lossless (domain → wire → domain is the identity), which
//! is what lets validation see every field a client sent.
#![no_main]

use buffa::Message;
use libfuzzer_sys::fuzz_target;
use vmcp::adapters::inbound::convert::{config_in, config_out, optional_vm_id};
use vmcp::app::admission::{Footprint, VmLimits};
use vmcp::proto::vmm::v1 as pb;

fn exercise(req: &pb::CreateVmRequest) {
    let _ = optional_vm_id(&req.vm_id);
    let Some(wire) = req.config.as_option() else {
        return;
    };
    let config = config_in(wire);
    let valid = config.validate();
    let back = config_in(&config_out(&config));
    assert_eq!(back, config, "the conversion dropped or changed a field");
    if valid.is_ok() {
        let limits = VmLimits::host_defaults();
        let _ = limits.check_vm(&config);
        let _ = limits.check_host([Footprint::of(&config)], &config);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = pb::CreateVmRequest::decode_from_slice(data) {
        exercise(&req);
    }
    if let Ok(req) = serde_json::from_slice::<pb::CreateVmRequest>(data) {
        exercise(&req);
    }
});
