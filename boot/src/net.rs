//! Guest networking, configured from what the runner passes (no DHCP client):
//! the loopback interface always comes up; with a network, one interface
//! gets its address, the default route, and the resolver and hosts files.

use std::io;
use std::net::Ipv4Addr;

use crate::config::Network;

/// A datagram socket for the interface ioctls.
struct Sock(libc::c_int);

impl Sock {
    fn new() -> io::Result<Sock> {
        // SAFETY: socket() takes no pointers; the descriptor is owned by Sock.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Sock(fd))
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= r.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (d, s) in r.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; the
    // kernel reads the family to interpret the bytes.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(s: &Sock, req: libc::Ioctl, arg: *mut libc::c_void, what: &str) -> io::Result<()> {
    // SAFETY: `arg` points at a live ifreq/rtentry of the type `req` expects.
    if unsafe { libc::ioctl(s.0, req, arg) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn ptr<T>(v: &mut T) -> *mut libc::c_void {
    v as *mut T as *mut libc::c_void
}

fn up(s: &Sock, name: &str) -> io::Result<()> {
    let mut r = ifreq(name)?;
    ioctl(s, libc::SIOCGIFFLAGS, ptr(&mut r), &format!("{name} flags"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        s,
        libc::SIOCSIFFLAGS,
        ptr(&mut r),
        &format!("bring {name} up"),
    )
}

/// Brings `lo` up (the kernel gives it 127.0.0.1/8).
pub fn loopback() -> io::Result<()> {
    up(&Sock::new()?, "lo")
}

/// Parses `A.B.C.D`.
fn ip(s: &str) -> io::Result<Ipv4Addr> {
    s.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad IPv4 address {s:?}"),
        )
    })
}

/// The netmask of a prefix length.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

/// Configures the interface and the default route.
pub fn configure(n: &Network) -> io::Result<()> {
    // The virtio-net driver has usually probed before init runs; wait a little.
    let sys = format!("/sys/class/net/{}", n.interface);
    for _ in 0..200 {
        if std::path::Path::new(&sys).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let s = Sock::new()?;
    let name = &n.interface;
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_addr = sockaddr(ip(&n.address)?);
    ioctl(
        &s,
        libc::SIOCSIFADDR,
        ptr(&mut r),
        &format!("address of {name}"),
    )?;
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_netmask = sockaddr(netmask(n.prefix));
    ioctl(
        &s,
        libc::SIOCSIFNETMASK,
        ptr(&mut r),
        &format!("netmask of {name}"),
    )?;
    if let Some(mtu) = n.mtu {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        ioctl(&s, libc::SIOCSIFMTU, ptr(&mut r), &format!("mtu of {name}"))?;
    }
    up(&s, name)?;
    if !n.gateway.is_empty() {
        // SAFETY: rtentry is plain old data; all zeroes is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(ip(&n.gateway)?);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(&s, libc::SIOCADDRT, ptr(&mut rt), "default route")?;
    }
    Ok(())
}

/// `/etc/resolv.conf` for the given servers (Docker writes one even when empty).
pub fn resolv_conf(n: &Network) -> String {
    let mut s = String::new();
    for d in &n.dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    if !n.search.is_empty() {
        s.push_str(&format!("search {}\n", n.search.join(" ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn resolver_file() {
        let n = Network {
            interface: "eth0".into(),
            address: "10.0.2.15".into(),
            prefix: 24,
            gateway: "10.0.2.2".into(),
            dns: vec!["10.0.2.3".into()],
            search: vec!["example.com".into()],
            hosts: vec![],
            mtu: None,
        };
        assert_eq!(resolv_conf(&n), "nameserver 10.0.2.3\nsearch example.com\n");
        assert!(ifreq("a-name-that-is-far-too-long").is_err());
    }
}
