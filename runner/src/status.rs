//! hyperboot's exit codes and the guest's status report.
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

pub const FAILED: u8 = 125;
pub const TIMEOUT: u8 = 124;
pub const INIT_FAILED: u8 = 123;
pub const NO_STATUS: u8 = 122;

/// The status line hyperinit sends on the status port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestStatus {
    Exited(u8),
    Signaled(u8),
    InitError(String),
}

impl GuestStatus {
    /// The first complete line that is a report; without one, no report.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let text = String::from_utf8_lossy(bytes);
        let (complete, _) = text.rsplit_once('\n')?;
        complete.split('\n').find_map(Self::parse_line)
    }

    fn parse_line(line: &str) -> Option<Self> {
        let (key, value) = line.split_once('=')?;
        match key {
            "exit" => value
                .parse::<i64>()
                .ok()
                .map(|c| GuestStatus::Exited((c & 0xff) as u8)),
            "signal" => value
                .parse::<u8>()
                .ok()
                .filter(|s| (1..=64).contains(s))
                .map(GuestStatus::Signaled),
            "error" => Some(GuestStatus::InitError(value.to_string())),
            _ => None,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            GuestStatus::Exited(c) => *c,
            GuestStatus::Signaled(s) => 128u8.saturating_add(*s),
            GuestStatus::InitError(_) => INIT_FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reports_and_refuses_garbage() {
        assert_eq!(
            GuestStatus::parse(b"exit=7\n"),
            Some(GuestStatus::Exited(7))
        );
        assert_eq!(
            GuestStatus::parse(b"exit=300\n").map(|s| s.exit_code()),
            Some(44)
        );
        assert_eq!(
            GuestStatus::parse(b"signal=9\n").map(|s| s.exit_code()),
            Some(137)
        );
        assert_eq!(
            GuestStatus::parse(b"noise\r\nexit=3\n"),
            Some(GuestStatus::Exited(3))
        );
        assert_eq!(
            GuestStatus::parse(b"error=no root\n"),
            Some(GuestStatus::InitError("no root".into()))
        );
        for bad in [
            &b""[..],
            b"exit=7",
            b"exit=x\n",
            b"signal=0\n",
            b"signal=200\n",
            b"hello\n",
            b"\xff\n",
        ] {
            assert_eq!(GuestStatus::parse(bad), None, "{bad:?}");
        }
    }
}
