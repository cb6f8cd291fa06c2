//! hyperboot's exit codes, in one place: how a run ended becomes one
//! [`Exit`], and that one exit code.
//!
//! The app's own exit code passes through; these are hyperboot's own:
//!
//! | code | meaning |
//! | --- | --- |
//! | 128+N | the app was killed by signal N (or hyperboot was, before the app ended) |
//! | 127 | the command was not found in the image |
//! | 126 | the command could not be run (permission, not executable) |
//! | 125 | hyperboot failed: bad arguments, a refused artifact, no usable backend |
//! | 124 | `--timeout` expired; the VM was stopped |
//! | 123 | hyperinit failed inside the guest (its message is printed) |
//! | 122 | the guest stopped without reporting a status (kernel panic or reset) |
//!
//! 126 and 127 follow `docker run`; like Docker's, they can collide with an
//! app's own codes.

use hyper_contract::GuestMessage;

/// hyperboot failed (bad arguments, a refused artifact, no usable backend).
pub const FAILED: u8 = 125;
pub const TIMEOUT: u8 = 124;
pub const INIT_FAILED: u8 = 123;
pub const NO_STATUS: u8 = 122;

/// How a VM ended, whatever ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The guest stopped by itself (after its report, or without one).
    Guest,
    /// hyperboot was asked to stop by signal N and ended the VM before the
    /// app ended.
    Signal(i32),
    /// `--timeout` expired and hyperboot ended the VM.
    Timeout,
}

/// What a backend saw of a finished run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ending: Ending,
    /// hyperinit's report, if it made one.
    pub report: Option<GuestMessage>,
    /// Why the guest stopped without a report, when the backend knows.
    pub why: Option<String>,
}

/// hyperboot's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Exit {
    /// The app exited with this code.
    App(u8),
    /// The app was killed by this signal.
    AppKilled(u8),
    /// hyperboot was stopped by this signal before the app ended.
    Stopped(i32),
    /// `--timeout` expired.
    Timeout(f64),
    /// hyperinit failed in the guest, saying this.
    InitFailed(String),
    /// The guest stopped without a report; why, if known.
    NoStatus(Option<String>),
    /// hyperboot itself failed (the message is its error's).
    Failed,
}

impl Exit {
    /// Maps a run to its exit; `timeout` is `--timeout` in seconds.
    pub fn of(o: &Outcome, timeout: f64) -> Exit {
        match (&o.ending, &o.report) {
            (Ending::Timeout, _) => Exit::Timeout(timeout),
            (Ending::Signal(s), _) => Exit::Stopped(*s),
            (Ending::Guest, Some(GuestMessage::Exit(c))) => Exit::App((c & 0xff) as u8),
            (Ending::Guest, Some(GuestMessage::Signal(s))) => Exit::AppKilled(*s as u8),
            (Ending::Guest, Some(GuestMessage::Error(m))) => Exit::InitFailed(m.clone()),
            (Ending::Guest, _) => Exit::NoStatus(o.why.clone()),
        }
    }

    pub fn code(&self) -> u8 {
        match self {
            Exit::App(c) => *c,
            Exit::AppKilled(s) => 128u8.saturating_add(*s),
            Exit::Stopped(s) => 128u8.saturating_add(*s as u8),
            Exit::Timeout(_) => TIMEOUT,
            Exit::InitFailed(_) => INIT_FAILED,
            Exit::NoStatus(_) => NO_STATUS,
            Exit::Failed => FAILED,
        }
    }

    /// What hyperboot says about it on stderr, if anything.
    pub fn message(&self) -> Option<String> {
        match self {
            Exit::Timeout(t) => Some(format!(
                "the VM did not finish within --timeout {t}s; stopped it"
            )),
            Exit::InitFailed(m) => Some(format!("the guest's init failed: {m}")),
            Exit::NoStatus(Some(why)) => Some(format!(
                "the guest stopped without reporting an exit status: {why}"
            )),
            Exit::NoStatus(None) => Some("the guest stopped without reporting an exit status (kernel panic or reset; rerun with --console to see the kernel log)".into()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(report: Option<GuestMessage>) -> Outcome {
        Outcome {
            ending: Ending::Guest,
            report,
            why: None,
        }
    }

    #[test]
    fn every_ending_has_one_code() {
        let code = |o: Outcome| Exit::of(&o, 5.0).code();
        assert_eq!(code(guest(Some(GuestMessage::Exit(7)))), 7);
        assert_eq!(code(guest(Some(GuestMessage::Exit(300)))), 44);
        assert_eq!(code(guest(Some(GuestMessage::Signal(9)))), 137);
        assert_eq!(code(guest(Some(GuestMessage::Error("x".into())))), 123);
        assert_eq!(code(guest(None)), 122);
        let stopped = Outcome {
            ending: Ending::Signal(15),
            ..guest(Some(GuestMessage::Exit(0)))
        };
        assert_eq!(code(stopped), 143, "the VM was ended before the app");
        let timed_out = Outcome {
            ending: Ending::Timeout,
            ..guest(None)
        };
        assert_eq!(code(timed_out.clone()), 124);
        assert!(Exit::of(&timed_out, 5.0)
            .message()
            .unwrap()
            .contains("--timeout 5s"));
        assert_eq!(Exit::Failed.code(), 125);
    }
}
