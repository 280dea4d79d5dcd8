//! The Linux adapter against the real kernel, inside a network namespace
//! each test makes for itself on a dedicated thread (never the host's
//! interfaces): the namespace is left with the thread's end, and everything
//! in it goes with it. Needs root and /dev/net/tun; skipped loudly otherwise.

use super::*;
use crate::domain::network::{ManagedTap, tap_name};

/// Runs `f` on a fresh thread moved into a new, empty network namespace.
/// None (after a SKIPPED line) when this host cannot make one.
fn in_netns<T: Send + 'static>(test: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if rustix::process::geteuid().as_raw() != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        crate::test_skips::skip(test, "needs root and /dev/net/tun");
        return None;
    }
    let handle = std::thread::spawn(move || {
        // unshare affects only this thread, which ends after `f`: no worker
        // of any runtime ever runs in the namespace.
        #[allow(unsafe_code)]
        // SAFETY: unshare takes a flag word and touches no memory of ours.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    });
    match handle.join().expect("the namespace thread panicked") {
        Ok(v) => Some(v),
        Err(e) => {
            crate::test_skips::skip(test, &format!("cannot unshare a network namespace: {e}"));
            None
        }
    }
}

fn managed(name: &str, bridge: &str, pairs: u32) -> ManagedTap {
    ManagedTap {
        name: name.to_owned(),
        bridge: bridge.to_owned(),
        queue_pairs: pairs,
    }
}

#[test]
fn a_tap_is_made_joined_listed_and_deleted() {
    in_netns("a_tap_is_made_joined_listed_and_deleted", || {
        let net = LinuxNetwork;
        netlink::add_bridge("br-test").expect("bridge");
        let tap = managed(&tap_name("vm-1", 0), "br-test", 1);
        net.ensure_tap(&tap, None).expect("ensure");
        let link = netlink::link_by_name(&tap.name).unwrap().expect("exists");
        assert!(link.up, "{link:?}");
        assert_eq!(link.tap_multi_queue, Some((true, false)), "{link:?}");
        assert_eq!(link.tun_owner, None, "{link:?}");
        assert_eq!(
            net.controller_of(&tap.name).unwrap().as_deref(),
            Some("br-test")
        );
        // Idempotent: a second ensure changes nothing and does not fail.
        net.ensure_tap(&tap, None).expect("ensure again");
        assert_eq!(
            netlink::link_by_name(&tap.name).unwrap().unwrap().index,
            link.index
        );
        // Listed by prefix, with nothing else of that prefix.
        let other = managed(&tap_name("vm-2", 0), "br-test", 1);
        net.ensure_tap(&other, None).expect("ensure other");
        let mut listed = net.list_taps("vmcp").unwrap();
        listed.sort();
        let mut want = vec![tap.name.clone(), other.name.clone()];
        want.sort();
        assert_eq!(listed, want);
        assert!(net.remove_tap(&tap.name).unwrap());
        assert!(
            !net.remove_tap(&tap.name).unwrap(),
            "a second remove finds nothing"
        );
        assert_eq!(net.list_taps("vmcp").unwrap(), vec![other.name.clone()]);
        assert!(netlink::link_by_name(&tap.name).unwrap().is_none());
    });
}

#[test]
fn a_multi_queue_tap_has_the_flag_and_an_owner_the_uid() {
    in_netns(
        "a_multi_queue_tap_has_the_flag_and_an_owner_the_uid",
        || {
            let net = LinuxNetwork;
            netlink::add_bridge("br-mq").expect("bridge");
            let tap = managed("vmcpmqmqmqmqmqm", "br-mq", 4);
            net.ensure_tap(&tap, Some(4242)).expect("ensure");
            let link = netlink::link_by_name(&tap.name).unwrap().unwrap();
            assert_eq!(link.tap_multi_queue, Some((true, true)), "{link:?}");
            assert_eq!(link.tun_owner, Some(4242), "{link:?}");
            // The same name asked for single-queue is refused, naming the tap.
            let single = managed("vmcpmqmqmqmqmqm", "br-mq", 1);
            let e = net.ensure_tap(&single, None).unwrap_err();
            assert!(matches!(e, NetworkError::NameTaken { .. }), "{e}");
            assert!(e.to_string().contains("vmcpmqmqmqmqmqm"), "{e}");
        },
    );
}

#[test]
fn a_missing_bridge_is_named_and_leaves_no_tap() {
    in_netns("a_missing_bridge_is_named_and_leaves_no_tap", || {
        let net = LinuxNetwork;
        let tap = managed(&tap_name("vm-1", 0), "br-none", 1);
        let e = net.ensure_tap(&tap, None).unwrap_err();
        assert!(matches!(e, NetworkError::NoSuchBridge { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("br-none") && text.contains(&tap.name),
            "{text}"
        );
        assert!(net.list_taps("vmcp").unwrap().is_empty());
        // A "bridge" that is no bridge is refused the same way.
        let dummy = managed(&tap_name("vm-1", 1), "lo", 1);
        let e = net.ensure_tap(&dummy, None).unwrap_err();
        assert!(matches!(e, NetworkError::NoSuchBridge { .. }), "{e}");
        assert!(net.list_taps("vmcp").unwrap().is_empty());
    });
}

#[test]
fn a_name_held_by_another_kind_of_interface_is_taken() {
    in_netns("a_name_held_by_another_kind_of_interface_is_taken", || {
        let net = LinuxNetwork;
        netlink::add_bridge("br-a").expect("bridge");
        netlink::add_bridge("vmcpbrbrbrbrbrb").expect("a bridge with a tap's name");
        let e = net
            .ensure_tap(&managed("vmcpbrbrbrbrbrb", "br-a", 1), None)
            .unwrap_err();
        assert!(matches!(e, NetworkError::NameTaken { .. }), "{e}");
        assert!(e.to_string().contains("bridge"), "{e}");
        // Only taps are listed: the start-up sweep never takes the bridge for an orphan tap.
        let tap = managed(&tap_name("vm-1", 0), "br-a", 1);
        net.ensure_tap(&tap, None).expect("ensure");
        assert_eq!(net.list_taps("vmcp").unwrap(), vec![tap.name.clone()]);
    });
}
