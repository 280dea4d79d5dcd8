//! The fuzz targets on stable Rust: their bodies (`fuzz/src/`, included
//! here, the same files the cargo-fuzz targets call) run over every seed in
//! `fuzz/seeds/<target>/`. A target that stops compiling, panics or breaks
//! one of its properties on a seed, or whose seeds no longer reach the
//! parsers it is there for, fails `cargo test`, with or without cargo-fuzz
//! and nightly (`scripts/fuzz.sh` runs the real fuzzing).

use std::path::PathBuf;

use buffa::Message;

#[path = "../../fuzz/src/create_request.rs"]
mod create_request;
#[path = "../../fuzz/src/vmm_responses.rs"]
mod vmm_responses;

/// Every seed of `target`, by file name, in name order.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `body` on `input`, naming the seed if it panics.
fn replay<R>(name: &str, input: &[u8], body: impl Fn(&[u8]) -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(input)))
        .unwrap_or_else(|_| panic!("seed {name} fails its target (its panic is above)"))
}

#[test]
fn create_request_seeds_decode_convert_and_validate() {
    let mut inputs = seeds("create_request");
    // The tests' own request, encoded now, so the seeds follow the proto.
    let req = super::harness::create_req("seed-vm");
    inputs.push(("(create_req, binary)".into(), req.encode_to_vec()));
    inputs.push((
        "(create_req, json)".into(),
        serde_json::to_vec(&req).unwrap(),
    ));
    let mut protobuf = Vec::new();
    let mut json = Vec::new();
    let mut valid = Vec::new();
    for (name, input) in &inputs {
        let r = replay(name, input, create_request::run);
        for (reached, list) in [
            (r.protobuf, &mut protobuf),
            (r.json, &mut json),
            (r.valid, &mut valid),
        ] {
            if reached {
                list.push(name.as_str());
            }
        }
    }
    assert!(
        protobuf.contains(&"(create_req, binary)"),
        "the binary encoding decodes: {protobuf:?}"
    );
    assert!(
        json.len() >= 2 && valid.len() >= 3,
        "seeds decode as JSON ({json:?}) and validate ({valid:?})"
    );
    let rejected = inputs.len() - valid.len();
    assert!(rejected >= 2, "some seeds are invalid requests: {valid:?}");
}

#[test]
fn vmm_response_seeds_reach_every_parser() {
    let mut reached = Vec::new();
    for (name, input) in seeds("vmm_responses") {
        reached.push((name.clone(), replay(&name, &input, vmm_responses::run)));
    }
    let by = |what: &str, f: fn(&vmm_responses::Reached) -> bool| {
        let names: Vec<&str> = reached
            .iter()
            .filter(|(_, r)| f(r))
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(!names.is_empty(), "no seed reaches {what}");
        names
    };
    by("an error mapping", |r| r.error);
    by("vm.info's state", |r| r.ch_info_state);
    by("vm.info's size", |r| r.ch_info_size);
    by("vmm.ping", |r| r.ch_ping);
    by("vm.counters", |r| r.ch_counters);
    by("the event stream", |r| r.ch_events);
    by("GET /", |r| r.fc_instance);
    by("the metrics file", |r| r.fc_metrics);
}

#[test]
fn a_seed_status_line_is_read_as_the_status() {
    let (status, body) = vmm_responses::split(b"404\n[\"x\"]");
    assert_eq!((status.as_u16(), body), (404, &b"[\"x\"]"[..]));
    let (status, body) = vmm_responses::split(b"{}");
    assert_eq!((status.as_u16(), body), (200, &b"{}"[..]));
}
