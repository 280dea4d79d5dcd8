//! What a VMM answers is untrusted input too: a buggy, newer or hostile VMM
//! (or another client on its socket) chooses every byte. One input is an
//! HTTP answer, its first line the status (`500`) and the rest the body; it
//! goes through the parsers VMCP runs on VMM answers, each with what it
//! promises beyond not panicking:
//!
//! - Cloud Hypervisor: `error_from` (404/405/500 are InvalidState, anything
//!   else Protocol, both naming the endpoint), `vm.info` into `VmInfo` with
//!   `parse_state` (only CH's state names are accepted) and `size()`,
//!   `vmm.ping`, `vm.counters` summed by `sum_counters` (never below zero
//!   from counters that are not), and the event monitor's stream through
//!   `drain_events` (what it keeps is the unread end of the input, and
//!   draining that again finds nothing);
//! - Firecracker: `ok` (a success exactly for 2xx; a refused field only for
//!   400 and only the field the caller named; 5xx Unavailable; other
//!   statuses Protocol), `GET /` into `InstanceInfo` with `map_state` and
//!   its id through the VM id parser, and the metrics file through
//!   `MetricsReader`, which must sum the same however the file's bytes were
//!   split between reads.

use http::StatusCode;
use vmcp::adapters::outbound::cloud_hypervisor::client::{
    Counters, Ping, VmInfo, error_from, parse_state,
};
use vmcp::adapters::outbound::cloud_hypervisor::events::drain_events;
use vmcp::adapters::outbound::cloud_hypervisor::sum_counters;
use vmcp::adapters::outbound::firecracker::client::{InstanceInfo, ok};
use vmcp::adapters::outbound::firecracker::map_state;
use vmcp::adapters::outbound::firecracker::metrics::MetricsReader;
use vmcp::adapters::outbound::vmm::Response;
use vmcp::domain::VmId;
use vmcp::ports::HypervisorError;

/// The states `vm.info` may name (CH's `VmState`).
const CH_STATES: [&str; 5] = ["Created", "Running", "Shutdown", "Paused", "BreakPoint"];
/// The states Firecracker's `GET /` may name.
const FC_STATES: [&str; 3] = ["Not started", "Running", "Paused"];

/// Which parsers accepted one input, for the seed replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    /// An error status went through both backends' error mapping.
    pub error: bool,
    /// `vm.info` decoded and its size was read.
    pub ch_info_size: bool,
    /// `vm.info` decoded with a state CH names.
    pub ch_info_state: bool,
    /// `vmm.ping` decoded.
    pub ch_ping: bool,
    /// `vm.counters` decoded and was summed.
    pub ch_counters: bool,
    /// At least one event came out of the event stream.
    pub ch_events: bool,
    /// `GET /` decoded with a state Firecracker names.
    pub fc_instance: bool,
    /// At least one metrics line was summed.
    pub fc_metrics: bool,
}

/// Splits an input into status and body: a first line of three digits is
/// the status, else the whole input is the body of a 200.
pub fn split(data: &[u8]) -> (StatusCode, &[u8]) {
    if let [a, b, c, b'\n', body @ ..] = data
        && [a, b, c].iter().all(|d| d.is_ascii_digit())
    {
        let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
        if let Ok(status) = StatusCode::from_u16(code) {
            return (status, body);
        }
    }
    (StatusCode::OK, data)
}

fn cloud_hypervisor(r: &Response, reached: &mut Reached) {
    let status = r.status.as_u16();
    if !r.is_success() {
        reached.error = true;
        match error_from("vm.pause", r) {
            HypervisorError::InvalidState(m) => {
                assert!(matches!(status, 404 | 405 | 500), "{status}: {m}");
                assert!(m.starts_with("vm.pause: "), "{m}");
            }
            HypervisorError::Protocol(m) => {
                assert!(!matches!(status, 404 | 405 | 500), "{status}: {m}");
                assert!(
                    m.starts_with(&format!("vm.pause answered {}", r.status)),
                    "{m}"
                );
            }
            other => panic!("{status}: {other:?}"),
        }
    }
    if let Ok(info) = r.json::<VmInfo>() {
        let state = parse_state(&info.state);
        assert_eq!(
            state.is_ok(),
            CH_STATES.contains(&info.state.as_str()),
            "{:?}: {state:?}",
            info.state
        );
        reached.ch_info_state |= state.is_ok();
        if let Some(size) = info.size() {
            reached.ch_info_size = true;
            assert!(size.vcpu_count >= 0, "{size:?}");
        }
    }
    if r.json::<Ping>().is_ok() {
        reached.ch_ping = true;
    }
    if let Ok(counters) = r.json::<Counters>() {
        reached.ch_counters = true;
        let (net, disk) = sum_counters(&counters);
        if counters.values().flat_map(|d| d.values()).all(|v| *v >= 0) {
            for total in [
                net.bytes_received,
                net.bytes_transmitted,
                net.packets_received,
                net.packets_transmitted,
                disk.bytes_read,
                disk.bytes_written,
                disk.read_operations,
                disk.write_operations,
            ] {
                assert!(total >= 0, "{net:?} {disk:?} from {counters:?}");
            }
        }
    }
    let mut stream = r.body.to_vec();
    let events = drain_events(&mut stream);
    assert!(r.body.ends_with(&stream), "what is kept is the unread end");
    let kept = stream.clone();
    assert!(
        drain_events(&mut stream).is_empty(),
        "nothing new, no event"
    );
    assert_eq!(stream, kept, "nothing new, nothing consumed");
    reached.ch_events |= !events.is_empty();
}

fn firecracker(r: &Response, reached: &mut Reached) {
    let status = r.status.as_u16();
    let field = "config.storage[0]";
    match ok(r, Some(field)) {
        Ok(()) => assert!(r.is_success(), "{status} is not a success"),
        Err(e) => {
            assert!(!r.is_success(), "{status}: {e:?}");
            match &e {
                HypervisorError::InvalidConfig(c) => {
                    assert_eq!(status, 400, "{e:?}");
                    assert_eq!(c.field, field);
                }
                HypervisorError::InvalidState(_) => assert_eq!(status, 400, "{e:?}"),
                HypervisorError::Unavailable { .. } => {
                    assert!(r.status.is_server_error(), "{e:?}")
                }
                HypervisorError::Protocol(_) => {
                    assert!(status != 400 && !r.status.is_server_error(), "{e:?}")
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }
    if let Err(e) = ok(r, None) {
        assert!(!matches!(e, HypervisorError::InvalidConfig(_)), "{e:?}");
    }
    if let Ok(info) = r.json::<InstanceInfo>() {
        let state = map_state(&info.state);
        assert_eq!(
            state.is_ok(),
            FC_STATES.contains(&info.state.as_str()),
            "{:?}: {state:?}",
            info.state
        );
        reached.fc_instance |= state.is_ok();
        if let Ok(id) = VmId::parse(&info.id) {
            assert!(!id.as_str().contains('/'), "a valid id names a path");
            assert!(id.as_str() != "." && id.as_str() != "..");
        }
    }
    let mut whole = MetricsReader::new();
    whole.feed(&r.body);
    let n = r.body.len();
    for at in [n / 3, n / 2, 2 * n / 3] {
        let (a, b) = r.body.split_at(at);
        let mut pieces = MetricsReader::new();
        pieces.feed(a);
        pieces.feed(b);
        assert_eq!(pieces.network(), whole.network(), "split at {at}");
        assert_eq!(pieces.storage(), whole.storage(), "split at {at}");
        assert_eq!(
            pieces.skipped_lines(),
            whole.skipped_lines(),
            "split at {at}"
        );
    }
    reached.fc_metrics |=
        whole.network() != Default::default() || whole.storage() != Default::default();
}

/// One fuzz input.
pub fn run(data: &[u8]) -> Reached {
    let (status, body) = split(data);
    let r = Response::new(status, body.to_vec(), "PUT /drives/rootfs");
    let mut reached = Reached::default();
    cloud_hypervisor(&r, &mut reached);
    firecracker(&r, &mut reached);
    reached
}
