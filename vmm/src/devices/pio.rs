//! The port-I/O devices: the COM1 console (a 16550 from vm-superio, its
//! interrupt on an irqfd), COM2 (also a 16550: the control channel of
//! inits older than contract 3, see [`crate::control`]), the exit port, and
//! the i8042 reset line. Everything else on the I/O bus reads as all-ones
//! and ignores writes, like an empty ISA slot.

use std::io::Write;
use std::sync::{Arc, Mutex};

use hyper_contract::HostMessage;

use crate::control::{Carrier, Control};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;
pub const EXIT_PORT: u16 = 0x501;
pub const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

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
    com2: Serial<IrqTrigger, vm_superio::serial::NoEvents, std::io::Sink>,
    control: Arc<Mutex<Control>>,
    /// The guest asked for `drained` on COM2: the bus takes the console's
    /// output first, then answers ([`PioBus::take_drain`]).
    drain: bool,
    /// Interrupts both UARTs raised.
    pub interrupts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PioBus")
            .field("drain", &self.drain)
            .finish()
    }
}

impl PioBus {
    pub fn new(
        console_irq: EventFd,
        control_irq: EventFd,
        console_out: Box<dyn Write + Send>,
        control: Arc<Mutex<Control>>,
    ) -> Self {
        let interrupts = std::sync::Arc::<std::sync::atomic::AtomicU64>::default();
        Self {
            console: Serial::new(IrqTrigger(console_irq, interrupts.clone()), console_out),
            com2: Serial::new(IrqTrigger(control_irq, interrupts.clone()), std::io::sink()),
            control,
            interrupts,
            drain: false,
        }
    }

    /// Puts a message for hyperinit into COM2's receive FIFO; false when
    /// the FIFO is full.
    pub fn send_com2(&mut self, m: &HostMessage) -> bool {
        let line = m.encode();
        self.com2
            .enqueue_raw_bytes(&line)
            .is_ok_and(|n| n == line.len())
    }

    /// Whether the guest asked for `drained` on COM2 since the last call.
    pub fn take_drain(&mut self) -> bool {
        std::mem::take(&mut self.drain)
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
                let _ = self.com2.write((p - COM2) as u8, value);
                // A byte to the transmit register (DLAB off) is the guest's.
                if p == COM2 && !self.com2_dlab() {
                    let replies = crate::lock(&self.control).from_guest(Carrier::Com2, &[value]);
                    for m in &replies.send {
                        self.send_com2(m);
                    }
                    self.drain |= replies.drain;
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
            p if (COM2..COM2 + 8).contains(&p) => self.com2.read((p - COM2) as u8),
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// Whether COM2's divisor latch is open (a write to port 0 sets the baud
    /// rate then, and is not data).
    fn com2_dlab(&mut self) -> bool {
        self.com2.read(3) & 0x80 != 0
    }

    pub fn flush(&mut self) {
        let _ = self.console.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (PioBus, Arc<Mutex<Control>>) {
        let control = Arc::new(Mutex::new(Control::default()));
        let b = PioBus::new(
            EventFd::new(0).unwrap(),
            EventFd::new(0).unwrap(),
            Box::new(std::io::sink()),
            control.clone(),
        );
        (b, control)
    }

    #[test]
    fn status_exit_and_reset() {
        let (mut b, control) = bus();
        for byte in b"exit=3\n" {
            assert_eq!(b.write(COM2, &[*byte]), None);
        }
        assert_eq!(crate::lock(&control).status(), b"exit=3\n");
        assert_eq!(b.write(EXIT_PORT, &[7]), Some(StopRequest::ExitPort(7)));
        assert_eq!(b.write(I8042_COMMAND, &[0xfe]), Some(StopRequest::Reset));
        assert_eq!(b.write(I8042_COMMAND, &[0x20]), None);
    }

    #[test]
    fn empty_ports_read_all_ones_and_requests_wait_for_ready() {
        let (mut b, control) = bus();
        let mut d = [0u8; 4];
        b.read(0x80, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.read(COM2 + 5, &mut d[..1]);
        assert_eq!(d[0] & 0x60, 0x60, "COM2 transmitter idle");
        assert_eq!(crate::lock(&control).request(HostMessage::Signal(15)), None);
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
        for &c in b"drain 0 0\n" {
            b.write(COM2, &[c]);
        }
        assert!(b.take_drain());
        assert!(!b.take_drain());
    }
}
