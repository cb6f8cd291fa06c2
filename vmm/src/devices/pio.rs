//! The port-I/O devices: the COM1 console (a 16550 from vm-superio, its
//! interrupt on an irqfd), the COM2 control channel (also a 16550, carrying
//! the contract's control messages: hyperinit's `ready`, `drain` and report,
//! the host's requests), the exit port, and the i8042 reset line. Everything
//! else on the I/O bus reads as all-ones and ignores writes, like an empty
//! ISA slot.

use std::io::Write;

use hyper_contract::{GuestMessage, HostMessage, LineBuffer};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;
pub const EXIT_PORT: u16 = 0x501;
pub const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
/// The status line is one short line; anything longer is a misbehaving guest.
const STATUS_MAX: usize = 512;

/// Keeps what the guest writes on COM2, bounded.
#[derive(Debug, Clone, Default)]
pub struct StatusSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for StatusSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = STATUS_MAX.saturating_sub(v.len());
        v.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises a UART's interrupt through an irqfd, counting them.
#[derive(Debug)]
pub struct IrqTrigger(
    pub EventFd,
    pub std::sync::Arc<std::sync::atomic::AtomicU64>,
);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.write(1)
    }
}

/// Why the guest asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// A byte written to the exit port.
    ExitPort(u8),
    /// The i8042 reset line.
    Reset,
}

/// The legacy I/O bus.
pub struct PioBus {
    console: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    control: Serial<IrqTrigger, vm_superio::serial::NoEvents, StatusSink>,
    status: StatusSink,
    /// Requests held until hyperinit says `ready` on COM2 (bytes sent before
    /// it listens would be echoed or lost).
    held: Vec<HostMessage>,
    ready: bool,
    /// The line the guest is writing on COM2.
    line: LineBuffer,
    /// Interrupts both UARTs raised.
    pub interrupts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PioBus")
            .field("status", &self.status)
            .finish()
    }
}

impl PioBus {
    pub fn new(
        console_irq: EventFd,
        control_irq: EventFd,
        console_out: Box<dyn Write + Send>,
    ) -> Self {
        let status = StatusSink::default();
        let interrupts = std::sync::Arc::<std::sync::atomic::AtomicU64>::default();
        Self {
            console: Serial::new(IrqTrigger(console_irq, interrupts.clone()), console_out),
            control: Serial::new(IrqTrigger(control_irq, interrupts.clone()), status.clone()),
            interrupts,
            status,
            held: Vec::new(),
            ready: false,
            line: LineBuffer::default(),
        }
    }

    /// Queues a request for hyperinit on COM2, or holds it until hyperinit
    /// is ready; false when the guest's receive FIFO is full.
    pub fn send_control(&mut self, m: &HostMessage) -> bool {
        if !self.ready {
            if self.held.len() < 16 {
                self.held.push(*m);
            }
            return true;
        }
        let line = m.encode();
        self.control
            .enqueue_raw_bytes(&line)
            .is_ok_and(|n| n == line.len())
    }

    /// A complete line the guest wrote on COM2.
    fn control_line(&mut self, line: &[u8]) {
        match GuestMessage::decode(line) {
            Ok(GuestMessage::Ready) if !self.ready => {
                self.ready = true;
                for m in std::mem::take(&mut self.held) {
                    self.send_control(&m);
                }
            }
            // The stream ports are served as the guest notifies them, so
            // their bytes are already out: say so.
            Ok(GuestMessage::Drain { .. }) => {
                self.send_control(&HostMessage::Drained);
            }
            _ => {}
        }
    }

    /// A guest `out`: returns a stop request when the guest asked to stop.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<StopRequest> {
        let &value = data.first()?;
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                // An interrupt that cannot be raised is the guest's loss, not ours.
                let _ = self.console.write((p - COM1) as u8, value);
            }
            p if (COM2..COM2 + 8).contains(&p) => {
                let _ = self.control.write((p - COM2) as u8, value);
                // A byte to the transmit register (DLAB off) is the guest's.
                if p == COM2 && !self.control_dlab() {
                    if let Some(line) = self.line.push(value) {
                        self.control_line(&line);
                    }
                }
            }
            EXIT_PORT => return Some(StopRequest::ExitPort(value)),
            I8042_COMMAND if value == I8042_RESET => return Some(StopRequest::Reset),
            _ => {}
        }
        None
    }

    /// A guest `in`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1..COM1 + 8).contains(&p) => self.console.read((p - COM1) as u8),
            p if (COM2..COM2 + 8).contains(&p) => self.control.read((p - COM2) as u8),
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// Whether COM2's divisor latch is open (a write to port 0 sets the baud
    /// rate then, and is not data).
    fn control_dlab(&mut self) -> bool {
        self.control.read(3) & 0x80 != 0
    }

    /// What the guest wrote on the status channel (at most 512 bytes).
    pub fn status(&self) -> Vec<u8> {
        self.status
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn flush(&mut self) {
        let _ = self.console.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> PioBus {
        PioBus::new(
            EventFd::new(0).unwrap(),
            EventFd::new(0).unwrap(),
            Box::new(std::io::sink()),
        )
    }

    #[test]
    fn status_exit_and_reset() {
        let mut b = bus();
        for byte in b"exit=3\n" {
            assert_eq!(b.write(COM2, &[*byte]), None);
        }
        assert_eq!(b.status(), b"exit=3\n");
        assert_eq!(b.write(EXIT_PORT, &[7]), Some(StopRequest::ExitPort(7)));
        assert_eq!(b.write(I8042_COMMAND, &[0xfe]), Some(StopRequest::Reset));
        assert_eq!(b.write(I8042_COMMAND, &[0x20]), None);
    }

    #[test]
    fn a_flooding_guest_is_bounded() {
        let mut b = bus();
        for _ in 0..10_000 {
            b.write(COM2, b"x");
        }
        assert_eq!(b.status().len(), STATUS_MAX);
    }

    #[test]
    fn empty_ports_read_all_ones_and_empty_writes_are_ignored() {
        let mut b = bus();
        let mut d = [0u8; 4];
        b.read(0x80, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.read(COM2 + 5, &mut d[..1]);
        assert_eq!(d[0] & 0x60, 0x60, "COM2 transmitter idle");
        assert!(b.send_control(&HostMessage::Signal(15)));
        b.read(COM2 + 5, &mut d[..1]);
        assert_eq!(d[0] & 1, 0, "held until hyperinit is ready");
        for &c in b"ready\n" {
            b.write(COM2, &[c]);
        }
        b.read(COM2 + 5, &mut d[..1]);
        assert_eq!(d[0] & 1, 1, "data ready");
        b.read(COM2, &mut d[..1]);
        assert_eq!(d[0], b's');
        assert_eq!(b.write(EXIT_PORT, &[]), None);
    }
}
