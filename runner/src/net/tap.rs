//! `--net tap[:NAME]`: a tap device hyperboot creates (it disappears with
//! its last descriptor) and addresses: a /30 per VM from 10.213.0.0/16,
//! host .1, guest .2.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};

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
    fn ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }
}
