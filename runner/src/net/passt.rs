//! User-mode networking on the KVM backend: Debian's `passt`, connected to
//! the VMM's virtio-net by a socket pair (`--fd`, no socket file). It gives
//! the guest the same addresses as QEMU's user-mode stack, answers DNS at
//! 10.0.2.3, maps the gateway to the host's loopback, forwards each published
//! TCP port's internal loopback port (which hyperboot's relay serves) and
//! each UDP port, and quits when hyperboot closes its end. It runs in its own
//! process group and dies with hyperboot ([`crate::child`]).

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use super::{Plan, Proto};

/// Why passt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("cannot make passt's socket pair")]
    SocketPair(#[source] std::io::Error),
    #[error("cannot hand passt its socket")]
    Inherit(#[source] std::io::Error),
    #[error("cannot start passt (apt-get install passt)")]
    Spawn(#[source] std::io::Error),
}

/// Whether Debian's `passt` is installed.
pub fn available() -> bool {
    crate::host::on_path("passt")
}

/// Starts passt for a user-mode plan; returns hyperboot's end of the socket
/// pair. A thread (`passt`) waits for it: should passt fail (it refuses to
/// start on a host without a routable interface, say), its words are
/// printed as a warning, since the guest's network is gone.
pub fn start(p: &Plan) -> Result<UnixStream, PasstError> {
    let (ours, theirs) = UnixStream::pair().map_err(PasstError::SocketPair)?;
    // passt inherits its end (and only that one is marked to be kept).
    rustix::io::fcntl_setfd(theirs.as_fd(), rustix::io::FdFlags::empty())
        .map_err(|e| PasstError::Inherit(e.into()))?;
    let mut c = crate::child::helper("passt");
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
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    tracing::debug!("passt {:?}", c.get_args().collect::<Vec<_>>());
    let mut child = c.spawn().map_err(PasstError::Spawn)?;
    drop(theirs);
    let stderr = child.stderr.take();
    let _ = std::thread::Builder::new()
        .name("passt".into())
        .spawn(move || {
            let mut words = String::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_string(&mut words);
            }
            match child.wait() {
                Ok(st) if !st.success() => tracing::warn!(
                    "passt (user-mode networking) failed ({st}): {}",
                    words.trim().replace('\n', "; ")
                ),
                _ => tracing::debug!("passt ended: {}", words.trim()),
            }
        });
    Ok(ours)
}
