//! Telling the host how the app ended, then stopping the VM.
//!
//! The protocol (shared by both backends, written in the contract crate):
//! one report line on the second UART (COM2, I/O port 0x2f8) — `exit=N`,
//! `signal=N` or `error=MESSAGE` — then a byte to the exit port 0x501 (0
//! after a report, 1 after an init error),
//! which the VMM (or QEMU's `isa-debug-exit`) turns into the end of the VM.
//! Should the exit port not stop the machine, a reset does (`reboot=t`).

use hyper_contract::GuestMessage;

use crate::sys::process;

pub const STATUS_PORT: u16 = 0x2f8;
pub const EXIT_PORT: u16 = 0x501;
const LSR: u16 = 5;
const LSR_THRE: u8 = 0x20;

/// How the app (or init) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Signaled(i32),
    InitError(String),
}

/// The report for an outcome.
pub fn report(o: &Outcome) -> GuestMessage {
    match o {
        Outcome::Exited(c) => GuestMessage::Exit(*c),
        Outcome::Signaled(s) => GuestMessage::Signal(*s),
        Outcome::InitError(m) => GuestMessage::Error(m.clone()),
    }
}

/// Writes one message on COM2 (bounded wait per byte).
fn send(m: &GuestMessage) {
    for b in m.encode() {
        // Bounded wait for the transmitter; emulated UARTs are always ready.
        for _ in 0..100_000 {
            if process::inb(STATUS_PORT + LSR) & LSR_THRE != 0 {
                break;
            }
        }
        process::outb(STATUS_PORT, b);
    }
}

/// Tells the host that hyperinit listens on COM2 now.
pub fn announce_ready() {
    if process::ioperm(STATUS_PORT, 8).is_ok() {
        send(&GuestMessage::Ready);
    }
}

/// Tells the host hyperinit's milestones (`--stats`).
pub fn announce_timings(t: [u64; 3]) {
    if process::ioperm(STATUS_PORT, 8).is_ok() {
        send(&GuestMessage::Timings {
            init: t[0],
            root: t[1],
            exec: t[2],
        });
    }
}

/// Tells the host how many bytes went out on the stream ports; the host
/// answers `drained` once it has them all.
pub fn announce_drain(sent: [u64; 2]) -> bool {
    if process::ioperm(STATUS_PORT, 8).is_err() {
        return false;
    }
    send(&GuestMessage::Drain {
        stdout: sent[0],
        stderr: sent[1],
    });
    true
}

/// Reports the outcome and ends the VM. Never returns.
pub fn report_and_stop(o: &Outcome) -> ! {
    process::sync();
    if process::ioperm(STATUS_PORT, 8).is_ok() && process::ioperm(EXIT_PORT, 1).is_ok() {
        send(&report(o));
        process::outb(EXIT_PORT, u8::from(matches!(o, Outcome::InitError(_))));
    }
    process::reboot()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_become_reports() {
        assert_eq!(report(&Outcome::Exited(7)).encode(), b"exit=7\n");
        assert_eq!(report(&Outcome::Signaled(9)).encode(), b"signal=9\n");
        assert_eq!(
            report(&Outcome::InitError("bad\nthing".into())).encode(),
            b"error=bad thing\n"
        );
    }
}
