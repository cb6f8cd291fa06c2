//! virtio-console with named ports (`VIRTIO_CONSOLE_F_MULTIPORT`, virtio 1.2
//! section 5.3): the app's stdout and stderr leave the guest in whole
//! buffers, one exit per buffer instead of one per byte on the UART.
//!
//! Ports 1.. carry the names hyperinit looks for (`hyper.stdout`,
//! `hyper.stderr`, and `hyper.stdin` with `-i`); port 0 is never added. The
//! control handshake: the guest says DEVICE_READY, the device adds each port,
//! the guest says PORT_READY for it, the device gives its name and opens it.
//! What the guest sends on a port's transmit queue goes to that port's sink,
//! in order, before the buffer is returned (so nothing is lost at exit), and
//! is counted. Input waits in a bounded buffer until the guest has opened the
//! input port and posted receive buffers; another thread may add to it (see
//! [`Console::push_input`]).
//!
//! The guest is hostile: control messages are taken only from readable
//! descriptors of exactly their size or more, ports it names must exist,
//! transmit data only from readable descriptors and at most 1 MiB per chain;
//! anything else is refused (counted) without stopping the device. Messages
//! for the guest wait until it posts writable buffers big enough for them.

use std::collections::VecDeque;
use std::io::Write;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::virtio_mmio::{add_used, serve_chains, DeviceError, VirtioDevice};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;

// virtio-bindings has no virtio_console module: these are the virtio 1.2
// spec's (5.3.3, 5.3.6.2).
const F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 64;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
/// Input held for the guest at most; the host's reader waits beyond it.
pub const INPUT_MAX: usize = 1 << 20;
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
/// Most bytes taken from one transmit chain.
const CHAIN_MAX: u64 = 1 << 20;

/// A console device whose ports 1..=N are named outputs.
pub struct Console {
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    ports: Vec<Port>,
    /// Control messages waiting for a guest buffer.
    to_guest: VecDeque<Vec<u8>>,
    /// The input port's name, if it has one (numbered after the outputs).
    input: Option<&'static str>,
    /// Whether the guest opened the input port.
    input_open: bool,
    pending_in: VecDeque<u8>,
    /// Requests refused as malformed (for `--verbose` and tests).
    pub refused: u64,
    /// Ports the guest's driver said it made ready (for `--verbose` and tests).
    pub ready_ports: u32,
    /// When the first byte of the app's output came (monotonic ns; 0: none).
    pub first_output: u64,
}

struct Port {
    name: &'static str,
    sink: Box<dyn Write + Send>,
    sent: u64,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field(
                "ports",
                &self.ports.iter().map(|p| p.name).collect::<Vec<_>>(),
            )
            .field("refused", &self.refused)
            .finish()
    }
}

impl Console {
    /// Ports 1, 2, … named and written as given, then the input port if named.
    pub fn new(
        ports: Vec<(&'static str, Box<dyn Write + Send>)>,
        input: Option<&'static str>,
    ) -> Self {
        let named = ports.len() + usize::from(input.is_some());
        let mut config = vec![0u8; 12];
        config[4..8].copy_from_slice(&(named as u32 + 1).to_le_bytes());
        Self {
            config,
            queue_sizes: vec![QUEUE_SIZE; 2 * (named + 1) + 2],
            input,
            input_open: false,
            pending_in: VecDeque::new(),
            ports: ports
                .into_iter()
                .map(|(name, sink)| Port {
                    name,
                    sink,
                    sent: 0,
                })
                .collect(),
            to_guest: VecDeque::new(),
            refused: 0,
            ready_ports: 0,
            first_output: 0,
        }
    }

    /// Bytes delivered so far on each port, in port order.
    pub fn sent(&self) -> Vec<u64> {
        self.ports.iter().map(|p| p.sent).collect()
    }

    /// The input port's number.
    fn input_port(&self) -> Option<usize> {
        self.input.map(|_| self.ports.len() + 1)
    }

    /// Takes as much of `data` as fits under [`INPUT_MAX`]; returns how much.
    pub fn push_input(&mut self, data: &[u8]) -> usize {
        let n = data
            .len()
            .min(INPUT_MAX.saturating_sub(self.pending_in.len()));
        self.pending_in.extend(&data[..n]);
        n
    }

    /// Input not yet in the guest.
    pub fn input_waiting(&self) -> usize {
        self.pending_in.len()
    }

    /// Moves waiting input into the input port's receive buffers, once the
    /// guest opened it; returns whether any buffer was used.
    pub fn deliver_input(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let Some(port) = self.input_port() else {
            return Ok(false);
        };
        let q = &mut queues[2 * port + 2];
        if !self.input_open || self.pending_in.is_empty() || !q.ready() || !q.is_valid(mem) {
            return Ok(false);
        }
        let mut used = false;
        while !self.pending_in.is_empty() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain {
                if !d.is_write_only() {
                    self.refused += 1;
                    break;
                }
                let n = (d.len() as usize).min(self.pending_in.len());
                let bytes: Vec<u8> = self.pending_in.range(..n).copied().collect();
                if mem.write_slice(&bytes, d.addr()).is_err() {
                    self.refused += 1;
                    break;
                }
                self.pending_in.drain(..n);
                written += n as u32;
                if self.pending_in.is_empty() {
                    break;
                }
            }
            add_used(q, mem, head, written)?;
            used = true;
        }
        Ok(used)
    }

    /// The queue index a port transmits on (port 0: 1; port p ≥ 1: 2p + 3).
    fn port_of_tx_queue(&self, index: usize) -> Option<usize> {
        if index >= 5 && index % 2 == 1 {
            let port = (index - 3) / 2;
            (port >= 1 && port <= self.ports.len()).then_some(port)
        } else {
            None
        }
    }

    fn message(id: u32, event: u16, value: u16, extra: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(8 + extra.len());
        m.extend_from_slice(&id.to_le_bytes());
        m.extend_from_slice(&event.to_le_bytes());
        m.extend_from_slice(&value.to_le_bytes());
        m.extend_from_slice(extra);
        m
    }

    /// Handles one control message from the guest.
    fn control(&mut self, msg: [u8; 8]) {
        let id = u32::from_le_bytes(msg[0..4].try_into().expect("4 bytes"));
        let event = u16::from_le_bytes([msg[4], msg[5]]);
        let value = u16::from_le_bytes([msg[6], msg[7]]);
        match event {
            DEVICE_READY if value == 1 => {
                let named = self.ports.len() + usize::from(self.input.is_some());
                for port in 1..=named as u32 {
                    self.to_guest
                        .push_back(Self::message(port, DEVICE_ADD, 0, &[]));
                }
            }
            PORT_READY if value == 1 => {
                let name = match (id as usize).checked_sub(1) {
                    Some(i) if i < self.ports.len() => self.ports[i].name,
                    Some(i) if i == self.ports.len() && self.input.is_some() => {
                        self.input.unwrap_or_default()
                    }
                    _ => {
                        self.refused += 1;
                        return;
                    }
                };
                let name = name.as_bytes().to_vec();
                self.ready_ports += 1;
                self.to_guest
                    .push_back(Self::message(id, PORT_NAME, 1, &name));
                self.to_guest
                    .push_back(Self::message(id, PORT_OPEN, 1, &[]));
            }
            PORT_OPEN if Some(id as usize) == self.input_port() => self.input_open = value == 1,
            // The guest opening or closing an output, or failing to add a
            // port: nothing to do.
            DEVICE_READY | PORT_READY | PORT_OPEN => {}
            _ => self.refused += 1,
        }
    }

    /// Moves waiting control messages into the guest's control receive
    /// buffers; returns whether any went.
    fn deliver(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let q = &mut queues[CONTROL_RX];
        if self.to_guest.is_empty() || !q.ready() || !q.is_valid(mem) {
            return Ok(false);
        }
        let mut used = false;
        while let Some(msg) = self.to_guest.front().cloned() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let written = match descs.first() {
                Some(d)
                    if descs.len() == 1
                        && d.is_write_only()
                        && d.len() as usize >= msg.len()
                        && mem.write_slice(&msg, d.addr()).is_ok() =>
                {
                    self.to_guest.pop_front();
                    msg.len() as u32
                }
                _ => {
                    self.refused += 1;
                    0
                }
            };
            add_used(q, mem, head, written)?;
            used = true;
        }
        Ok(used)
    }

    /// Writes one transmit chain to `port`'s sink; returns bytes taken.
    fn transmit(&mut self, port: usize, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u64 {
        if descs.iter().any(|d| d.is_write_only())
            || descs.iter().map(|d| u64::from(d.len())).sum::<u64>() > CHAIN_MAX
        {
            self.refused += 1;
            return 0;
        }
        let p = &mut self.ports[port - 1];
        let mut buf = Vec::new();
        let mut taken = 0;
        for d in descs {
            buf.resize(d.len() as usize, 0);
            if mem.read_slice(&mut buf, d.addr()).is_err() {
                self.refused += 1;
                break;
            }
            // A sink that fails (a closed pipe) drops the bytes, as a
            // console does; the guest is never stalled by it.
            if self.first_output == 0 && !buf.is_empty() {
                self.first_output = crate::sys::monotonic_ns();
            }
            let _ = p.sink.write_all(&buf).and_then(|()| p.sink.flush());
            p.sent += buf.len() as u64;
            taken += buf.len() as u64;
        }
        taken
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        F_MULTIPORT
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        if index == CONTROL_TX {
            used = serve_chains(&mut queues[CONTROL_TX], mem, |descs| {
                let mut msg = [0u8; 8];
                match descs.first() {
                    Some(d)
                        if !d.is_write_only()
                            && d.len() >= 8
                            && mem.read_slice(&mut msg, d.addr()).is_ok() =>
                    {
                        self.control(msg)
                    }
                    _ => self.refused += 1,
                }
                0
            })?;
        } else if let Some(port) = self.port_of_tx_queue(index) {
            used = serve_chains(&mut queues[index], mem, |descs| {
                self.transmit(port, descs, mem);
                0
            })?;
        }
        // Receive queues (the control one included) only post buffers: a
        // notification on them is a chance to deliver what waits.
        let delivered = self.deliver(queues, mem)?;
        let input = self.deliver_input(queues, mem)?;
        Ok(used || delivered || input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_map_to_their_transmit_queues() {
        let c = Console::new(
            vec![
                ("hyper.stdout", Box::new(std::io::sink())),
                ("hyper.stderr", Box::new(std::io::sink())),
            ],
            None,
        );
        assert_eq!(c.queue_max_sizes().len(), 8);
        assert_eq!(u32::from_le_bytes(c.config()[4..8].try_into().unwrap()), 3);
        let map: Vec<Option<usize>> = (0..10).map(|i| c.port_of_tx_queue(i)).collect();
        assert_eq!(
            map,
            [
                None,
                None,
                None,
                None,
                None,
                Some(1),
                None,
                Some(2),
                None,
                None
            ]
        );
    }

    #[test]
    fn the_handshake_names_each_port_and_refuses_unknown_ones() {
        let mut c = Console::new(
            vec![("hyper.stdout", Box::new(std::io::sink()))],
            Some("hyper.stdin"),
        );
        let msg = |id: u32, event: u16, value: u16| {
            let m = Console::message(id, event, value, &[]);
            <[u8; 8]>::try_from(m.as_slice()).unwrap()
        };
        let next = |c: &mut Console| c.to_guest.pop_front().unwrap();
        c.control(msg(0, DEVICE_READY, 1));
        assert_eq!(next(&mut c), Console::message(1, DEVICE_ADD, 0, &[]));
        assert_eq!(next(&mut c), Console::message(2, DEVICE_ADD, 0, &[]));
        c.control(msg(1, PORT_READY, 1));
        assert_eq!(
            next(&mut c),
            Console::message(1, PORT_NAME, 1, b"hyper.stdout")
        );
        assert_eq!(next(&mut c), Console::message(1, PORT_OPEN, 1, &[]));
        c.control(msg(2, PORT_READY, 1));
        assert_eq!(
            next(&mut c),
            Console::message(2, PORT_NAME, 1, b"hyper.stdin")
        );
        assert_eq!(next(&mut c), Console::message(2, PORT_OPEN, 1, &[]));
        assert_eq!(c.ready_ports, 2);
        // Input waits for the guest to open the input port.
        assert!(!c.input_open);
        c.control(msg(2, PORT_OPEN, 1));
        assert!(c.input_open);
        assert_eq!(c.push_input(&vec![7u8; INPUT_MAX + 10]), INPUT_MAX);
        for bad in [msg(9, PORT_READY, 1), msg(0, PORT_READY, 1), msg(1, 42, 0)] {
            c.control(bad);
        }
        assert!(c.to_guest.is_empty());
        assert_eq!(c.refused, 3);
    }
}
