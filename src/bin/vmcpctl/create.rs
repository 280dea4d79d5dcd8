//! The CreateVm request, from flags or from a file in the API's schema
//! (proto3 JSON field names, as JSON or YAML). A file may hold a VmConfig or
//! a whole CreateVmRequest. Keys the schema does not know are refused rather
//! than dropped, so a misspelt `readOnyl: true` cannot quietly make a disk
//! writable; the server validates the values.

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use vmcp::proto::vmm::v1 as pb;

use crate::cli::{CreateArgs, RestartPolicy};
use crate::error::CtlError;

/// The request `create` sends.
pub fn request(args: &CreateArgs) -> Result<pb::CreateVmRequest, CtlError> {
    let mut request = match &args.file {
        Some(path) => from_file(path)?,
        None => pb::CreateVmRequest {
            config: from_flags(args).into(),
            ..Default::default()
        },
    };
    if let Some(id) = &args.vm_id {
        if !request.vm_id.is_empty() && request.vm_id != *id {
            return Err(CtlError::Usage(format!(
                "the VM id {id:?} differs from vmId {:?} in the file",
                request.vm_id
            )));
        }
        request.vm_id = id.clone();
    }
    Ok(request)
}

fn from_flags(args: &CreateArgs) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig {
            vcpu_count: i32::from(args.vcpus),
            ..Default::default()
        }
        .into(),
        memory: pb::MemoryConfig {
            // parse::memory keeps sizes within i64.
            size_bytes: i64::try_from(args.memory).unwrap_or(i64::MAX),
            track_dirty_pages: args.track_dirty_pages,
            ..Default::default()
        }
        .into(),
        boot: pb::BootConfig {
            kernel_path: args.kernel.clone().unwrap_or_default(),
            initrd_path: args.initrd.clone().unwrap_or_default(),
            kernel_args: args.cmdline.clone().unwrap_or_default(),
            ..Default::default()
        }
        .into(),
        storage: args
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| pb::StorageDevice {
                id: d.id.clone().unwrap_or_else(|| format!("disk{i}")),
                path: d.path.clone(),
                read_only: d.read_only,
                is_root_device: d.root,
                ..Default::default()
            })
            .collect(),
        network: args
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| pb::NetworkInterface {
                id: n.id.clone().unwrap_or_else(|| format!("eth{i}")),
                tap_device: n.tap.clone(),
                mac_address: n.mac.clone().unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        console: if args.console {
            pb::ConsoleConfig {
                enabled: true,
                ..Default::default()
            }
            .into()
        } else {
            Default::default()
        },
        metadata: args.metadata.iter().cloned().collect(),
        restart_policy: args.restart_policy.map_or_else(Default::default, |p| {
            match p {
                RestartPolicy::Never => pb::RestartPolicy::RESTART_POLICY_NEVER,
                RestartPolicy::OnFailure => pb::RestartPolicy::RESTART_POLICY_ON_FAILURE,
                RestartPolicy::Always => pb::RestartPolicy::RESTART_POLICY_ALWAYS,
            }
            .into()
        }),
        ..Default::default()
    }
}

/// Reads `path` ("-" is stdin): `.json` as JSON, anything else as YAML (which also reads JSON).
fn from_file(path: &Path) -> Result<pb::CreateVmRequest, CtlError> {
    let name = path.display();
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    read.map_err(|e| CtlError::Usage(format!("--file {name}: cannot read: {e}")))?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let value: Value = if is_json {
        serde_json::from_str(&text)
            .map_err(|e| CtlError::Usage(format!("--file {name}: not valid JSON: {e}")))?
    } else {
        serde_saphyr::from_str(&text)
            .map_err(|e| CtlError::Usage(format!("--file {name}: not valid YAML: {e}")))?
    };
    parse_request(value).map_err(|e| CtlError::Usage(format!("--file {name}: {e}")))
}

/// A CreateVmRequest (an object with `config`) or a bare VmConfig.
fn parse_request(value: Value) -> Result<pb::CreateVmRequest, String> {
    if !value.is_object() {
        return Err("expected an object (a VmConfig, or a CreateVmRequest with config)".into());
    }
    let whole = value.get("config").is_some();
    let request = if whole {
        strict::<pb::CreateVmRequest>(&value)?
    } else {
        pb::CreateVmRequest {
            config: strict::<pb::VmConfig>(&value)?.into(),
            ..Default::default()
        }
    };
    Ok(request)
}

/// Deserializes `value` as `T`, refusing keys `T` does not have.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> Result<T, String> {
    let message: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&message).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    dropped_keys(value, &back, "", &mut unknown);
    if unknown.is_empty() {
        Ok(message)
    } else {
        Err(format!("unknown field(s): {}", unknown.join(", ")))
    }
}

/// Keys in `input` with a non-zero value that the parsed message, printed
/// back, does not have: the parser ignored them. Zero values are skipped
/// because proto3 JSON does not print them (and ignoring one changes nothing).
fn dropped_keys(input: &Value, parsed: &Value, at: &str, out: &mut Vec<String>) {
    match (input, parsed) {
        (Value::Object(fields), Value::Object(kept)) => {
            for (key, value) in fields {
                if is_zero(value) {
                    continue;
                }
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match kept.get(key).or_else(|| kept.get(&lower_camel(key))) {
                    Some(inner) => dropped_keys(value, inner, &path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(items), Value::Array(kept)) => {
            for (i, (item, inner)) in items.iter().zip(kept).enumerate() {
                dropped_keys(item, inner, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// `is_root_device` → `isRootDevice`, the name proto3 JSON prints.
fn lower_camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Result<pb::CreateVmRequest, String> {
        parse_request(serde_saphyr::from_str(text).map_err(|e| e.to_string())?)
    }

    #[test]
    fn a_yaml_vm_config_reads_like_the_api_json() {
        let req = yaml(
            "cpu: {vcpuCount: 2}\n\
             memory: {sizeBytes: 536870912}\n\
             boot: {kernelPath: /k, kernel_args: console=ttyS0}\n\
             storage:\n  - {id: root, path: /r.ext4, isRootDevice: true, read_only: true}\n\
             network:\n  - {id: eth0, tapDevice: tap0, macAddress: \"52:54:00:00:00:01\"}\n\
             metadata: {team: edge, some_key: x}\n",
        )
        .expect("valid");
        let c = req.config;
        assert_eq!(c.cpu.vcpu_count, 2);
        assert_eq!(c.memory.size_bytes, 536_870_912);
        assert_eq!(c.boot.kernel_args, "console=ttyS0");
        assert!(c.storage[0].is_root_device && c.storage[0].read_only);
        assert_eq!(c.network[0].mac_address, "52:54:00:00:00:01");
        assert_eq!(c.metadata.get("some_key").map(String::as_str), Some("x"));
        assert_eq!(req.vm_id, "");
    }

    #[test]
    fn a_whole_create_request_is_accepted() {
        let value = serde_json::json!({
            "vmId": "web-1",
            "config": {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": "268435456"}}
        });
        let req = parse_request(value).expect("valid");
        assert_eq!(req.vm_id, "web-1");
        assert_eq!(req.config.memory.size_bytes, 268_435_456);
    }

    #[test]
    fn unknown_keys_are_refused_by_path() {
        let err = yaml("cpu: {vcpus: 2}\nstorage:\n  - {id: a, path: /a, readOnyl: true}\n")
            .expect_err("typos");
        assert!(err.contains("cpu.vcpus"), "{err}");
        assert!(err.contains("storage[0].readOnyl"), "{err}");
        // A zero value of an unknown key changes nothing and is let through.
        assert!(yaml("cpu: {vcpuCount: 1, vcpus: 0}\n").is_ok());
        let err = yaml("cpu: {vcpuCount: many}\n").expect_err("bad type");
        assert!(!err.is_empty());
        assert!(parse_request(serde_json::json!([1, 2])).is_err());
    }

    #[test]
    fn camel_case() {
        assert_eq!(lower_camel("is_root_device"), "isRootDevice");
        assert_eq!(lower_camel("vcpuCount"), "vcpuCount");
    }
}
