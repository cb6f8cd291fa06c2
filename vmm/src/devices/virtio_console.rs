//! virtio-console with named ports (`VIRTIO_CONSOLE_F_MULTIPORT`, virtio 1.2
//! section 5.3): the app's stdout and stderr leave the guest in whole
//! buffers, and the control channel travels both ways in whole messages.
//!
//! Ports 1.. carry the names hyperinit looks for: the outputs
//! (`hyper.stdout`, `hyper.stderr`), then `hyper.stdin` with `-i`, then
//! `hyper.control` (contract 3; see [`crate::control`]); port 0 is never
//! added. The control handshake: the guest says DEVICE_READY, the device
//! adds each port, the guest says PORT_READY for it, the device gives its
//! name and opens it. What the guest sends on an output's transmit queue goes
//! to that port's sink, in order, before the buffer is returned (so nothing
//! is lost at exit), and is counted. Every notification serves the outputs
//! before the control port, so the guest's `drain` is answered only after
//! every byte it wrote before it. Input (stdin, the host's control
//! requests) waits in a bounded buffer until the guest has opened the port
//! and posted receive buffers; another thread may add to it.
//!
//! The guest is hostile: control messages are taken only from readable
//! descriptors of exactly their size or more, ports it names must exist,
//! transmit data only from readable descriptors and at most 1 MiB per chain;
//! anything else is refused (counted) without stopping the device. Messages
//! for the guest wait until it posts writable buffers big enough for them.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use hyper_contract::HostMessage;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::virtio_mmio::{add_used, serve_chains, DeviceError, VirtioDevice};
use crate::control::{Carrier, Control};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;

// virtio-bindings has no virtio_console module: these are the virtio 1.2
// spec's (5.3.3, 5.3.6.2).
const F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 64;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
/// Input held for the guest at most; the host's reader waits beyond it.
pub const INPUT_MAX: usize = 1 << 20;
/// Control requests held for the guest at most (a few short lines).
const CONTROL_IN_MAX: usize = 4096;
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
/// Most bytes taken from one transmit chain.
const CHAIN_MAX: u64 = 1 << 20;

/// What a port carries.
enum Kind {
    /// Guest to host: bytes to a sink.
    Output(Box<dyn Write + Send>),
    /// Host to guest: the app's stdin.
    Input,
    /// Both ways: the control channel.
    Control(Arc<Mutex<Control>>),
}

struct Port {
    name: &'static str,
    kind: Kind,
    /// Bytes the guest sent on it.
    sent: u64,
    /// Whether the guest opened it.
    open: bool,
    /// Bytes waiting for the guest's receive buffers.
    pending: VecDeque<u8>,
}

/// A console device whose ports 1..=N are named.
pub struct Console {
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    ports: Vec<Port>,
    /// Control messages waiting for a guest buffer.
    to_guest: VecDeque<Vec<u8>>,
    /// Requests refused as malformed (for `--verbose` and tests).
    pub refused: u64,
    /// Ports the guest's driver said it made ready (for `--verbose` and tests).
    pub ready_ports: u32,
    /// When the first byte of the app's output came (monotonic ns; 0: none).
    pub first_output: u64,
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
    /// Ports 1, 2, … named and written as given, then the input port if
    /// named, then the control port if there is a control channel.
    pub fn new(
        outputs: Vec<(&'static str, Box<dyn Write + Send>)>,
        input: Option<&'static str>,
        control: Option<Arc<Mutex<Control>>>,
    ) -> Self {
        let port = |name, kind| Port {
            name,
            kind,
            sent: 0,
            open: false,
            pending: VecDeque::new(),
        };
        let mut ports: Vec<Port> = outputs
            .into_iter()
            .map(|(name, sink)| port(name, Kind::Output(sink)))
            .collect();
        if let Some(name) = input {
            ports.push(port(name, Kind::Input));
        }
        if let Some(c) = control {
            ports.push(port(hyper_contract::CONTROL_PORT, Kind::Control(c)));
        }
        let mut config = vec![0u8; 12];
        config[4..8].copy_from_slice(&(ports.len() as u32 + 1).to_le_bytes());
        Self {
            config,
            queue_sizes: vec![QUEUE_SIZE; 2 * (ports.len() + 1) + 2],
            ports,
            to_guest: VecDeque::new(),
            refused: 0,
            ready_ports: 0,
            first_output: 0,
        }
    }

    /// Bytes delivered so far on each output, in port order.
    pub fn sent(&self) -> Vec<u64> {
        self.ports
            .iter()
            .filter(|p| matches!(p.kind, Kind::Output(_)))
            .map(|p| p.sent)
            .collect()
    }

    /// The port (1-based) of the first port matching `f`.
    fn find(&self, f: impl Fn(&Kind) -> bool) -> Option<usize> {
        self.ports.iter().position(|p| f(&p.kind)).map(|i| i + 1)
    }

    /// Takes as much of `data` as fits under [`INPUT_MAX`] for the input
    /// port; returns how much.
    pub fn push_input(&mut self, data: &[u8]) -> usize {
        let Some(p) = self.find(|k| matches!(k, Kind::Input)) else {
            return 0;
        };
        let pending = &mut self.ports[p - 1].pending;
        let n = data.len().min(INPUT_MAX.saturating_sub(pending.len()));
        pending.extend(&data[..n]);
        n
    }

    /// Input not yet in the guest.
    pub fn input_waiting(&self) -> usize {
        self.find(|k| matches!(k, Kind::Input))
            .map_or(0, |p| self.ports[p - 1].pending.len())
    }

    /// Queues a request for hyperinit on the control port; false when too
    /// much waits already (the guest does not read).
    pub fn push_control(&mut self, m: &HostMessage) -> bool {
        let Some(p) = self.find(|k| matches!(k, Kind::Control(_))) else {
            return false;
        };
        let pending = &mut self.ports[p - 1].pending;
        let line = m.encode();
        if pending.len() + line.len() > CONTROL_IN_MAX {
            return false;
        }
        pending.extend(&line);
        true
    }

    /// Bytes for hyperinit on the control port (requests, the start
    /// message) that no receive buffer has taken yet.
    pub fn control_waiting(&self) -> usize {
        self.find(|k| matches!(k, Kind::Control(_)))
            .map_or(0, |p| self.ports[p - 1].pending.len())
    }

    /// Queues raw bytes for hyperinit on the control port (a `start`
    /// message and its body); false when too much waits already.
    pub fn push_control_bytes(&mut self, bytes: &[u8]) -> bool {
        let Some(p) = self.find(|k| matches!(k, Kind::Control(_))) else {
            return false;
        };
        let pending = &mut self.ports[p - 1].pending;
        if pending.len() + bytes.len() > hyper_contract::START_MAX + CONTROL_IN_MAX {
            return false;
        }
        pending.extend(bytes);
        true
    }

    /// Moves waiting input of every open port into its receive buffers;
    /// returns whether any buffer was used.
    pub fn deliver_input(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        for (i, port) in self.ports.iter_mut().enumerate() {
            let q = &mut queues[2 * (i + 1) + 2];
            if !q.ready() || !q.is_valid(mem) {
                continue;
            }
            if !port.open || port.pending.is_empty() {
                ask_kicks(q, mem, !port.pending.is_empty())?;
                continue;
            }
            while !port.pending.is_empty() {
                let Some(chain) = next_buffer(q, mem)? else {
                    break;
                };
                let head = chain.head_index();
                let mut written = 0u32;
                for d in chain {
                    if !d.is_write_only() {
                        self.refused += 1;
                        break;
                    }
                    let n = (d.len() as usize).min(port.pending.len());
                    let bytes: Vec<u8> = port.pending.range(..n).copied().collect();
                    if mem.write_slice(&bytes, d.addr()).is_err() {
                        self.refused += 1;
                        break;
                    }
                    port.pending.drain(..n);
                    written += n as u32;
                    if port.pending.is_empty() {
                        break;
                    }
                }
                add_used(q, mem, head, written)?;
                used = true;
            }
            if port.pending.is_empty() {
                ask_kicks(q, mem, false)?;
            }
        }
        Ok(used)
    }

    /// The port a transmit queue belongs to (port 0: queue 1; port p ≥ 1:
    /// 2p + 3), if it is one of ours.
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
        let port = (id as usize)
            .checked_sub(1)
            .filter(|&i| i < self.ports.len());
        match event {
            DEVICE_READY if value == 1 => {
                for port in 1..=self.ports.len() as u32 {
                    self.to_guest
                        .push_back(Self::message(port, DEVICE_ADD, 0, &[]));
                }
            }
            PORT_READY if value == 1 => {
                let Some(i) = port else {
                    self.refused += 1;
                    return;
                };
                let name = self.ports[i].name.as_bytes().to_vec();
                self.ready_ports += 1;
                self.to_guest
                    .push_back(Self::message(id, PORT_NAME, 1, &name));
                self.to_guest
                    .push_back(Self::message(id, PORT_OPEN, 1, &[]));
            }
            PORT_OPEN => match port {
                Some(i) => self.ports[i].open = value == 1,
                None => self.refused += 1,
            },
            // The guest failing to add a port: nothing to do.
            DEVICE_READY | PORT_READY => {}
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
        if !q.ready() || !q.is_valid(mem) {
            return Ok(false);
        }
        let mut used = false;
        while let Some(msg) = self.to_guest.front().cloned() {
            let Some(chain) = next_buffer(q, mem)? else {
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
        if self.to_guest.is_empty() {
            ask_kicks(q, mem, false)?;
        }
        Ok(used)
    }

    /// Reads one transmit chain of `port` and hands its bytes to `take`;
    /// returns bytes taken.
    fn transmit(
        &mut self,
        port: usize,
        descs: &[Descriptor],
        mem: &GuestMemoryMmap,
        mut take: impl FnMut(&mut Port, &[u8]),
    ) -> u64 {
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
            take(p, &buf);
            p.sent += buf.len() as u64;
            taken += buf.len() as u64;
        }
        taken
    }

    /// Serves every chain on the transmit queue of `port`.
    fn serve_port(
        &mut self,
        port: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let index = 2 * port + 3;
        if !queues[index].ready() || !queues[index].is_valid(mem) {
            return Ok(false);
        }
        let mut first_output = self.first_output;
        let mut replies = Vec::new();
        let used = serve_chains(&mut queues[index], mem, |descs| {
            self.transmit(port, descs, mem, |p, bytes| match &mut p.kind {
                Kind::Output(sink) => {
                    if first_output == 0 && !bytes.is_empty() {
                        first_output = crate::sys::monotonic_ns();
                    }
                    // A sink that fails (a closed pipe) drops the bytes, as
                    // a console does; the guest is never stalled by it.
                    let _ = sink.write_all(bytes).and_then(|()| sink.flush());
                }
                Kind::Control(c) => replies.push(crate::lock(c).from_guest(Carrier::Port, bytes)),
                Kind::Input => {}
            });
            0
        })?;
        self.first_output = first_output;
        for r in replies {
            // Outputs were served before this port (see `process`): every
            // byte the guest wrote before its `drain` is out.
            for m in r
                .send
                .iter()
                .chain(r.drain.then_some(&HostMessage::Drained))
            {
                self.push_control(m);
            }
        }
        Ok(used)
    }

    /// Serves every port's transmit queue, the outputs first.
    pub fn serve_all(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        let order: Vec<usize> = (1..=self.ports.len())
            .filter(|&p| matches!(self.ports[p - 1].kind, Kind::Output(_)))
            .chain(
                (1..=self.ports.len())
                    .filter(|&p| matches!(self.ports[p - 1].kind, Kind::Control(_))),
            )
            .collect();
        for port in order {
            used |= self.serve_port(port, queues, mem)?;
        }
        Ok(used)
    }
}

/// Notification suppression on a receive queue. The device fills receive
/// buffers only when it has something for the guest, so the driver's kick
/// for each buffer it posts (a queue's worth per port at boot) would be an
/// exit for nothing: with nothing waiting the queue asks for none
/// (`VRING_USED_F_NO_NOTIFY`); with something `waiting` it asks for them
/// again, and returns whether buffers came in the meantime.
fn ask_kicks(q: &mut Queue, mem: &GuestMemoryMmap, waiting: bool) -> Result<bool, DeviceError> {
    if waiting {
        q.enable_notification(mem).map_err(DeviceError::UsedRing)
    } else {
        q.disable_notification(mem).map_err(DeviceError::UsedRing)?;
        Ok(false)
    }
}

/// The next receive buffer for something waiting. With none, the queue asks
/// for kicks and is looked at once more, so a buffer posted in between is
/// not left waiting for a kick that never comes (and a hostile ring that
/// claims buffers it does not have cannot make the device spin).
fn next_buffer<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, DeviceError> {
    if let Some(chain) = q.pop_descriptor_chain(mem) {
        return Ok(Some(chain));
    }
    Ok(if ask_kicks(q, mem, true)? {
        q.pop_descriptor_chain(mem)
    } else {
        None
    })
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

    /// The guest's driver sends each control message and then spins, with
    /// a lock held, until the device gives the buffer back
    /// (`__send_control_msg`). Served in the notifying vCPU's own exit, the
    /// buffer is back when the guest resumes: no spin while another host
    /// thread is woken and scheduled (on a one-CPU host, until the vCPU
    /// thread is preempted; the nested test host has been caught frozen
    /// in that spin).
    fn served_in_exit(&self, index: usize) -> bool {
        index == CONTROL_TX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn flush(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        self.serve_all(queues, mem)
    }

    fn save(&self) -> serde_json::Value {
        let ports: Vec<serde_json::Value> = self
            .ports
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "open": p.open,
                    "pending": p.pending.iter().copied().collect::<Vec<u8>>(),
                })
            })
            .collect();
        serde_json::json!({
            "ports": ports,
            "to_guest": self.to_guest,
            "ready_ports": self.ready_ports,
        })
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let ports = v["ports"].as_array().ok_or("no ports")?;
        if ports.len() != self.ports.len() {
            return Err("the console's ports differ".into());
        }
        for (p, s) in self.ports.iter_mut().zip(ports) {
            if s["name"].as_str() != Some(p.name) {
                return Err("the console's ports differ".into());
            }
            p.open = s["open"].as_bool().unwrap_or(false);
            p.pending = serde_json::from_value(s["pending"].clone()).map_err(|e| e.to_string())?;
        }
        self.to_guest = serde_json::from_value(v["to_guest"].clone()).map_err(|e| e.to_string())?;
        self.ready_ports = v["ready_ports"].as_u64().unwrap_or(0) as u32;
        Ok(())
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
        } else if self.port_of_tx_queue(index).is_some() {
            // Any port's notification serves them all, outputs first: a
            // control message never overtakes output written before it.
            used = self.serve_all(queues, mem)?;
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
            None,
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
        assert!(!c.ports[1].open);
        c.control(msg(2, PORT_OPEN, 1));
        assert!(c.ports[1].open);
        assert_eq!(c.push_input(&vec![7u8; INPUT_MAX + 10]), INPUT_MAX);
        for bad in [msg(9, PORT_READY, 1), msg(0, PORT_READY, 1), msg(1, 42, 0)] {
            c.control(bad);
        }
        assert!(c.to_guest.is_empty());
        assert_eq!(c.refused, 3);
    }

    /// A receive queue asks for no kicks while nothing waits for the guest,
    /// for kicks again once something waits and no buffer is left, and
    /// delivers on the kick that brings a buffer.
    #[test]
    fn receive_queues_ask_for_kicks_only_while_input_waits() {
        use vm_memory::GuestAddress;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        let mut c = Console::new(Vec::new(), Some("hyper.stdin"), None);
        let mut queues: Vec<Queue> = c
            .queue_max_sizes()
            .iter()
            .map(|_| Queue::new(4).unwrap())
            .collect();
        let rx = 4; // port 1's receive queue
        let q = &mut queues[rx];
        q.set_size(4);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        let msg = |id: u32, event: u16, value: u16| {
            let m = Console::message(id, event, value, &[]);
            <[u8; 8]>::try_from(m.as_slice()).unwrap()
        };
        c.control(msg(0, DEVICE_READY, 1));
        c.control(msg(1, PORT_READY, 1));
        c.control(msg(1, PORT_OPEN, 1));
        // The guest posts buffer `n` (16 writable bytes at 0x4000 + 16n).
        let post = |n: u16| {
            let at = desc + 16 * u64::from(n);
            mem.write_obj(0x4000 + 16 * u64::from(n), GuestAddress(at))
                .unwrap();
            mem.write_obj(16u32, GuestAddress(at + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(at + 12)).unwrap(); // WRITE
            mem.write_obj(n, GuestAddress(avail + 4 + 2 * u64::from(n % 4)))
                .unwrap();
            mem.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
        };
        let flags = || mem.read_obj::<u16>(GuestAddress(used)).unwrap();
        let filled = || mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        post(0);
        assert!(!c.process(rx, &mut queues, &mem).unwrap());
        assert_eq!(flags(), 1, "nothing waits: no kicks wanted");
        c.push_input(b"hello");
        assert!(c.deliver_input(&mut queues, &mem).unwrap());
        assert_eq!((filled(), flags()), (1, 1));
        c.push_input(&[7u8; 20]);
        assert!(!c.deliver_input(&mut queues, &mem).unwrap());
        assert_eq!(flags(), 0, "input waits without a buffer: kicks wanted");
        post(1);
        assert!(c.process(rx, &mut queues, &mem).unwrap());
        assert_eq!((filled(), flags(), c.input_waiting()), (2, 0, 4));
        post(2);
        assert!(c.process(rx, &mut queues, &mem).unwrap());
        assert_eq!((filled(), flags(), c.input_waiting()), (3, 1, 0));
        // A hostile ring claiming buffers it cannot have: looked at once
        // more, then left waiting (no spin), the input kept.
        mem.write_obj(200u16, GuestAddress(avail + 2)).unwrap();
        c.push_input(b"x");
        assert!(!c.deliver_input(&mut queues, &mem).unwrap());
        assert_eq!((filled(), c.input_waiting()), (3, 1));
    }
}
