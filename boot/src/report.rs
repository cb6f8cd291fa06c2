//! Telling the host how the app ended, then stopping the VM; and the
//! control channel both ways ([`channel`]).
//!
//! The protocol (shared by both backends, written in the contract crate):
//! one report line on the control channel — `exit=N`, `signal=N` or
//! `error=MESSAGE` — then a byte to the exit port 0x501 (0 after a report,
//! 1 after an init error), which the VMM (or QEMU's `isa-debug-exit`) turns
//! into the end of the VM, taking what the guest queued on its ports first.
//! Should the exit port not stop the machine, a reset does (`reboot=t`).
//!
//! The channel is the `hyper.control` virtio-console port when the host
//! says it offers one (`hyper.control=port` on the kernel command line;
//! contract 3): one write per message, no exit per byte. Otherwise, or when
//! the port cannot be had, COM2 (I/O port 0x2f8), byte by byte.

use std::fs::File;
use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use hyper_contract::GuestMessage;

use crate::sys::process;

pub const STATUS_PORT: u16 = 0x2f8;
pub const EXIT_PORT: u16 = 0x501;
const LSR: u16 = 5;
const LSR_THRE: u8 = 0x20;
/// The kernel argument by which the host says the control port exists.
const PORT_ARG: &str = "hyper.control=port";

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

/// The control port, opened for reading and writing, when the host offers
/// one; None: COM2 carries the channel.
pub fn channel() -> Option<&'static File> {
    static PORT: OnceLock<Option<File>> = OnceLock::new();
    PORT.get_or_init(|| {
        let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
        if !cmdline.split_whitespace().any(|w| w == PORT_ARG) {
            return None;
        }
        let dev = crate::streams::await_port(hyper_contract::CONTROL_PORT, Duration::from_secs(5))?;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(dev)
            .ok()
    })
    .as_ref()
}

/// Writes one message on the control channel (on COM2: a bounded wait
/// per byte). False when no channel can be had.
fn send(m: &GuestMessage) -> bool {
    let line = m.encode();
    if let Some(mut port) = channel() {
        return port.write_all(&line).is_ok();
    }
    if process::ioperm(STATUS_PORT, 8).is_err() {
        return false;
    }
    for b in line {
        // Bounded wait for the transmitter; emulated UARTs are always ready.
        for _ in 0..100_000 {
            if process::inb(STATUS_PORT + LSR) & LSR_THRE != 0 {
                break;
            }
        }
        process::outb(STATUS_PORT, b);
    }
    true
}

/// Tells the host that hyperinit listens now.
pub fn announce_ready() {
    send(&GuestMessage::Ready);
}

/// At the snapshot point (contract 4): says `ready` and `waiting` on the
/// control port, then reads until the host's `start N` and its body. Host
/// requests that come first are held for the listener (returned with
/// whatever followed the body).
pub fn await_start(mut port: &File) -> Result<(hyper_contract::Start, Vec<u8>), String> {
    use std::io::Read;
    if !send(&GuestMessage::Ready) || !send(&GuestMessage::Waiting) {
        return Err("cannot write to the control port".into());
    }
    let mut held = Vec::new();
    let mut line = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut read_more = |pending: &mut Vec<u8>| -> Result<(), String> {
        loop {
            match port.read(&mut buf) {
                Ok(0) => return Err("the control port closed before the start message".into()),
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading the control port: {e}")),
            }
        }
    };
    loop {
        // One line at a time from what was read.
        let Some(nl) = pending.iter().position(|b| *b == b'\n') else {
            if pending.len() > hyper_contract::control::MAX_LINE {
                return Err("an overlong line on the control port".into());
            }
            read_more(&mut pending)?;
            continue;
        };
        line.clear();
        line.extend(pending.drain(..=nl));
        match hyper_contract::decode_start_header(&line) {
            None => held.extend_from_slice(&line),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(n)) => {
                while pending.len() < n {
                    read_more(&mut pending)?;
                }
                let body: Vec<u8> = pending.drain(..n).collect();
                let start = hyper_contract::Start::parse(&body).map_err(|e| {
                    let mut msg = format!("start message: {e}");
                    if let Some(src) = std::error::Error::source(&e) {
                        msg.push_str(&format!(": {src}"));
                    }
                    msg
                })?;
                held.extend_from_slice(&pending);
                return Ok((start, held));
            }
        }
    }
}

/// Tells the host hyperinit's milestones (`--stats`); the last is when
/// the Start came (0: the run configuration was in the initrd). The line
/// says when it was written, for the host to place them on its clock.
pub fn announce_timings(t: [u64; 4]) {
    send(&GuestMessage::Timings {
        init: t[0],
        root: t[1],
        exec: t[2],
        start: (t[3] != 0).then_some(t[3]),
        now: Some(process::monotonic_us()),
    });
}

/// Tells the host how many bytes went out on the stream ports; the host
/// answers `drained` once it has them all.
pub fn announce_drain(sent: [u64; 2]) -> bool {
    send(&GuestMessage::Drain {
        stdout: sent[0],
        stderr: sent[1],
    })
}

extern "C" fn restart(_sig: libc::c_int) {
    process::reboot()
}

/// Reports the outcome and ends the VM. Never returns.
pub fn report_and_stop(o: &Outcome) -> ! {
    process::sync();
    if send(&report(o)) && process::ioperm(EXIT_PORT, 1).is_ok() {
        // Should the `out` fault all the same, the machine restarts instead
        // of PID 1 dying (a kernel panic). That happened to restored guests
        // under QEMU's TCG emulation of SVM (the nested test host), which
        // checks the I/O bitmap only for a TSS of the "available" type,
        // while the VMM restored the "busy" type KVM reports (it restores
        // the available type on AMD hosts now).
        process::on_fault(restart);
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
