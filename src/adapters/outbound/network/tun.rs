//! Creating a tap through `/dev/net/tun`: the kernel refuses to create tun
//! and tap devices over rtnetlink ("tun/tap creation via rtnetlink is not
//! supported"), so this is the one place VMCP talks to the kernel with
//! ioctls. `TUNSETIFF` with the flags the VMMs open their taps with
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and `IFF_MULTI_QUEUE` only for a
//! tap whose VMM opens several queue pairs: the kernel refuses a queue
//! whose multi-queue flag differs from the device's), `TUNSETOWNER` for a
//! VMM that runs as another user, then `TUNSETPERSIST` so the tap outlives
//! this descriptor and waits for the VMM.
// The three ioctls need `unsafe`; each call passes a pointer to a live,
// correctly sized `ifreq` or an integer, as the kernel's tun.c expects.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

// From <linux/if_tun.h>; the _IOW encoding is the same on x86_64 and aarch64.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_TUN_EXCL: libc::c_short = -0x8000; // 0x8000 as a c_short

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the
/// union is 24 bytes; the rest is padding).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The flags a tap is created with.
pub fn tap_flags(multi_queue: bool) -> libc::c_short {
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if multi_queue {
        flags |= IFF_MULTI_QUEUE;
    }
    flags
}

/// Creates the persistent tap `name` (which must not exist: `EBUSY` if it
/// does), owned by `owner` when given. On an error after the device exists
/// it is gone again when the descriptor closes (it was never made persistent).
pub fn create_tap(name: &str, multi_queue: bool, owner: Option<u32>) -> io::Result<()> {
    if name.is_empty() || name.len() > 15 || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an interface name is 1 to 15 bytes",
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: tap_flags(multi_queue) | IFF_TUN_EXCL,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = tun.as_raw_fd();
    // SAFETY: `fd` is open for the whole call; `req` is a live ifreq of the size the kernel reads.
    if unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(uid) = owner {
        // SAFETY: TUNSETOWNER takes the uid by value.
        if unsafe { libc::ioctl(fd, TUNSETOWNER as _, libc::c_ulong::from(uid)) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: TUNSETPERSIST takes 0 or 1 by value.
    if unsafe { libc::ioctl(fd, TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernels_size_and_flags_match_the_vmms() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        // Firecracker's tap.rs and Cloud Hypervisor's single-queue open: TAP | NO_PI | VNET_HDR.
        assert_eq!(tap_flags(false), 0x5002);
        assert_eq!(tap_flags(true), 0x5102);
        assert_eq!(IFF_TUN_EXCL as u16, 0x8000);
    }

    #[test]
    fn names_the_kernel_cannot_take_are_refused_before_any_ioctl() {
        for bad in ["", "sixteen-bytes-xx", "a\0b"] {
            let e = create_tap(bad, false, None).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
