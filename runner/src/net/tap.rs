//! `--net tap[:NAME]`: a tap device hyperboot creates (it disappears with
//! its last descriptor) and addresses: a /30 per VM from 10.213.0.0/16,
//! host .1, guest .2.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;

/// Why the tap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("--net tap:{0}: an interface named {0} already exists; hyperboot only uses taps it creates and addresses")]
    Exists(String),
    #[error("--net tap: cannot open /dev/net/tun")]
    Open(#[source] std::io::Error),
    #[error("--net tap: cannot create the tap device{hint}")]
    Create {
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("--net tap: cannot keep the tap's descriptor")]
    Dup(#[source] std::io::Error),
    #[error("tap {0}: no interface index")]
    Index(String),
    #[error("--net tap: cannot run ip (apt-get install iproute2)")]
    NoIp(#[source] std::io::Error),
    #[error("--net tap: ip {args}: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("--net redirect: {0}")]
    Interface(String),
    #[error("--net redirect: cannot run tc (apt-get install iproute2)")]
    NoTc(#[source] std::io::Error),
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates a tap device (named, or `hyperN`) with a virtio-net header on
/// every frame; returns a descriptor without close-on-exec (QEMU inherits
/// it) and the device's name.
pub fn create(name: Option<&str>) -> Result<(OwnedFd, String), TapError> {
    if let Some(n) = name {
        if std::path::Path::new("/sys/class/net").join(n).exists() {
            return Err(TapError::Exists(n.to_string()));
        }
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    for (d, s) in req
        .name
        .iter_mut()
        .zip(name.unwrap_or("hyper%d").bytes().take(15))
    {
        *d = s;
    }
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which IfReq lays
    // out (40 bytes: name, flags, padding); the value is our own.
    let rc = unsafe {
        rustix::ioctl::ioctl(
            &f,
            rustix::ioctl::Updater::<{ libc::TUNSETIFF as rustix::ioctl::Opcode }, IfReq>::new(
                &mut req,
            ),
        )
    };
    if let Err(e) = rc {
        let source = std::io::Error::from(e);
        let hint = if source.raw_os_error() == Some(libc::EPERM) {
            " (creating a tap needs CAP_NET_ADMIN: run as root, or use the default --net user)"
        } else {
            ""
        };
        return Err(TapError::Create { hint, source });
    }
    let name: String = req
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as char)
        .collect();
    // dup() gives a descriptor without close-on-exec, for QEMU.
    let fd = rustix::io::dup(f.as_fd()).map_err(|e| TapError::Dup(e.into()))?;
    Ok((fd, name))
}

/// The tap's /30, chosen by its interface index: (host, guest).
pub fn addresses(name: &str) -> Result<(Ipv4Addr, Ipv4Addr), TapError> {
    let idx: u32 = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| TapError::Index(name.to_string()))?;
    let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + (idx % 16384) * 4;
    Ok((Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2)))
}

/// Gives the host's end its address and brings the tap up.
pub fn configure_host_side(name: &str, host: Ipv4Addr) -> Result<(), TapError> {
    for args in [
        vec!["addr", "add", &format!("{host}/30"), "dev", name],
        vec!["link", "set", name, "up"],
    ] {
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .map_err(TapError::NoIp)?;
        if !out.status.success() {
            return Err(TapError::Ip {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

/// An interface whose traffic a tap takes over (`--net redirect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
}

/// Runs `ip`/`tc` with JSON output or none; stdout on success.
fn tool(program: &str, args: &[&str]) -> Result<String, TapError> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| match program {
            "tc" => TapError::NoTc(e),
            _ => TapError::NoIp(e),
        })?;
    if !out.status.success() {
        return Err(TapError::Ip {
            args: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// The interface named (or the namespace's one non-loopback interface with
/// an IPv4 address): its MAC, first IPv4 address, MTU and the default route.
pub fn interface(name: Option<&str>) -> Result<Interface, TapError> {
    let err = |m: String| TapError::Interface(m);
    let addrs: serde_json::Value =
        serde_json::from_str(&tool("ip", &["-4", "-j", "addr", "show"])?)
            .map_err(|e| err(format!("ip -j addr: {e}")))?;
    let candidates: Vec<&serde_json::Value> = addrs
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let has_v4 = |i: &&serde_json::Value| {
        i["addr_info"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["family"] == "inet"))
    };
    let chosen: Vec<&serde_json::Value> = candidates
        .into_iter()
        .filter(|i| i["ifname"] != "lo" && has_v4(i))
        .filter(|i| name.is_none_or(|n| i["ifname"] == n))
        .collect();
    let i = match (chosen.as_slice(), name) {
        ([i], _) => *i,
        ([], Some(n)) => return Err(err(format!("no interface {n} with an IPv4 address here"))),
        ([], None) => {
            return Err(err(
                "no interface with an IPv4 address in this network namespace".into(),
            ))
        }
        (_, _) => {
            return Err(err(
                "several interfaces with IPv4 addresses: name one (redirect:NAME)".into(),
            ))
        }
    };
    let ifname = i["ifname"].as_str().unwrap_or_default().to_string();
    let inet = i["addr_info"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["family"] == "inet"))
        .expect("filtered on it");
    let address: Ipv4Addr = inet["local"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| err(format!("{ifname}: no IPv4 address")))?;
    let prefix = inet["prefixlen"].as_u64().unwrap_or(32) as u8;
    // From ip, not /sys/class/net: sysfs shows the network namespace of
    // whoever mounted it, which is not this one when hyperboot was moved
    // into a namespace (as the containerd shim does).
    let link: serde_json::Value =
        serde_json::from_str(&tool("ip", &["-j", "link", "show", "dev", &ifname])?)
            .map_err(|e| err(format!("ip -j link: {e}")))?;
    let mac = link[0]["address"]
        .as_str()
        .and_then(parse_mac)
        .ok_or_else(|| err(format!("{ifname}: no MAC address")))?;
    let mtu = link[0]["mtu"].as_u64().unwrap_or(1500) as u32;
    let routes: serde_json::Value =
        serde_json::from_str(&tool("ip", &["-4", "-j", "route", "show", "default"])?)
            .map_err(|e| err(format!("ip -j route: {e}")))?;
    let gateway = routes.as_array().and_then(|r| {
        r.iter()
            .filter(|r| r["dev"] == ifname.as_str())
            .find_map(|r| r["gateway"].as_str()?.parse().ok())
    });
    Ok(Interface {
        name: ifname,
        mac,
        address,
        prefix,
        gateway,
        mtu,
    })
}

/// The tc redirects between a tap and the interface it stands in for. A
/// helper process started with them removes them from the interface once
/// hyperboot is gone, however it ends (SIGKILL included, and after its
/// seccomp filter, which allows no new process): it waits for the end of a
/// pipe only hyperboot holds. The tap goes with its last descriptor.
#[derive(Debug)]
pub struct Joined {
    _alive: std::process::ChildStdin,
}

fn remove_on_exit(iface: &str) -> Result<Joined, TapError> {
    let mut helper = std::process::Command::new("sh")
        .args([
            "-c",
            "read -r _; exec tc qdisc del dev \"$1\" ingress",
            "sh",
            iface,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(TapError::NoTc)?;
    Ok(Joined {
        _alive: helper.stdin.take().expect("piped"),
    })
}

/// Joins the tap `name` to `iface`: every frame arriving on one leaves by
/// the other (tc ingress qdiscs with mirred redirects, as Kata Containers'
/// tcfilter mode does), so the guest behind the tap is on the interface's
/// link with the interface's addresses.
pub fn join(name: &str, iface: &Interface) -> Result<Joined, TapError> {
    let mtu = iface.mtu.to_string();
    tool("ip", &["link", "set", name, "mtu", &mtu, "up"])?;
    // A VM before this one may have left its redirect behind.
    let _ = tool("tc", &["qdisc", "del", "dev", &iface.name, "ingress"]);
    let joined = remove_on_exit(&iface.name)?;
    for (from, to) in [(iface.name.as_str(), name), (name, iface.name.as_str())] {
        tool("tc", &["qdisc", "add", "dev", from, "ingress"])?;
        tool(
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(joined)
}

/// The host's name servers that a guest can reach (not loopback ones).
pub fn host_nameservers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .filter(|s| s.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn macs_parse() {
        assert_eq!(
            super::parse_mac("0a:58:0a:f4:00:07\n"),
            Some([0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x07])
        );
        assert_eq!(super::parse_mac("0a:58"), None);
        assert_eq!(super::parse_mac("zz:58:0a:f4:00:07"), None);
    }

    #[test]
    fn ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }
}
