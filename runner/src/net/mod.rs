//! Guest networking and published ports.
//!
//! * `user` (the default on the QEMU backend): QEMU's user-mode network stack
//!   (libslirp), or on the KVM backend passt (Debian's `passt`) connected to
//!   the VMM's virtio-net by a socket pair. No root, no tap: the guest is
//!   10.0.2.15/24 behind a NAT with gateway 10.0.2.2 (which is also the host's
//!   loopback, reachable as `host.hyper.internal`) and DNS at 10.0.2.3; `-p`
//!   becomes a forwarding rule of the user-mode stack on a loopback port that
//!   hyperboot's relay serves, so published ports close when the VM ends.
//! * `tap[:NAME]` (needs CAP_NET_ADMIN): a tap device hyperboot creates and
//!   addresses (a /30 per VM: host .1, guest .2), virtio-net on it, `-p`
//!   served by a TCP forwarder in hyperboot. Outbound traffic beyond the host
//!   needs the host's own routing/NAT, as with any tap.
//! * `none`: only the loopback interface.
//!
//! The guest is configured statically by hyperinit from the run
//! configuration (no DHCP client in the guest).
//!
//! Here: the options and their planning; the tap in [`tap`], passt in
//! [`passt`], hyperboot's relay for published TCP ports in [`relay`].

pub mod passt;
pub mod relay;
pub mod tap;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;

use hyper_contract::Network;

/// Why the network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("-p/-P need a network: drop --net none")]
    NeedsNetwork,
    #[error("the image's ExposedPorts")]
    Exposed(#[source] PublishError),
    #[error("cannot publish {guest}/{proto} on {addr}")]
    Bind {
        guest: u16,
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("-p .../udp is not supported in tap mode yet (use --net user)")]
    UdpOnTap,
    #[error(
        "--net redirect: the guest has the interface's own address; -p/-P publish nothing there"
    )]
    PublishOnRedirect,
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error(transparent)]
    Passt(#[from] passt::PasstError),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
}

/// A `-p` value that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("-p {spec:?}: {why} (expected [HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|/udp])")]
pub struct PublishError {
    spec: String,
    why: String,
}

/// A `--net` value that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--net {0:?}: expected none, user, tap, tap:NAME or redirect[:NAME] (names at most 15 characters)")]
pub struct NetModeError(String);

/// `--net`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetMode {
    /// `user` on the QEMU backend, `none` on the KVM backend unless ports are published.
    #[default]
    Auto,
    None,
    User,
    Tap(Option<String>),
    /// `redirect[:IFACE]`: a tap joined to IFACE, an interface of
    /// hyperboot's network namespace (a pod's veth), by tc redirects both
    /// ways; the guest takes over IFACE's MAC, IPv4 address and default
    /// route. Without a name, the namespace's one interface with an address.
    Redirect(Option<String>),
}

impl std::str::FromStr for NetMode {
    type Err = NetModeError;
    fn from_str(s: &str) -> Result<Self, NetModeError> {
        let tap = |n: &str| !n.is_empty() && n.len() < 16 && !n.contains('/');
        match s {
            "none" => Ok(NetMode::None),
            "user" => Ok(NetMode::User),
            "tap" => Ok(NetMode::Tap(None)),
            "redirect" => Ok(NetMode::Redirect(None)),
            _ => match (s.strip_prefix("tap:"), s.strip_prefix("redirect:")) {
                (Some(n), _) if tap(n) => Ok(NetMode::Tap(Some(n.to_string()))),
                (_, Some(n)) if tap(n) => Ok(NetMode::Redirect(Some(n.to_string()))),
                _ => Err(NetModeError(s.to_string())),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One `-p [HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|/udp]`; host port 0 means any free one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} -> {}:{}",
            self.guest_port,
            self.proto.name(),
            self.host_ip,
            self.host_port
        )
    }
}

fn port(s: &str, what: &str, zero_ok: bool) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => Err(format!("{what} port 0")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("bad {what} port {s:?}")),
    }
}

/// Parses a `-p` value as Docker does (IPv4 host addresses).
pub fn parse_publish(s: &str) -> Result<PortMap, PublishError> {
    let err = |why: String| PublishError {
        spec: s.to_string(),
        why,
    };
    let (spec, proto) = match s.rsplit_once('/') {
        Some((a, "tcp")) => (a, Proto::Tcp),
        Some((a, "udp")) => (a, Proto::Udp),
        Some((_, p)) => return Err(err(format!("unknown protocol {p:?}"))),
        None => (s, Proto::Tcp),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (ip, host, guest) = match parts.as_slice() {
        [g] => ("0.0.0.0", "0", *g),
        [h, g] => ("0.0.0.0", *h, *g),
        [ip, h, g] => (*ip, if h.is_empty() { "0" } else { *h }, *g),
        _ => return Err(err("too many fields".into())),
    };
    let host_ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| err(format!("bad host address {ip:?}")))?;
    Ok(PortMap {
        host_ip,
        host_port: port(host, "host", true).map_err(err)?,
        guest_port: port(guest, "guest", false).map_err(err)?,
        proto,
    })
}

/// The networking a boot asked for.
#[derive(Debug, Clone, Default)]
pub struct NetOptions {
    pub mode: NetMode,
    pub publish: Vec<PortMap>,
    /// `-P`: every ExposedPort of the image on a free host port.
    pub publish_all: bool,
    /// `--dns`: name servers for the guest (default: the network's own).
    pub dns: Vec<String>,
}

impl NetOptions {
    /// Whether anything beyond the default was asked for.
    pub fn requested(&self) -> bool {
        self.mode != NetMode::Auto || !self.publish.is_empty() || self.publish_all
    }
}

/// How the guest is connected.
#[derive(Debug)]
pub enum Link {
    /// QEMU user-mode networking.
    User,
    /// A tap device hyperboot created (descriptor inherited by QEMU); with
    /// `joined`, the interface its traffic is redirected to and from.
    Tap {
        fd: OwnedFd,
        name: String,
        joined: Option<tap::Joined>,
    },
}

/// A decided network: the link, the guest's configuration, the resolved ports.
#[derive(Debug)]
pub struct Plan {
    pub link: Link,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    pub guest: Network,
    pub ports: Vec<PortMap>,
    /// User mode: the loopback port QEMU forwards for each TCP entry of `ports`.
    pub internal: Vec<u16>,
}

impl Plan {
    /// Where hyperboot's relay sends a published TCP port's connections.
    pub fn upstream(&self, p: &PortMap) -> SocketAddr {
        match self.link {
            Link::User => {
                let i = self
                    .ports
                    .iter()
                    .filter(|q| q.proto == Proto::Tcp)
                    .position(|q| q == p)
                    .expect("a planned port");
                SocketAddr::from((Ipv4Addr::LOCALHOST, self.internal[i]))
            }
            Link::Tap { .. } => {
                let guest: Ipv4Addr = self.guest.address.parse().expect("own address");
                SocketAddr::from((guest, p.guest_port))
            }
        }
    }
}

const USER_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// Resolves `-P` and free host ports, checks every host port can be bound,
/// and prepares the link. `None` when the guest gets no network. Without
/// `publish` (`hyperboot prepare`), the guest gets the card the run will
/// give it but no host port is touched: the ports may be held by the app's
/// running VM, the one a prepared snapshot is to replace.
pub fn plan(
    o: &NetOptions,
    exposed: &[String],
    qemu_backend: bool,
    publish: bool,
) -> Result<Option<Plan>, NetError> {
    let mut ports = o.publish.clone();
    if o.publish_all {
        if exposed.is_empty() {
            tracing::info!("-P: the image exposes no ports");
        }
        for e in exposed {
            let mut m = parse_publish(e).map_err(NetError::Exposed)?;
            m.host_port = 0;
            ports.push(m);
        }
    }
    let mode = match &o.mode {
        NetMode::Auto if qemu_backend || !ports.is_empty() => NetMode::User,
        NetMode::Auto => NetMode::None,
        m => m.clone(),
    };
    if mode == NetMode::None {
        if !ports.is_empty() {
            return Err(NetError::NeedsNetwork);
        }
        return Ok(None);
    }
    if !publish {
        ports.clear();
    }
    for p in &mut ports {
        reserve(p)?;
    }
    let announce = o.publish_all || o.publish.iter().any(|p| p.host_port == 0);
    if announce {
        for p in &ports {
            tracing::info!("published {p}");
        }
    }
    match mode {
        NetMode::User => Ok(Some(Plan {
            internal: ports
                .iter()
                .filter(|p| p.proto == Proto::Tcp)
                .map(|_| {
                    let mut q = PortMap {
                        host_ip: Ipv4Addr::LOCALHOST,
                        host_port: 0,
                        guest_port: 1,
                        proto: Proto::Tcp,
                    };
                    reserve(&mut q).map(|()| q.host_port)
                })
                .collect::<Result<_, _>>()?,
            link: Link::User,
            mac: GUEST_MAC,
            guest: Network {
                interface: "eth0".into(),
                address: USER_GUEST.to_string(),
                prefix: 24,
                gateway: "10.0.2.2".into(),
                dns: if o.dns.is_empty() {
                    vec!["10.0.2.3".into()]
                } else {
                    o.dns.clone()
                },
                hosts: vec!["10.0.2.2 host.hyper.internal".into()],
                ..Default::default()
            },
            ports,
        })),
        NetMode::Tap(name) => {
            if ports.iter().any(|p| p.proto == Proto::Udp) {
                return Err(NetError::UdpOnTap);
            }
            let (fd, name) = tap::create(name.as_deref())?;
            let (host, guest) = tap::addresses(&name)?;
            tap::configure_host_side(&name, host)?;
            let dns = if o.dns.is_empty() {
                tap::host_nameservers()
            } else {
                o.dns.clone()
            };
            Ok(Some(Plan {
                link: Link::Tap {
                    fd,
                    name,
                    joined: None,
                },
                mac: GUEST_MAC,
                guest: Network {
                    interface: "eth0".into(),
                    address: guest.to_string(),
                    prefix: 30,
                    gateway: host.to_string(),
                    dns,
                    hosts: vec![format!("{host} host.hyper.internal")],
                    ..Default::default()
                },
                ports,
                internal: vec![],
            }))
        }
        NetMode::Redirect(iface) => {
            if !ports.is_empty() {
                return Err(NetError::PublishOnRedirect);
            }
            let found = tap::interface(iface.as_deref())?;
            let (fd, name) = tap::create(None)?;
            let joined = tap::join(&name, &found)?;
            let dns = if o.dns.is_empty() {
                tap::host_nameservers()
            } else {
                o.dns.clone()
            };
            Ok(Some(Plan {
                link: Link::Tap {
                    fd,
                    name,
                    joined: Some(joined),
                },
                mac: found.mac,
                guest: Network {
                    interface: "eth0".into(),
                    address: found.address.to_string(),
                    prefix: found.prefix,
                    gateway: found.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    dns,
                    mtu: Some(found.mtu),
                    ..Default::default()
                },
                ports,
                internal: vec![],
            }))
        }
        NetMode::None | NetMode::Auto => Ok(None),
    }
}

/// Picks a free port for host port 0 and checks the port can be bound.
fn reserve(p: &mut PortMap) -> Result<(), NetError> {
    let addr = SocketAddr::new(IpAddr::V4(p.host_ip), p.host_port);
    let bound = match p.proto {
        Proto::Tcp => TcpListener::bind(addr).and_then(|l| l.local_addr()),
        Proto::Udp => std::net::UdpSocket::bind(addr).and_then(|s| s.local_addr()),
    };
    match bound {
        Ok(a) => {
            p.host_port = a.port();
            Ok(())
        }
        Err(source) => Err(NetError::Bind {
            guest: p.guest_port,
            proto: p.proto.name(),
            addr,
            source,
        }),
    }
}

/// The guest's MAC address (QEMU's default one, as on the QEMU backend).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_as_docker() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.host_ip, p.host_port, p.guest_port, p.proto),
            (Ipv4Addr::UNSPECIFIED, 8080, 80, Proto::Tcp)
        );
        let p = parse_publish("127.0.0.1:9000:90/udp").unwrap();
        assert_eq!(
            (p.host_ip, p.host_port, p.guest_port, p.proto),
            (Ipv4Addr::LOCALHOST, 9000, 90, Proto::Udp)
        );
        let p = parse_publish("127.0.0.1::90").unwrap();
        assert_eq!((p.host_port, p.guest_port), (0, 90));
        let p = parse_publish("6379").unwrap();
        assert_eq!((p.host_port, p.guest_port), (0, 6379));
        for bad in [
            "",
            "x:80",
            "80:0",
            "1:2:3:4",
            "80/sctp",
            "999999:80",
            "host:80:80",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_modes() {
        assert_eq!("user".parse::<NetMode>().unwrap(), NetMode::User);
        assert_eq!(
            "tap:hv0".parse::<NetMode>().unwrap(),
            NetMode::Tap(Some("hv0".into()))
        );
        assert!("tap:".parse::<NetMode>().is_err());
        assert_eq!(
            "redirect:eth0".parse::<NetMode>().unwrap(),
            NetMode::Redirect(Some("eth0".into()))
        );
        assert_eq!(
            "redirect".parse::<NetMode>().unwrap(),
            NetMode::Redirect(None)
        );
        assert!("bridge".parse::<NetMode>().is_err());
    }

    #[test]
    fn user_mode_forwards_ports_to_the_guest_address() {
        let o = NetOptions {
            publish: vec![parse_publish("127.0.0.1::80").unwrap()],
            ..Default::default()
        };
        let p = plan(&o, &[], true, true).unwrap().unwrap();
        assert_ne!(p.ports[0].host_port, 0, "a free port was chosen");
        let a = crate::backend::qemu::net_args(&p).join(" ");
        assert!(
            a.contains(&format!(
                "hostfwd=tcp:127.0.0.1:{}-10.0.2.15:80",
                p.internal[0]
            )),
            "{a}"
        );
        assert_eq!(p.upstream(&p.ports[0]).port(), p.internal[0]);
        assert!(a.contains("virtio-net-device,netdev=net0"));
        assert_eq!(p.guest.address, "10.0.2.15");
        assert_eq!(p.guest.dns, vec!["10.0.2.3".to_string()]);
        // -P takes the image's ExposedPorts.
        let all = NetOptions {
            publish_all: true,
            ..Default::default()
        };
        let p = plan(&all, &["8080/tcp".into(), "53/udp".into()], true, true)
            .unwrap()
            .unwrap();
        assert_eq!(p.ports.len(), 2);
        assert_eq!(p.ports[1].proto, Proto::Udp);
        // KVM backend: no network by default; user mode (passt) once a port
        // is published, with the same guest addresses.
        assert!(plan(&NetOptions::default(), &[], false, true)
            .unwrap()
            .is_none());
        let k = plan(&o, &[], false, true).unwrap().unwrap();
        assert!(matches!(k.link, Link::User));
        assert_eq!(k.guest.address, "10.0.2.15");
        assert_eq!(k.upstream(&k.ports[0]).port(), k.internal[0]);
        let none = NetOptions {
            mode: NetMode::None,
            ..o
        };
        assert!(plan(&none, &[], true, true).is_err());
    }

    #[test]
    fn a_port_in_use_is_refused_before_boot_but_not_by_a_prepare() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let o = NetOptions {
            publish: vec![parse_publish(&format!("127.0.0.1:{port}:80")).unwrap()],
            ..Default::default()
        };
        let e = plan(&o, &[], true, true).unwrap_err().to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        // `hyperboot prepare` beside the app's running VM that holds it:
        // the card the run will have (user mode, because of -p), no port
        // bound or announced.
        let k = plan(&o, &[], false, false).unwrap().unwrap();
        assert!(matches!(k.link, Link::User));
        assert_eq!(k.guest.address, "10.0.2.15");
        assert!(k.ports.is_empty() && k.internal.is_empty());
    }
}
