//! Managed networking, the pure part: which tap a VM's interface gets when
//! the caller names a bridge instead of a tap, the guest MAC VMCP generates
//! for it, and the rules a config's interfaces must follow on this host
//! (one tap per VM, no caller-given tap in VMCP's own name space).
//!
//! Names and MACs are derived, never drawn: the same VM id and interface
//! give the same tap and MAC on every create, retry, restart and respawn, so
//! a retried CreateVm is idempotent, a restarted VMCP finds its taps by
//! name, and the start-up sweep can tell VMCP's taps from everyone else's by
//! their prefix. The hash is written out here (FNV-1a, then a 64-bit
//! finaliser) so that it cannot change under VMCP with a toolchain update.

use std::net::Ipv4Addr;

use super::config::{GuestAddress, MAX_TAP_NAME_LEN, NetworkInterface, VmConfig, VmConfigError};
use super::{VmError, VmId};

/// Prefix of every tap VMCP creates; nothing else may use it.
pub const TAP_PREFIX: &str = "vmcp";
/// Hash characters after the prefix: base32, 5 bits each (55 bits in all).
pub const TAP_HASH_CHARS: usize = 11;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Stable 64-bit hash of `parts`, each part length-prefixed so that
/// ("ab","c") and ("a","bc") differ.
fn stable_hash(domain: &[u8], parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(domain);
    for p in parts {
        eat(&(p.len() as u64).to_le_bytes());
        eat(p);
    }
    // splitmix64's finaliser: every input bit reaches every output bit.
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The tap VMCP creates for interface number `index` of VM `vm_id`:
/// `vmcp` and 11 base32 characters, 15 bytes (IFNAMSIZ - 1).
pub fn tap_name(vm_id: &str, index: usize) -> String {
    let mut h = stable_hash(
        b"vmcp-tap",
        &[vm_id.as_bytes(), &(index as u64).to_le_bytes()],
    );
    let mut name = String::with_capacity(MAX_TAP_NAME_LEN);
    name.push_str(TAP_PREFIX);
    for _ in 0..TAP_HASH_CHARS {
        name.push(char::from(BASE32[(h & 31) as usize]));
        h >>= 5;
    }
    name
}

/// Whether `name` is shaped like a tap VMCP creates (its prefix, then its
/// hash characters): what the start-up sweep may remove.
pub fn is_managed_tap(name: &str) -> bool {
    name.len() == TAP_PREFIX.len() + TAP_HASH_CHARS
        && name.starts_with(TAP_PREFIX)
        && name[TAP_PREFIX.len()..]
            .bytes()
            .all(|b| BASE32.contains(&b))
}

/// The guest MAC VMCP gives interface `nic_id` of VM `vm_id` when the caller
/// gives none: locally administered, unicast, stable.
pub fn generated_mac(vm_id: &str, nic_id: &str) -> String {
    let h = stable_hash(b"vmcp-mac", &[vm_id.as_bytes(), nic_id.as_bytes()]).to_be_bytes();
    let mut mac = [h[0], h[1], h[2], h[3], h[4], h[5]];
    // Locally administered (bit 1 set), unicast (bit 0 clear).
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether VMCP creates this interface's tap (the caller named a bridge).
pub fn is_managed(nic: &NetworkInterface) -> bool {
    !nic.bridge.is_empty()
}

/// Gives every interface that names neither a tap nor a bridge the host's
/// default bridge (`UNKEY_VMCP_BRIDGE`; empty means none).
pub fn apply_default_bridge(config: &mut VmConfig, default_bridge: &str) {
    if default_bridge.is_empty() {
        return;
    }
    for nic in &mut config.network {
        if nic.tap_device.is_empty() && nic.bridge.is_empty() {
            nic.bridge = default_bridge.to_owned();
        }
    }
}

/// Fills in what VMCP chooses for VM `id`'s managed interfaces (the tap, and
/// the MAC when the caller gave none), and checks the caller's taps: a
/// managed interface's `tap_device` may only be empty or the name VMCP
/// derives (as GetVmInfo shows it, so a config read back can be sent again);
/// a caller's own tap may not use VMCP's prefix. Errors name the field.
pub fn assign(config: &mut VmConfig, id: &VmId) -> Result<(), VmConfigError> {
    for (i, nic) in config.network.iter_mut().enumerate() {
        let at = format!("config.network[{i}]");
        if is_managed(nic) {
            let derived = tap_name(id.as_str(), i);
            if !nic.tap_device.is_empty() && nic.tap_device != derived {
                return Err(VmConfigError::new(
                    format!("{at}.tap_device"),
                    format!(
                        "set either tap_device or bridge: with bridge {:?} VMCP creates the tap itself ({derived}), got {:?}",
                        nic.bridge, nic.tap_device
                    ),
                ));
            }
            nic.tap_device = derived;
            if nic.mac_address.is_empty() {
                nic.mac_address = generated_mac(id.as_str(), &nic.id);
            }
        } else if nic.tap_device.starts_with(TAP_PREFIX) {
            return Err(VmConfigError::new(
                format!("{at}.tap_device"),
                format!(
                    "the prefix {TAP_PREFIX:?} is reserved for taps VMCP creates; name a bridge instead, or a tap of your own, got {:?}",
                    nic.tap_device
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a config whose taps another VM of this host already uses
/// (`others`: the configs of the VMs that exist, by id). The error names
/// the field, the tap and the other VM.
pub fn check_taps_free<'a>(
    config: &VmConfig,
    others: impl IntoIterator<Item = (&'a VmId, &'a VmConfig)>,
) -> Result<(), VmError> {
    let others: Vec<_> = others.into_iter().collect();
    for (i, nic) in config.network.iter().enumerate() {
        let uses = |other: &VmConfig| other.network.iter().any(|o| o.tap_device == nic.tap_device);
        if let Some((other, _)) = others.iter().find(|(_, c)| uses(c)) {
            return Err(VmError::Incompatible(format!(
                "config.network[{i}].tap_device: tap {} is already used by vm {other}",
                nic.tap_device
            )));
        }
    }
    Ok(())
}

/// The config a restored VM starts from: an interface the restore gives a
/// tap of the caller's (`overridden`, by interface id) is no longer VMCP's
/// to manage; every other managed interface gets the restored VM's own tap
/// (derived again from the new id by [`assign`]), so a clone never shares
/// its source's tap.
pub fn for_restore(config: &mut VmConfig, overridden: &[&str]) {
    for nic in &mut config.network {
        if !is_managed(nic) {
            continue;
        }
        if overridden.contains(&nic.id.as_str()) {
            nic.bridge.clear();
        } else {
            nic.tap_device.clear();
        }
    }
}

/// A tap VMCP manages for a VM: what the host must have before its VMM starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedTap {
    /// The tap's name.
    pub name: String,
    /// The bridge it joins.
    pub bridge: String,
    /// Queue pairs the VMM opens (more than 1 only for a multi-queue tap).
    pub queue_pairs: u32,
}

/// The taps VMCP manages for `config`, with `multi_queue` telling whether
/// the backend opens one queue pair per vCPU (Cloud Hypervisor does when
/// configured so; Firecracker never does).
pub fn managed_taps(config: &VmConfig, multi_queue: bool) -> Vec<ManagedTap> {
    let pairs = if multi_queue {
        u32::try_from(config.cpu.vcpu_count.max(1)).unwrap_or(1)
    } else {
        1
    };
    config
        .network
        .iter()
        .filter(|n| is_managed(n))
        .map(|n| ManagedTap {
            name: n.tap_device.clone(),
            bridge: n.bridge.clone(),
            queue_pairs: pairs,
        })
        .collect()
}

fn ipv4(field: &str, text: &str) -> Result<Ipv4Addr, VmConfigError> {
    text.parse::<Ipv4Addr>().map_err(|_| {
        let why = if text.parse::<std::net::Ipv6Addr>().is_ok() {
            "IPv4 only (the kernel's ip= takes IPv4)".to_owned()
        } else {
            format!("must be an IPv4 address, got {text:?}")
        };
        VmConfigError::new(field, why)
    })
}

/// Checks a guest address: `address` an IPv4 CIDR, `gateway` empty or
/// IPv4 (inside the address's subnet), at most two IPv4 `dns` servers.
pub fn validate_guest_address(at: &str, g: &GuestAddress) -> Result<(), VmConfigError> {
    let field = format!("{at}.address");
    let Some((addr, prefix)) = g.address.split_once('/') else {
        return Err(VmConfigError::new(
            field,
            format!("must be CIDR like 10.0.0.2/24, got {:?}", g.address),
        ));
    };
    let addr = ipv4(&field, addr)?;
    let prefix: u8 = match prefix.parse() {
        Ok(p) if p <= 32 => p,
        _ => {
            return Err(VmConfigError::new(
                field,
                format!("the prefix length must be 0 to 32, got {prefix:?}"),
            ));
        }
    };
    if !g.gateway.is_empty() {
        let gw = ipv4(&format!("{at}.gateway"), &g.gateway)?;
        let mask = netmask(prefix);
        if u32::from(gw) & mask != u32::from(addr) & mask {
            return Err(VmConfigError::new(
                format!("{at}.gateway"),
                format!("{gw} is outside {}", g.address),
            ));
        }
    }
    if g.dns.len() > 2 {
        return Err(VmConfigError::new(
            format!("{at}.dns"),
            format!(
                "at most 2 servers (the kernel's ip= takes two), got {}",
                g.dns.len()
            ),
        ));
    }
    for (i, d) in g.dns.iter().enumerate() {
        ipv4(&format!("{at}.dns[{i}]"), d)?;
    }
    Ok(())
}

fn netmask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

/// The kernel `ip=` argument for the one interface with a guest address
/// (`ip=<addr>::<gw>:<mask>::eth<index>:off[:<dns0>[:<dns1>]]`), if any.
/// Assumes a validated config.
pub fn ip_arg(config: &VmConfig) -> Option<String> {
    let (i, g) = config
        .network
        .iter()
        .enumerate()
        .find_map(|(i, n)| n.guest_address.as_ref().map(|g| (i, g)))?;
    let (addr, prefix) = g.address.split_once('/')?;
    let mask = Ipv4Addr::from(netmask(prefix.parse().ok()?));
    let mut arg = format!("ip={addr}::{}:{mask}::eth{i}:off", g.gateway);
    for d in &g.dns {
        arg.push(':');
        arg.push_str(d);
    }
    Some(arg)
}

/// The kernel command line a backend passes: the caller's, plus `ip=` for a guest address.
pub fn kernel_args(config: &VmConfig) -> String {
    match ip_arg(config) {
        Some(ip) if config.boot.kernel_args.is_empty() => ip,
        Some(ip) => format!("{} {ip}", config.boot.kernel_args),
        None => config.boot.kernel_args.clone(),
    }
}

/// A guest address and an `ip=` of the caller's own would contradict each other.
pub fn check_ip_arg(config: &VmConfig) -> Result<(), VmConfigError> {
    let Some(i) = config
        .network
        .iter()
        .position(|n| n.guest_address.is_some())
    else {
        return Ok(());
    };
    if config
        .boot
        .kernel_args
        .split_whitespace()
        .any(|w| w.starts_with("ip="))
    {
        return Err(VmConfigError::new(
            format!("config.network[{i}].guest_address"),
            "config.boot.kernel_args has an ip= of its own; set one or the other",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn id(s: &str) -> VmId {
        VmId::parse(s).expect("valid id")
    }

    fn nic(id: &str, tap: &str, bridge: &str) -> NetworkInterface {
        NetworkInterface {
            id: id.into(),
            tap_device: tap.into(),
            bridge: bridge.into(),
            ..Default::default()
        }
    }

    fn config(nics: Vec<NetworkInterface>) -> VmConfig {
        let mut c = VmConfig::default();
        c.cpu.vcpu_count = 2;
        c.network = nics;
        c
    }

    #[test]
    fn tap_names_are_stable_and_shaped() {
        // Pinned: a change of the hash would orphan every tap of a running host.
        assert_eq!(tap_name("vm-1", 0), tap_name("vm-1", 0));
        assert_ne!(tap_name("vm-1", 0), tap_name("vm-1", 1));
        assert_ne!(tap_name("vm-1", 0), tap_name("vm-2", 0));
        let n = tap_name("vm-1", 0);
        assert_eq!(n.len(), 15);
        assert!(is_managed_tap(&n), "{n}");
        assert!(!is_managed_tap("vmcp0"));
        assert!(!is_managed_tap("tap0"));
        assert!(!is_managed_tap("vmcpAAAAAAAAAAA"));
    }

    #[test]
    fn pinned_values_do_not_drift() {
        // If this fails, the hash changed: taps of VMs created before would be swept as orphans.
        let (tap, mac) = (tap_name("vm-a", 0), generated_mac("vm-a", "eth0"));
        assert_eq!(tap, tap_name("vm-a", 0));
        assert_eq!(stable_hash(b"x", &[b"a"]), stable_hash(b"x", &[b"a"]));
        assert_ne!(
            stable_hash(b"x", &[b"ab", b"c"]),
            stable_hash(b"x", &[b"a", b"bc"])
        );
        assert_eq!((tap.as_str(), mac.as_str()), (PINNED_TAP, PINNED_MAC));
    }
    const PINNED_TAP: &str = "vmcp5ml3rxbd7xn";
    const PINNED_MAC: &str = "1e:72:0b:90:0e:b0";

    #[test]
    fn assign_fills_managed_interfaces_only() {
        let vm = id("vm-a");
        let mut c = config(vec![nic("eth0", "", "br0"), nic("eth1", "tap7", "")]);
        assign(&mut c, &vm).unwrap();
        assert_eq!(c.network[0].tap_device, tap_name("vm-a", 0));
        assert_eq!(c.network[0].mac_address, generated_mac("vm-a", "eth0"));
        assert_eq!(c.network[1].tap_device, "tap7");
        assert_eq!(
            c.network[1].mac_address, "",
            "a caller's tap keeps the VMM's MAC"
        );
        // Assigning again (a retry, a config read back) changes nothing.
        let again = c.clone();
        assign(&mut c, &vm).unwrap();
        assert_eq!(c, again);
        // A caller's MAC is kept.
        let mut c = config(vec![nic("eth0", "", "br0")]);
        c.network[0].mac_address = "52:54:00:00:00:01".into();
        assign(&mut c, &vm).unwrap();
        assert_eq!(c.network[0].mac_address, "52:54:00:00:00:01");
    }

    #[test]
    fn assign_refuses_a_foreign_tap_with_a_bridge_and_the_reserved_prefix() {
        let vm = id("vm-a");
        let mut c = config(vec![nic("eth0", "tap0", "br0")]);
        assert_eq!(
            assign(&mut c, &vm).unwrap_err().field,
            "config.network[0].tap_device"
        );
        let mut c = config(vec![nic("eth0", "tap0", ""), nic("eth1", "vmcpfoo", "")]);
        assert_eq!(
            assign(&mut c, &vm).unwrap_err().field,
            "config.network[1].tap_device"
        );
    }

    #[test]
    fn default_bridge_applies_only_where_nothing_is_named() {
        let mut c = config(vec![
            nic("a", "", ""),
            nic("b", "tap1", ""),
            nic("c", "", "br9"),
        ]);
        apply_default_bridge(&mut c, "");
        assert_eq!(c.network[0].bridge, "");
        apply_default_bridge(&mut c, "br0");
        let bridges: Vec<_> = c.network.iter().map(|n| n.bridge.as_str()).collect();
        assert_eq!(bridges, ["br0", "", "br9"]);
    }

    #[test]
    fn a_tap_another_vm_uses_is_refused_naming_both() {
        let (a, b) = (id("vm-a"), id("vm-b"));
        let other = config(vec![nic("eth0", "tap0", "")]);
        let mine = config(vec![nic("eth0", "tap1", ""), nic("eth1", "tap0", "")]);
        let err = check_taps_free(&mine, [(&a, &other)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.network[1].tap_device"), "{err}");
        assert!(err.contains("tap0") && err.contains("vm-a"), "{err}");
        let free = config(vec![nic("eth0", "tap2", "")]);
        check_taps_free(&free, [(&a, &other)]).unwrap();
        let _ = b;
    }

    #[test]
    fn restore_gives_managed_interfaces_their_own_tap() {
        let src = id("vm-src");
        let mut c = config(vec![
            nic("eth0", "", "br0"),
            nic("eth1", "", "br0"),
            nic("eth2", "t", ""),
        ]);
        assign(&mut c, &src).unwrap();
        for_restore(&mut c, &["eth1"]);
        c.network[1].tap_device = "mytap".into();
        let clone = id("vm-clone");
        assign(&mut c, &clone).unwrap();
        assert_eq!(c.network[0].tap_device, tap_name("vm-clone", 0));
        assert_eq!(c.network[0].bridge, "br0");
        assert_eq!(
            (
                c.network[1].tap_device.as_str(),
                c.network[1].bridge.as_str()
            ),
            ("mytap", "")
        );
        assert_eq!(c.network[2].tap_device, "t");
    }

    #[test]
    fn managed_taps_are_multi_queue_only_when_asked() {
        let mut c = config(vec![nic("eth0", "", "br0"), nic("eth1", "t", "")]);
        assign(&mut c, &id("vm-a")).unwrap();
        let single = managed_taps(&c, false);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].queue_pairs, 1);
        assert_eq!(managed_taps(&c, true)[0].queue_pairs, 2);
    }

    fn addressed(address: &str, gateway: &str, dns: &[&str]) -> VmConfig {
        let mut n = nic("eth0", "tap0", "");
        n.guest_address = Some(GuestAddress {
            address: address.into(),
            gateway: gateway.into(),
            dns: dns.iter().map(|d| (*d).to_owned()).collect(),
        });
        let mut c = config(vec![nic("lan", "tap1", ""), n]);
        c.boot.kernel_args = "console=ttyS0".into();
        c
    }

    #[test]
    fn a_guest_address_becomes_the_kernels_ip_argument() {
        let c = addressed("10.0.0.2/24", "10.0.0.1", &["1.1.1.1", "9.9.9.9"]);
        assert_eq!(
            kernel_args(&c),
            "console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0::eth1:off:1.1.1.1:9.9.9.9"
        );
        let c = addressed("192.168.7.9/32", "", &[]);
        assert_eq!(
            ip_arg(&c).unwrap(),
            "ip=192.168.7.9:::255.255.255.255::eth1:off"
        );
        let c = config(vec![nic("eth0", "tap0", "")]);
        assert_eq!(ip_arg(&c), None);
    }

    #[test]
    fn bad_guest_addresses_are_refused_naming_the_field() {
        let at = "config.network[1].guest_address";
        for (address, gateway, dns, field) in [
            ("10.0.0.2", "", vec![], "address"),
            ("10.0.0.2/33", "", vec![], "address"),
            ("fd00::2/64", "", vec![], "address"),
            ("10.0.0.x/24", "", vec![], "address"),
            ("10.0.0.2/24", "10.0.1.1", vec![], "gateway"),
            ("10.0.0.2/24", "gw", vec![], "gateway"),
            (
                "10.0.0.2/24",
                "",
                vec!["1.1.1.1", "2.2.2.2", "3.3.3.3"],
                "dns",
            ),
            ("10.0.0.2/24", "", vec!["one"], "dns[0]"),
        ] {
            let c = addressed(address, gateway, &dns);
            let n = &c.network[1];
            let e = validate_guest_address(at, n.guest_address.as_ref().unwrap()).unwrap_err();
            assert_eq!(
                e.field,
                format!("{at}.{field}"),
                "{address} {gateway} {dns:?}: {e}"
            );
        }
        let mut c = addressed("10.0.0.2/24", "", &[]);
        c.boot.kernel_args = "console=ttyS0 ip=dhcp".into();
        assert_eq!(check_ip_arg(&c).unwrap_err().field, at);
    }

    proptest! {
        /// Names stay unique across many VM ids and interfaces, fit IFNAMSIZ,
        /// and use only the prefix and base32 characters.
        #[test]
        fn tap_names_are_unique_short_and_clean(ids in proptest::collection::hash_set("[a-z0-9-]{1,40}", 1..400)) {
            let mut seen = HashSet::new();
            for vm in &ids {
                for i in 0..4 {
                    let n = tap_name(vm, i);
                    prop_assert!(n.len() <= MAX_TAP_NAME_LEN);
                    prop_assert!(is_managed_tap(&n));
                    prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
                    prop_assert!(seen.insert(n.clone()), "collision on {}", n);
                }
            }
        }

        /// Generated MACs are locally administered unicast and differ per VM and interface.
        #[test]
        fn generated_macs_are_local_unicast(vm in "[a-z0-9-]{1,40}", a in "[a-z0-9]{1,8}", b in "[a-z0-9]{1,8}") {
            let m = generated_mac(&vm, &a);
            let first = u8::from_str_radix(&m[..2], 16).unwrap();
            prop_assert_eq!(first & 0x01, 0, "multicast bit set in {}", m);
            prop_assert_eq!(first & 0x02, 2, "local bit clear in {}", m);
            prop_assert_eq!(m.len(), 17);
            if a != b {
                prop_assert_ne!(m, generated_mac(&vm, &b));
            }
        }
    }
}
