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

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::spec::Network;

/// `--net`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetMode {
    /// `user` on the QEMU backend, `none` on the KVM backend unless ports are published.
    #[default]
    Auto,
    None,
    User,
    Tap(Option<String>),
}

impl std::str::FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let tap = |n: &str| !n.is_empty() && n.len() < 16 && !n.contains('/');
        match s {
            "none" => Ok(NetMode::None),
            "user" => Ok(NetMode::User),
            "tap" => Ok(NetMode::Tap(None)),
            _ => match s.strip_prefix("tap:") {
                Some(n) if tap(n) => Ok(NetMode::Tap(Some(n.to_string()))),
                _ => Err(format!("--net {s:?}: {NET_MODES}")),
            },
        }
    }
}

const NET_MODES: &str = "expected none, user, tap or tap:NAME (at most 15 characters)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
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
pub fn parse_publish(s: &str) -> Result<PortMap, String> {
    let err =
        |e: String| format!("-p {s:?}: {e} (expected [HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|/udp])");
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
    /// A tap device hyperboot created (descriptor inherited by QEMU).
    Tap { fd: OwnedFd, name: String },
}

/// A decided network: the link, the guest's configuration, the resolved ports.
#[derive(Debug)]
pub struct Plan {
    pub link: Link,
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
/// and prepares the link. `None` when the guest gets no network.
pub fn plan(
    o: &NetOptions,
    exposed: &[String],
    qemu_backend: bool,
) -> Result<Option<Plan>, String> {
    let mut ports = o.publish.clone();
    if o.publish_all {
        if exposed.is_empty() {
            eprintln!("hyperboot: -P: the image exposes no ports");
        }
        for e in exposed {
            let mut m = parse_publish(e).map_err(|e| format!("the image's ExposedPorts: {e}"))?;
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
            return Err("-p/-P need a network: drop --net none".into());
        }
        return Ok(None);
    }
    for p in &mut ports {
        reserve(p)?;
    }
    let announce = o.publish_all || o.publish.iter().any(|p| p.host_port == 0);
    if announce {
        for p in &ports {
            eprintln!("hyperboot: published {p}");
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
            },
            ports,
        })),
        NetMode::Tap(name) => {
            if ports.iter().any(|p| p.proto == Proto::Udp) {
                return Err("-p .../udp is not supported in tap mode yet (use --net user)".into());
            }
            let (fd, name) = create_tap(name.as_deref())?;
            let (host, guest) = tap_addresses(&name)?;
            configure_host_side(&name, host)?;
            let dns = if o.dns.is_empty() {
                host_nameservers()
            } else {
                o.dns.clone()
            };
            Ok(Some(Plan {
                link: Link::Tap { fd, name },
                guest: Network {
                    interface: "eth0".into(),
                    address: guest.to_string(),
                    prefix: 30,
                    gateway: host.to_string(),
                    dns,
                    hosts: vec![format!("{host} host.hyper.internal")],
                },
                ports,
                internal: vec![],
            }))
        }
        NetMode::None | NetMode::Auto => Ok(None),
    }
}

/// Picks a free port for host port 0 and checks the port can be bound.
fn reserve(p: &mut PortMap) -> Result<(), String> {
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
        Err(e) => Err(format!(
            "cannot publish {}/{} on {addr}: {e}",
            p.guest_port,
            p.proto.name()
        )),
    }
}

/// The guest's MAC address (QEMU's default one, as on the QEMU backend).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Whether Debian's `passt` is installed (user-mode networking on the KVM backend).
pub fn passt_available() -> bool {
    crate::host::on_path("passt")
}

/// Starts passt for a user-mode plan on the KVM backend: the guest's end of
/// a socket pair is handed to it (`--fd`), so no socket file is involved;
/// passt forwards each published TCP port's internal loopback port and each
/// UDP port, answers DNS at 10.0.2.3 and quits when hyperboot closes its end.
pub fn start_passt(
    p: &Plan,
    verbose: bool,
) -> Result<(std::process::Child, std::os::unix::net::UnixStream), String> {
    use std::os::fd::AsFd;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("cannot make passt's socket pair: {e}"))?;
    // passt inherits its end (and only that one is marked to be kept).
    nix::fcntl::fcntl(
        theirs.as_fd().as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| format!("cannot hand passt its socket: {e}"))?;
    let mut c = std::process::Command::new("passt");
    c.args(["--foreground", "--quiet", "--one-off", "--ipv4-only"])
        .args(["--fd", &theirs.as_raw_fd().to_string()])
        .args([
            "--address",
            &p.guest.address,
            "--netmask",
            &p.guest.prefix.to_string(),
        ])
        .args(["--gateway", &p.guest.gateway, "--dns-forward", "10.0.2.3"]);
    let mut tcp = p.internal.iter();
    for port in &p.ports {
        match port.proto {
            Proto::Tcp => {
                let internal = tcp.next().expect("an internal port per TCP port");
                c.args(["-t", &format!("127.0.0.1/{internal}:{}", port.guest_port)]);
            }
            Proto::Udp => {
                c.args([
                    "-u",
                    &format!("{}/{}:{}", port.host_ip, port.host_port, port.guest_port),
                ]);
            }
        }
    }
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    if !verbose {
        c.stderr(std::process::Stdio::null());
    }
    let child = c
        .spawn()
        .map_err(|e| format!("cannot start passt (apt-get install passt): {e}"))?;
    drop(theirs);
    Ok((child, ours))
}

/// QEMU's `-netdev`/`-device` arguments for a plan.
pub fn qemu_args(p: &Plan) -> Vec<String> {
    let netdev = match &p.link {
        Link::User => {
            let mut s = format!(
                "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns={},ipv6=off",
                "10.0.2.3"
            );
            let mut internal = p.internal.iter();
            for m in &p.ports {
                // TCP goes through hyperboot's relay to a loopback-only forward;
                // UDP is forwarded by QEMU directly.
                let (ip, port) = match m.proto {
                    Proto::Tcp => (
                        "127.0.0.1".to_string(),
                        *internal.next().expect("one internal port per TCP port"),
                    ),
                    Proto::Udp if m.host_ip.is_unspecified() => (String::new(), m.host_port),
                    Proto::Udp => (m.host_ip.to_string(), m.host_port),
                };
                s.push_str(&format!(
                    ",hostfwd={}:{ip}:{port}-{USER_GUEST}:{}",
                    m.proto.name(),
                    m.guest_port
                ));
            }
            s
        }
        Link::Tap { fd, .. } => format!("tap,id=net0,fd={}", fd.as_raw_fd()),
    };
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        "virtio-net-device,netdev=net0".into(),
    ]
}

fn ifreq_name(name: &str) -> [libc::c_char; libc::IFNAMSIZ] {
    let mut n = [0 as libc::c_char; libc::IFNAMSIZ];
    for (d, s) in n
        .iter_mut()
        .zip(name.as_bytes().iter().take(libc::IFNAMSIZ - 1))
    {
        *d = *s as libc::c_char;
    }
    n
}

/// Creates a tap device (named, or `hyperN`); it disappears with the last
/// descriptor. Returns a descriptor QEMU can inherit.
fn create_tap(name: Option<&str>) -> Result<(OwnedFd, String), String> {
    if let Some(n) = name {
        if std::path::Path::new("/sys/class/net").join(n).exists() {
            return Err(format!(
                "--net tap:{n}: an interface named {n} already exists; hyperboot only uses taps it creates and addresses"
            ));
        }
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("--net tap: cannot open /dev/net/tun: {e}"))?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    r.ifr_name = ifreq_name(name.unwrap_or("hyper%d"));
    r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut r as *mut libc::ifreq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (creating a tap needs CAP_NET_ADMIN: run as root, or use the default --net user)"
        } else {
            ""
        };
        return Err(format!(
            "--net tap: cannot create the tap device: {e}{hint}"
        ));
    }
    let name: String = r
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    // dup() gives a descriptor without close-on-exec, for QEMU.
    let fd = nix::unistd::dup(f.as_raw_fd()).map_err(|e| format!("dup: {e}"))?;
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by dup() and is owned by nobody else.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, name))
}

/// A /30 per tap from 10.213.0.0/16, chosen by the interface index.
fn tap_addresses(name: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let idx: u32 = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("tap {name}: no interface index"))?;
    let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + (idx % 16384) * 4;
    Ok((Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2)))
}

fn configure_host_side(name: &str, host: Ipv4Addr) -> Result<(), String> {
    for args in [
        vec!["addr", "add", &format!("{host}/30"), "dev", name],
        vec!["link", "set", name, "up"],
    ] {
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .map_err(|e| format!("--net tap: cannot run ip (apt-get install iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "--net tap: ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// The host's name servers that a guest can reach (not loopback ones).
fn host_nameservers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .filter(|s| s.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
        .collect()
}

/// `-p` for TCP: host listeners whose connections hyperboot relays to
/// `upstream(port)` — the guest itself in tap mode, QEMU's internal forward
/// in user mode (whose own listener has a backlog of one and resets
/// connections under a burst). Bound before the VM starts; they close when
/// hyperboot exits.
pub fn forward_tcp(
    ports: &[PortMap],
    upstream: impl Fn(&PortMap) -> SocketAddr,
) -> Result<(), String> {
    for p in ports.iter().filter(|p| p.proto == Proto::Tcp) {
        let addr = SocketAddr::new(IpAddr::V4(p.host_ip), p.host_port);
        let l = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let to = upstream(p);
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || relay(c, to));
            }
        });
    }
    Ok(())
}

/// Connections being established through one relay at once: QEMU's user-mode
/// stack drops and closes connections when a burst hits the guest at once.
const ESTABLISHING: usize = 16;

/// A slot among the connections being established.
struct Slot;

static SLOTS: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

impl Slot {
    fn take() -> Slot {
        let mut n = SLOTS.0.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= ESTABLISHING {
            n = SLOTS.1.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut n = SLOTS.0.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        SLOTS.1.notify_one();
    }
}

/// Client bytes kept for a replay until the guest's first answer.
const REPLAY_LIMIT: usize = 256 * 1024;
/// Fresh upstream connections tried before a client is closed.
const ATTEMPTS: u32 = 8;

/// Relays one client. Until the first byte comes back, a connection the
/// upstream resets or closes without a word (it never reached the app: a
/// full backlog, a guest still booting) is retried with the client's bytes
/// replayed; after that, bytes flow both ways until either side closes.
fn relay(mut client: TcpStream, to: SocketAddr) {
    let _ = client.set_nodelay(true);
    let mut slot = Some(Slot::take());
    let mut sent: Vec<u8> = Vec::new();
    let mut client_done = false;
    let mut attempt = 0;
    let server = 'connect: loop {
        attempt += 1;
        if attempt > ATTEMPTS {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        if attempt > 1 {
            std::thread::sleep(Duration::from_millis(50 << attempt.min(5)));
        }
        let Ok(mut up) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
            continue;
        };
        let _ = up.set_nodelay(true);
        if up.write_all(&sent).is_err() {
            continue;
        }
        if client_done {
            let _ = up.shutdown(Shutdown::Write);
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            use std::os::fd::AsFd;
            let client_events = if client_done {
                nix::poll::PollFlags::empty()
            } else {
                nix::poll::PollFlags::POLLIN
            };
            let mut fds = [
                nix::poll::PollFd::new(client.as_fd(), client_events),
                nix::poll::PollFd::new(up.as_fd(), nix::poll::PollFlags::POLLIN),
            ];
            // A quiet connection (a client that sends nothing yet) gives its
            // slot back after a second, so idle clients never block others.
            let timeout = if slot.is_some() {
                nix::poll::PollTimeout::from(1000u16)
            } else {
                nix::poll::PollTimeout::NONE
            };
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => {
                    slot = None;
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            let (client_ready, up_ready) = (ready(0) && !client_done, ready(1));
            if up_ready {
                match up.read(&mut buf) {
                    Ok(0) => continue 'connect, // closed without a word: retry
                    Ok(n) => {
                        if client.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        break 'connect up;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => continue 'connect, // reset before any answer: retry
                }
            }
            if client_ready {
                match client.read(&mut buf) {
                    Ok(0) => {
                        client_done = true;
                        let _ = up.shutdown(Shutdown::Write);
                    }
                    Ok(n) => {
                        if sent.len() + n > REPLAY_LIMIT {
                            // Too much to keep: no more replays.
                            if up.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            break 'connect up;
                        }
                        sent.extend_from_slice(&buf[..n]);
                        if up.write_all(&buf[..n]).is_err() {
                            continue 'connect;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        }
    };
    drop((sent, slot));
    let (c2, s2) = match (client.try_clone(), server.try_clone()) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return,
    };
    let t = std::thread::spawn(move || copy(c2, s2));
    copy(server, client);
    let _ = t.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Read);
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

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
        assert!("bridge".parse::<NetMode>().is_err());
    }

    #[test]
    fn user_mode_forwards_ports_to_the_guest_address() {
        let o = NetOptions {
            publish: vec![parse_publish("127.0.0.1::80").unwrap()],
            ..Default::default()
        };
        let p = plan(&o, &[], true).unwrap().unwrap();
        assert_ne!(p.ports[0].host_port, 0, "a free port was chosen");
        let a = qemu_args(&p).join(" ");
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
        let p = plan(&all, &["8080/tcp".into(), "53/udp".into()], true)
            .unwrap()
            .unwrap();
        assert_eq!(p.ports.len(), 2);
        assert_eq!(p.ports[1].proto, Proto::Udp);
        // KVM backend: no network by default; user mode (passt) once a port
        // is published, with the same guest addresses.
        assert!(plan(&NetOptions::default(), &[], false).unwrap().is_none());
        let k = plan(&o, &[], false).unwrap().unwrap();
        assert!(matches!(k.link, Link::User));
        assert_eq!(k.guest.address, "10.0.2.15");
        assert_eq!(k.upstream(&k.ports[0]).port(), k.internal[0]);
        let none = NetOptions {
            mode: NetMode::None,
            ..o
        };
        assert!(plan(&none, &[], true).is_err());
    }

    #[test]
    fn a_port_in_use_is_refused_before_boot() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let o = NetOptions {
            publish: vec![parse_publish(&format!("127.0.0.1:{port}:80")).unwrap()],
            ..Default::default()
        };
        let e = plan(&o, &[], true).unwrap_err();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
