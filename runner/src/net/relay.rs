//! hyperboot's relay for published TCP ports (`-p`): host listeners whose
//! connections go to `upstream(port)` — the guest itself in tap mode, the
//! user-mode stack's internal forward otherwise (QEMU's listener has a
//! backlog of one and resets connections under a burst). Bound before the
//! VM starts; they close when hyperboot exits.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use super::{NetError, PortMap, Proto};

/// Starts a relay (thread `relay PORT`) for every published TCP port.
pub fn forward_tcp(
    ports: &[PortMap],
    upstream: impl Fn(&PortMap) -> SocketAddr,
) -> Result<(), NetError> {
    for p in ports.iter().filter(|p| p.proto == Proto::Tcp) {
        let addr = SocketAddr::new(IpAddr::V4(p.host_ip), p.host_port);
        let l = TcpListener::bind(addr).map_err(|e| NetError::Listen(addr, e))?;
        let to = upstream(p);
        std::thread::Builder::new()
            .name(format!("relay {}", p.host_port))
            .spawn(move || {
                for c in l.incoming().flatten() {
                    let _ = std::thread::Builder::new()
                        .name("relay conn".into())
                        .spawn(move || relay(c, to));
                }
            })
            .map_err(|e| NetError::Listen(addr, e))?;
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
            use rustix::event::{poll, PollFd, PollFlags, Timespec};
            let client_events = if client_done {
                PollFlags::empty()
            } else {
                PollFlags::IN
            };
            let mut fds = [
                PollFd::new(&client, client_events),
                PollFd::new(&up, PollFlags::IN),
            ];
            // A quiet connection (a client that sends nothing yet) gives its
            // slot back after a second, so idle clients never block others.
            let second = Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let timeout = slot.is_some().then_some(&second);
            match poll(&mut fds, timeout) {
                Ok(0) => {
                    slot = None;
                    continue;
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return,
            }
            let ready = |i: usize| !fds[i].revents().is_empty();
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
    let Ok(t) = std::thread::Builder::new()
        .name("relay copy".into())
        .spawn(move || copy(c2, s2))
    else {
        return;
    };
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
