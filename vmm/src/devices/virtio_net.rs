//! virtio-net (virtio 1.2 section 5.1) over a frame backend: a tap device
//! (`--net tap`) or passt's UNIX socket (user-mode networking, `-p` without
//! root). No offloads: every frame is a plain Ethernet frame behind a zeroed
//! 12-byte header.
//!
//! Transmit runs on the vCPU's thread when the guest notifies; receive frames
//! come from a reader thread ([`receive`]), wait in a bounded queue and go
//! into the guest's receive buffers as it posts them. The guest is hostile:
//! a transmit chain must be readable, hold the header and at most 64 KiB of
//! frame; a receive chain must be writable and big enough for the header and
//! the frame (else the frame is dropped, as a NIC drops it); nothing the
//! guest does stops the device or the VMM.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::virtio_mmio::{add_used, serve_chains, DeviceError, MmioTransport, VirtioDevice};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

const F_MAC: u64 = 1 << VIRTIO_NET_F_MAC;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const HDR: usize = 12;
/// The virtio-net header a tap with IFF_VNET_HDR puts before each frame.
const TAP_HDR: usize = 10;
/// The largest frame taken from the guest or a backend.
pub const FRAME_MAX: usize = 65_536;
/// Received frames held while the guest posts no buffers; more are dropped.
const RX_BACKLOG: usize = 256;

/// Where frames go and come from.
#[derive(Debug)]
pub enum Backend {
    /// A tap device's descriptor (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as
    /// hyperboot creates it for both backends): one frame per read or write,
    /// behind the tap's 10-byte virtio-net header (zero: no offloads).
    Tap(std::fs::File),
    /// passt's socket: each frame after its length, 4 bytes big-endian (QEMU's
    /// stream netdev protocol).
    Passt(UnixStream),
}

impl Backend {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        match self {
            Backend::Tap(f) => {
                let mut out = Vec::with_capacity(TAP_HDR + frame.len());
                out.extend_from_slice(&[0u8; TAP_HDR]);
                out.extend_from_slice(frame);
                f.write_all(&out)
            }
            Backend::Passt(s) => send_passt(s, frame),
        }
    }

    /// A second handle for the reader thread.
    pub fn try_clone(&self) -> std::io::Result<Backend> {
        Ok(match self {
            Backend::Tap(f) => Backend::Tap(f.try_clone()?),
            Backend::Passt(s) => Backend::Passt(s.try_clone()?),
        })
    }

    /// Reads the next frame; `None` when the backend is gone.
    fn recv(&mut self, buf: &mut Vec<u8>) -> Option<()> {
        match self {
            Backend::Tap(f) => {
                buf.resize(TAP_HDR + FRAME_MAX, 0);
                loop {
                    match f.read(buf) {
                        Ok(0) => return None,
                        Ok(n) if n <= TAP_HDR => {} // no frame behind the header
                        Ok(n) => {
                            buf.truncate(n);
                            buf.drain(..TAP_HDR);
                            return Some(());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => return None,
                    }
                }
            }
            Backend::Passt(s) => {
                let mut len = [0u8; 4];
                s.read_exact(&mut len).ok()?;
                let len = u32::from_be_bytes(len) as usize;
                if len > FRAME_MAX {
                    return None;
                }
                buf.resize(len, 0);
                s.read_exact(buf).ok()
            }
        }
    }
}

/// Sends a frame behind its length in one write: passt (Debian 12's)
/// drops a length that arrives in a read of its own, and with it the frame.
fn send_passt(to: &mut impl Write, frame: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    to.write_all(&out)
}

/// The network device.
pub struct Net {
    config: Vec<u8>,
    backend: Backend,
    rx: VecDeque<Vec<u8>>,
    frame: Vec<u8>,
    /// Frames refused or dropped (for `--verbose` and tests).
    pub dropped: u64,
    /// Frames the guest sent and received.
    pub sent: u64,
    pub received: u64,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl Net {
    pub fn new(mac: [u8; 6], backend: Backend) -> Self {
        Self {
            config: mac.to_vec(),
            backend,
            rx: VecDeque::new(),
            frame: Vec::with_capacity(FRAME_MAX),
            dropped: 0,
            sent: 0,
            received: 0,
        }
    }

    /// Queues a frame from the backend for the guest (dropped past the backlog).
    pub fn push_rx(&mut self, frame: Vec<u8>) {
        if self.rx.len() >= RX_BACKLOG {
            self.dropped += 1;
        } else {
            self.rx.push_back(frame);
        }
    }

    /// Moves queued frames into the guest's receive buffers.
    pub fn deliver(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let q = &mut queues[RX];
        if self.rx.is_empty() || !q.ready() || !q.is_valid(mem) {
            return Ok(false);
        }
        let mut used = false;
        while let Some(frame) = self.rx.pop_front() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                self.rx.push_front(frame);
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let written = match write_chain(&descs, &frame, mem) {
                Some(n) => {
                    self.received += 1;
                    n
                }
                None => {
                    self.dropped += 1;
                    0
                }
            };
            add_used(q, mem, head, written)?;
            used = true;
        }
        Ok(used)
    }

    fn transmit(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) {
        let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
        if descs.iter().any(|d| d.is_write_only())
            || total < HDR as u64
            || total > (HDR + FRAME_MAX) as u64
        {
            self.dropped += 1;
            return;
        }
        self.frame.clear();
        for d in descs {
            let start = self.frame.len();
            self.frame.resize(start + d.len() as usize, 0);
            if mem.read_slice(&mut self.frame[start..], d.addr()).is_err() {
                self.dropped += 1;
                return;
            }
        }
        // A backend that is gone or full loses the frame, as a cable would.
        match self.backend.send(&self.frame[HDR..]) {
            Ok(()) => self.sent += 1,
            Err(_) => self.dropped += 1,
        }
    }
}

/// Writes the header (num_buffers 1) and `frame` into a writable chain;
/// returns the bytes written, or `None` when the chain cannot hold them.
fn write_chain(descs: &[Descriptor], frame: &[u8], mem: &GuestMemoryMmap) -> Option<u32> {
    let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if descs.iter().any(|d| !d.is_write_only()) || room < (HDR + frame.len()) as u64 {
        return None;
    }
    let mut hdr = [0u8; HDR];
    hdr[10] = 1; // num_buffers
    let mut data = hdr.iter().chain(frame.iter()).copied();
    let mut left = HDR + frame.len();
    for d in descs {
        if left == 0 {
            break;
        }
        let n = (d.len() as usize).min(left);
        let part: Vec<u8> = data.by_ref().take(n).collect();
        mem.write_slice(&part, GuestAddress(d.addr().0)).ok()?;
        left -= n;
    }
    Some((HDR + frame.len()) as u32)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let used = index == TX
            && serve_chains(&mut queues[TX], mem, |descs| {
                self.transmit(descs, mem);
                0
            })?;
        let delivered = self.deliver(queues, mem)?;
        Ok(used || delivered)
    }
}

/// The `net-rx` thread's body: frames from the backend go into the
/// guest's receive queue until the backend closes.
pub fn receive(mut backend: Backend, net: &Mutex<MmioTransport<Net>>, mem: &GuestMemoryMmap) {
    let mut buf = Vec::with_capacity(FRAME_MAX);
    while backend.recv(&mut buf).is_some() {
        let mut n = net.lock().unwrap_or_else(|e| e.into_inner());
        n.device.push_rx(buf.clone());
        n.poke(mem, |d, q, m| d.deliver(q, m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write call apart.
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// passt reads its socket in chunks and drops a length that arrives
    /// alone: each frame must leave in one write, length included.
    #[test]
    fn a_frame_leaves_for_passt_with_its_length_in_one_write() {
        let frame: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        let mut w = Writes(Vec::new());
        send_passt(&mut w, &frame).unwrap();
        assert_eq!(w.0.len(), 1, "the frame left in pieces");
        assert_eq!(w.0[0][..4], (frame.len() as u32).to_be_bytes());
        assert_eq!(w.0[0][4..], frame[..]);
    }

    #[test]
    fn frames_from_passt_are_read_whole_and_oversized_ones_end_the_stream() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut backend = Backend::Passt(ours);
        theirs.write_all(&3u32.to_be_bytes()).unwrap();
        theirs.write_all(b"abc").unwrap();
        theirs
            .write_all(&((FRAME_MAX + 1) as u32).to_be_bytes())
            .unwrap();
        let mut buf = Vec::new();
        assert!(backend.recv(&mut buf).is_some());
        assert_eq!(buf, b"abc");
        assert!(backend.recv(&mut buf).is_none());
    }
}
