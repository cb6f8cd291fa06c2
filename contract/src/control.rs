//! The control channel: one ASCII line per message, both ways, on the
//! virtio-console port named [`crate::CONTROL_PORT`] when the host offers it
//! (contract 3; the guest writes each message in one write), else on the
//! second UART (COM2, I/O port 0x2f8).
//!
//! The guest says (in this order over a run):
//! - `ready` — hyperinit listens now, on the channel it says this on; the
//!   host MUST hold its requests until then (bytes that reach the UART
//!   before it is opened are echoed or lost) and MUST then answer on that
//!   channel;
//! - booted with `hyper.start=port` (contract 4), `waiting` — hyperinit
//!   mounted the root and waits for its run configuration: the host may
//!   snapshot the machine now (nothing run-specific has happened yet), then
//!   MUST send `start N`;
//! - `drain OUT ERR` — the byte counts it sent on the stdout and stderr
//!   ports; the host answers `drained` once it has them all;
//! - with `stats` (contract 2), `timings INIT ROOT EXEC [START [NOW]]`:
//!   microseconds of the guest's monotonic clock when hyperinit started,
//!   when the root was mounted, when the app was started, when the run
//!   configuration came as a Start (0: it did not) and when this line was
//!   written — the host places the others on its own clock by the time the
//!   line reached it (the guest's clock has no known origin on the host's:
//!   it starts during the kernel's boot, and a restored guest's runs on
//!   from the snapshot's);
//! - the report: `exit=N`, `signal=N` (the app died of signal N) or
//!   `error=MESSAGE` (hyperinit failed; one printable line of at most 400
//!   characters), then it ends the VM.
//!
//! The host says `signal N` (deliver N to the app), `stdin-eof N` (the
//! app's stdin ends after N bytes), `winsize R C` (the terminal's new size),
//! `drained`, and (contract 4) `start N` followed by N bytes: the JSON of a
//! [`crate::Start`], at most [`START_MAX`] bytes.
//!
//! Lines end with `\n`; a line longer than [`MAX_LINE`] is a misbehaving
//! peer and is cut ([`LineBuffer`]).

/// The longest line either side sends (an `error=` report is the longest).
pub const MAX_LINE: usize = 512;

/// The largest body a `start N` message may announce.
pub const START_MAX: usize = 1 << 20;

/// What hyperinit tells the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMessage {
    Ready,
    /// At the snapshot point, waiting for `start` (contract 4).
    Waiting,
    Drain {
        stdout: u64,
        stderr: u64,
    },
    /// hyperinit's milestones, µs of the guest's monotonic clock: started,
    /// root mounted, app exec'd, the Start taken (when the run
    /// configuration came as a [`crate::Start`]), and `now`, when the line
    /// was written: the anchor that places the others on the host's clock
    /// (older inits send no `now`).
    Timings {
        init: u64,
        root: u64,
        exec: u64,
        start: Option<u64>,
        now: Option<u64>,
    },
    /// The app exited with this code.
    Exit(i32),
    /// The app was killed by this signal.
    Signal(i32),
    /// hyperinit itself failed.
    Error(String),
}

/// What the host asks of hyperinit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMessage {
    Signal(i32),
    StdinEof(u64),
    Winsize {
        rows: u16,
        cols: u16,
    },
    Drained,
    /// Contract 6: the host's side of the app's stdout (1) or stderr (2)
    /// has lost its reader; the app's writes to it should fail as they do
    /// into a pipe nobody reads (EPIPE, SIGPIPE).
    Closed(u8),
}

/// A line that is no message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("not a control message: {0:?}")]
    Unknown(String),
    #[error("malformed {0} message: {1:?}")]
    Malformed(&'static str, String),
}

fn text(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(line).into_owned()
}

fn number<T: std::str::FromStr>(
    what: &'static str,
    s: &str,
    line: &str,
) -> Result<T, ControlError> {
    s.parse()
        .map_err(|_| ControlError::Malformed(what, line.to_string()))
}

/// A signal number a message may carry.
fn signal(what: &'static str, s: &str, line: &str) -> Result<i32, ControlError> {
    let n: i32 = number(what, s, line)?;
    if (1..=64).contains(&n) {
        Ok(n)
    } else {
        Err(ControlError::Malformed(what, line.to_string()))
    }
}

impl GuestMessage {
    /// The line, `\n` included; an error message is cut to one printable
    /// line of at most 400 characters.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            GuestMessage::Ready => "ready\n".to_string(),
            GuestMessage::Waiting => "waiting\n".to_string(),
            GuestMessage::Drain { stdout, stderr } => format!("drain {stdout} {stderr}\n"),
            GuestMessage::Timings {
                init,
                root,
                exec,
                start,
                now: None,
            } => match start {
                None => format!("timings {init} {root} {exec}\n"),
                Some(start) => format!("timings {init} {root} {exec} {start}\n"),
            },
            GuestMessage::Timings {
                init,
                root,
                exec,
                start,
                now: Some(now),
            } => format!(
                "timings {init} {root} {exec} {} {now}\n",
                start.unwrap_or(0)
            ),
            GuestMessage::Exit(c) => format!("exit={c}\n"),
            GuestMessage::Signal(s) => format!("signal={s}\n"),
            GuestMessage::Error(m) => {
                let clean: String = m
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .take(400)
                    .collect();
                format!("error={clean}\n")
            }
        }
        .into_bytes()
    }

    /// Decodes one line (with or without its `\n`).
    pub fn decode(line: &[u8]) -> Result<Self, ControlError> {
        let t = text(line);
        if t == "ready" {
            return Ok(GuestMessage::Ready);
        }
        if t == "waiting" {
            return Ok(GuestMessage::Waiting);
        }
        if let Some(rest) = t.strip_prefix("drain ") {
            let mut it = rest.split(' ');
            let (Some(o), Some(e), None) = (it.next(), it.next(), it.next()) else {
                return Err(ControlError::Malformed("drain", t));
            };
            return Ok(GuestMessage::Drain {
                stdout: number("drain", o, &t)?,
                stderr: number("drain", e, &t)?,
            });
        }
        if let Some(rest) = t.strip_prefix("timings ") {
            let n: Vec<&str> = rest.split(' ').collect();
            let (init, root, exec, start, now) = match n.as_slice() {
                [i, r, e] => (i, r, e, None, None),
                [i, r, e, s] => (i, r, e, Some(number("timings", s, &t)?), None),
                [i, r, e, s, w] => {
                    let s: u64 = number("timings", s, &t)?;
                    (
                        i,
                        r,
                        e,
                        (s != 0).then_some(s),
                        Some(number("timings", w, &t)?),
                    )
                }
                _ => return Err(ControlError::Malformed("timings", t)),
            };
            return Ok(GuestMessage::Timings {
                init: number("timings", init, &t)?,
                root: number("timings", root, &t)?,
                exec: number("timings", exec, &t)?,
                start,
                now,
            });
        }
        match t.split_once('=') {
            Some(("exit", v)) => Ok(GuestMessage::Exit(number("exit", v, &t)?)),
            Some(("signal", v)) => Ok(GuestMessage::Signal(signal("signal", v, &t)?)),
            Some(("error", v)) => Ok(GuestMessage::Error(v.to_string())),
            _ => Err(ControlError::Unknown(t)),
        }
    }

    /// Whether this is the final report of a run.
    pub fn is_report(&self) -> bool {
        matches!(
            self,
            GuestMessage::Exit(_) | GuestMessage::Signal(_) | GuestMessage::Error(_)
        )
    }

    /// The first complete line of `bytes` that is a report.
    pub fn find_report(bytes: &[u8]) -> Option<Self> {
        let complete = &bytes[..bytes.iter().rposition(|b| *b == b'\n')? + 1];
        complete
            .split_inclusive(|b| *b == b'\n')
            .filter_map(|l| Self::decode(l).ok())
            .find(Self::is_report)
    }
}

/// The `start N` header line and body for a start message.
pub fn encode_start(start: &crate::Start) -> Vec<u8> {
    let body = serde_json::to_vec(start).expect("a start message serializes");
    let mut m = format!("start {}\n", body.len()).into_bytes();
    m.extend_from_slice(&body);
    m
}

/// The body length a `start N` line announces; None for any other line
/// (an error for a malformed or oversized one).
pub fn decode_start_header(line: &[u8]) -> Option<Result<usize, ControlError>> {
    let t = text(line);
    let n = t.strip_prefix("start ")?;
    Some(match n.parse::<usize>() {
        Ok(n) if n <= START_MAX => Ok(n),
        _ => Err(ControlError::Malformed("start", t)),
    })
}

impl HostMessage {
    /// The line, `\n` included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            HostMessage::Signal(s) => format!("signal {s}\n"),
            HostMessage::StdinEof(n) => format!("stdin-eof {n}\n"),
            HostMessage::Winsize { rows, cols } => format!("winsize {rows} {cols}\n"),
            HostMessage::Drained => "drained\n".to_string(),
            HostMessage::Closed(fd) => format!("closed {fd}\n"),
        }
        .into_bytes()
    }

    /// Decodes one line (with or without its `\n`).
    pub fn decode(line: &[u8]) -> Result<Self, ControlError> {
        let t = text(line);
        let words: Vec<&str> = t.split(' ').collect();
        match words.as_slice() {
            ["drained"] => Ok(HostMessage::Drained),
            ["signal", n] => Ok(HostMessage::Signal(signal("signal", n, &t)?)),
            ["stdin-eof", n] => Ok(HostMessage::StdinEof(number("stdin-eof", n, &t)?)),
            ["winsize", r, c] => Ok(HostMessage::Winsize {
                rows: number("winsize", r, &t)?,
                cols: number("winsize", c, &t)?,
            }),
            ["closed", n @ ("1" | "2")] => Ok(HostMessage::Closed(number("closed", n, &t)?)),
            ["drained" | "signal" | "stdin-eof" | "winsize" | "closed", ..] => {
                Err(ControlError::Malformed("host", t))
            }
            _ => Err(ControlError::Unknown(t)),
        }
    }
}

/// Gathers bytes into lines, bounded: a line longer than [`MAX_LINE`] keeps
/// its first bytes only.
#[derive(Debug, Default, Clone)]
pub struct LineBuffer {
    line: Vec<u8>,
}

impl LineBuffer {
    /// Takes one byte; returns the line (with its `\n`) when it completes one.
    pub fn push(&mut self, b: u8) -> Option<Vec<u8>> {
        if self.line.len() < MAX_LINE {
            self.line.push(b);
        }
        if b == b'\n' {
            if self.line.last() != Some(&b'\n') {
                self.line.push(b'\n');
            }
            return Some(std::mem::take(&mut self.line));
        }
        None
    }

    /// What came after the last complete line.
    pub fn partial(&self) -> &[u8] {
        &self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_messages_round_trip() {
        for m in [
            GuestMessage::Ready,
            GuestMessage::Drain {
                stdout: 8 << 20,
                stderr: 0,
            },
            GuestMessage::Exit(7),
            GuestMessage::Exit(-1),
            GuestMessage::Timings {
                init: 12_000,
                root: 15_500,
                exec: 17_250,
                start: None,
                now: None,
            },
            GuestMessage::Timings {
                init: 12_000,
                root: 15_500,
                exec: 17_250,
                start: Some(16_000),
                now: None,
            },
            GuestMessage::Timings {
                init: 12_000,
                root: 15_500,
                exec: 17_250,
                start: None,
                now: Some(19_000),
            },
            GuestMessage::Timings {
                init: 12_000,
                root: 15_500,
                exec: 17_250,
                start: Some(16_000),
                now: Some(19_000),
            },
            GuestMessage::Signal(9),
            GuestMessage::Error("no root".into()),
        ] {
            assert_eq!(GuestMessage::decode(&m.encode()), Ok(m.clone()), "{m:?}");
        }
        assert_eq!(
            GuestMessage::Error("bad\nthing".into()).encode(),
            b"error=bad thing\n"
        );
        assert_eq!(
            GuestMessage::Error("x".repeat(1000)).encode().len(),
            "error=".len() + 400 + 1
        );
    }

    #[test]
    fn host_messages_round_trip() {
        for m in [
            HostMessage::Signal(15),
            HostMessage::StdinEof(123_456),
            HostMessage::Winsize {
                rows: 33,
                cols: 101,
            },
            HostMessage::Drained,
            HostMessage::Closed(1),
            HostMessage::Closed(2),
        ] {
            assert_eq!(HostMessage::decode(&m.encode()), Ok(m), "{m:?}");
        }
        assert_eq!(HostMessage::Closed(2).encode(), b"closed 2\n");
        assert_eq!(HostMessage::Signal(15).encode(), b"signal 15\n");
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            b"exit=",
            b"exit=x",
            b"signal=0",
            b"signal=200",
            b"drain 1",
            b"drain 1 2 3",
            b"drain a b",
            b"timings 1 2",
            b"timings 1 2 x",
            b"timings 1 2 3 4 x",
            b"timings 1 2 3 4 5 6",
            b"hello",
            b"\xff",
        ] {
            assert!(GuestMessage::decode(bad).is_err(), "{bad:?}");
        }
        for bad in [
            &b""[..],
            b"signal",
            b"signal 0",
            b"signal 65",
            b"signal 9 9",
            b"winsize 1",
            b"winsize 70000 1",
            b"stdin-eof -1",
            b"drained now",
            b"closed",
            b"closed 0",
            b"closed 3",
            b"closed 1 2",
        ] {
            assert!(HostMessage::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reports_are_found_among_other_lines() {
        assert_eq!(
            GuestMessage::find_report(b"ready\ndrain 1 2\nnoise\r\nexit=3\n"),
            Some(GuestMessage::Exit(3))
        );
        assert_eq!(GuestMessage::find_report(b"exit=3"), None, "incomplete");
        assert_eq!(GuestMessage::find_report(b"ready\n"), None);
        assert_eq!(
            GuestMessage::find_report(b"error=no root\n"),
            Some(GuestMessage::Error("no root".into()))
        );
    }

    #[test]
    fn lines_are_bounded() {
        let mut b = LineBuffer::default();
        for _ in 0..10_000 {
            assert_eq!(b.push(b'x'), None);
        }
        let line = b.push(b'\n').unwrap();
        assert_eq!(line.len(), MAX_LINE + 1);
        assert!(line.ends_with(b"\n"));
        assert_eq!(b.push(b'a'), None);
        assert_eq!(b.partial(), b"a");
        assert_eq!(b.push(b'\n').unwrap(), b"a\n");
    }
}
