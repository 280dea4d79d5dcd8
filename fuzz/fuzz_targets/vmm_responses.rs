//! Bytes a VMM hands back (vm.info, Firecracker's `GET /`, error bodies) are
//! untrusted too. This branch has no backend response parsers, so the target
//! covers what they are built on: serde_json into `serde_json::Value`, every
//! string found there through the VM id validator (ids come back from VMMs and
//! stores), and the same bytes as the proto3 JSON of a VM config and of a
//! GetVmInfo response, converted and validated as the service would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vmcp::adapters::inbound::convert::config_in;
use vmcp::domain::VmId;
use vmcp::proto::vmm::v1 as pb;

fn walk(v: &Value) {
    match v {
        Value::String(s) => {
            if let Ok(id) = VmId::parse(s) {
                assert!(!id.as_str().contains('/'), "a valid id names a path");
                assert!(id.as_str() != "." && id.as_str() != "..");
            }
        }
        Value::Array(a) => a.iter().for_each(walk),
        Value::Object(m) => m.iter().for_each(|(k, x)| {
            let _ = VmId::parse(k);
            walk(x);
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        walk(&v);
    }
    if let Ok(c) = serde_json::from_slice::<pb::VmConfig>(data) {
        let _ = config_in(&c).validate();
    }
    if let Ok(info) = serde_json::from_slice::<pb::GetVmInfoResponse>(data) {
        let _ = VmId::parse(&info.vm_id);
        if let Some(c) = info.config.as_option() {
            let _ = config_in(c).validate();
        }
    }
});
