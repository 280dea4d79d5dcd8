//! The rest of a tap's life over rtnetlink (a synchronous request/answer
//! socket per call, as netavark does): look a link up, set it up and give
//! it a controller (bridge) in one RTM_NEWLINK, delete it, and dump the
//! links. `add_bridge` exists for the tests' namespaces and for operators'
//! tooling; VMCP itself never creates or removes bridges.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoTun, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// What VMCP needs to know about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Index of its controller (bridge), if any.
    pub controller: Option<u32>,
    /// `IFLA_INFO_KIND` (`tun`, `bridge`, ...), if the kernel reports one.
    pub kind: Option<String>,
    /// For a tun/tap device: whether it is a tap (not tun) and multi-queue.
    pub tap_multi_queue: Option<(bool, bool)>,
    /// For a tun/tap device with an owner: its uid.
    pub tun_owner: Option<u32>,
    /// Whether it is up.
    pub up: bool,
}

// IFLA_TUN_* attribute numbers (<linux/if_link.h>).
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFF_TAP_TYPE: u8 = 2;

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        controller: None,
        kind: None,
        tap_multi_queue: None,
        tun_owner: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Controller(c) => link.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Tun(tun)) => {
                            let (mut tap, mut mq) = (false, false);
                            for nla in tun {
                                let InfoTun::Other(nla) = nla else { continue };
                                let mut v = vec![0u8; netlink_packet_core::Nla::value_len(nla)];
                                netlink_packet_core::Nla::emit_value(nla, &mut v);
                                match netlink_packet_core::Nla::kind(nla) {
                                    IFLA_TUN_TYPE => tap = v.first() == Some(&IFF_TAP_TYPE),
                                    IFLA_TUN_MULTI_QUEUE => mq = v.first() == Some(&1),
                                    IFLA_TUN_OWNER => {
                                        link.tun_owner = v
                                            .get(..4)
                                            .and_then(|b| b.try_into().ok())
                                            .map(u32::from_ne_bytes);
                                    }
                                    _ => {}
                                }
                            }
                            link.tap_multi_queue = Some((tap, mq));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    Ok(s)
}

/// Sends `msg` and collects the link messages of the answer until the
/// acknowledgement or the end of the dump; a netlink error comes back as
/// the `io::Error` of its errno.
fn request(msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<LinkMessage>> {
    let s = socket()?;
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    s.send(&buf, 0)?;
    let mut links = Vec::new();
    loop {
        let (data, _) = s.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            if msg.header.sequence_number != 1 {
                // Not ours (cannot happen on a fresh connected socket); skip it.
            } else {
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(links),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(links),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => links.push(l),
                    _ => {}
                }
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
        // A single answer without NLM_F_MULTI and no ack requested ends here.
        if flags & NLM_F_ACK == 0 && flags & NLM_F_DUMP != NLM_F_DUMP {
            return Ok(links);
        }
    }
}

/// The link called `name`, or None.
pub fn link_by_name(name: &str) -> io::Result<Option<Link>> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    match request(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST) {
        Ok(links) => Ok(links.first().map(link_of)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The link with index `index`, or None.
pub fn link_by_index(index: u32) -> io::Result<Option<Link>> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    match request(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST) {
        Ok(links) => Ok(links.first().map(link_of)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every tun/tap link of this network namespace. The dump asks the kernel
/// for that kind only (`IFLA_LINKINFO` in the request: nothing else is sent
/// or parsed, however many other interfaces the host has); a kernel that
/// cannot filter (the tun module not loaded) answers every link, so the kind
/// is checked here as well.
pub fn tun_links() -> io::Result<Vec<Link>> {
    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Tun)]));
    Ok(request(
        RouteNetlinkMessage::GetLink(msg),
        NLM_F_REQUEST | NLM_F_DUMP,
    )?
    .iter()
    .map(link_of)
    .filter(|l| l.kind.as_deref() == Some("tun"))
    .collect())
}

/// Sets link `index` up, joined to `controller` when given, in one request.
pub fn set_up(index: u32, controller: Option<u32>) -> io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if let Some(c) = controller {
        msg.attributes.push(LinkAttribute::Controller(c));
    }
    request(RouteNetlinkMessage::NewLink(msg), NLM_F_REQUEST | NLM_F_ACK).map(|_| ())
}

/// Deletes link `index`.
pub fn delete(index: u32) -> io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    request(RouteNetlinkMessage::DelLink(msg), NLM_F_REQUEST | NLM_F_ACK).map(|_| ())
}

/// Creates the bridge `name` and sets it up (for tests and tooling).
pub fn add_bridge(name: &str) -> io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Bridge,
        )]));
    request(
        RouteNetlinkMessage::NewLink(msg),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )?;
    let link = link_by_name(name)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "bridge vanished after create"))?;
    set_up(link.index, None)
}
