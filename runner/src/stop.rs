//! The graceful stop, one state machine for both backends (as `docker run`
//! and `docker stop` behave): the first SIGINT, SIGTERM or SIGHUP sends the
//! image's StopSignal to the app; if the app has not ended after the stop
//! timeout it gets SIGKILL, and 2 s later the VM is ended regardless. A
//! second stop signal during the graceful stop ends the VM at once, and a
//! stop timeout of zero skips the grace altogether. Pure: the caller feeds
//! it signals and the time, and carries out the [`Step`]s.

use std::time::{Duration, Instant};

use hyper_contract::HostMessage;

/// How long after SIGKILL the VM is ended if the guest has not stopped.
pub const AFTER_KILL: Duration = Duration::from_secs(2);

/// What the caller must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Send this to hyperinit.
    Send(HostMessage),
    /// End the VM now; hyperboot was stopped by this signal.
    End(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// The stop signal went to the app (asked by host signal `by`).
    Asked {
        by: i32,
        kill_at: Instant,
    },
    /// SIGKILL went to the app.
    Killed {
        by: i32,
        end_at: Instant,
    },
}

/// The stop of one VM.
#[derive(Debug, Clone)]
pub struct GracefulStop {
    stop_signal: i32,
    grace: Duration,
    state: State,
}

impl GracefulStop {
    /// `stop_signal`: the image's StopSignal; `grace`: `--stop-timeout`.
    pub fn new(stop_signal: i32, grace: Duration) -> Self {
        Self {
            stop_signal,
            grace,
            state: State::Running,
        }
    }

    /// Changes the grace before the stop begins (`hyperboot stop -t`).
    pub fn set_grace(&mut self, grace: Duration) {
        if self.state == State::Running {
            self.grace = grace;
        }
    }

    /// hyperboot received host signal `sig` (SIGINT, SIGTERM or SIGHUP).
    pub fn on_signal(&mut self, sig: i32, now: Instant) -> Step {
        match self.state {
            State::Running if self.grace.is_zero() => Step::End(sig),
            State::Running => {
                self.state = State::Asked {
                    by: sig,
                    kill_at: now + self.grace,
                };
                Step::Send(HostMessage::Signal(self.stop_signal))
            }
            // Asked twice: as docker run, stop waiting.
            State::Asked { by, .. } | State::Killed { by, .. } => Step::End(by),
        }
    }

    /// The time is `now` (at or after [`GracefulStop::deadline`]).
    pub fn on_time(&mut self, now: Instant) -> Step {
        match self.state {
            State::Asked { by, kill_at } if now >= kill_at => {
                self.state = State::Killed {
                    by,
                    end_at: now + AFTER_KILL,
                };
                Step::Send(HostMessage::Signal(9))
            }
            State::Killed { by, end_at } if now >= end_at => Step::End(by),
            _ => Step::Nothing,
        }
    }

    /// When [`GracefulStop::on_time`] has something to do next.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Running => None,
            State::Asked { kill_at, .. } => Some(kill_at),
            State::Killed { end_at, .. } => Some(end_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: i32 = 15;
    const INT: i32 = 2;

    #[test]
    fn the_app_gets_its_stop_signal_then_sigkill_then_the_vm_ends() {
        let t0 = Instant::now();
        let mut s = GracefulStop::new(3, Duration::from_secs(10));
        assert_eq!(s.deadline(), None);
        assert_eq!(s.on_time(t0), Step::Nothing);
        assert_eq!(s.on_signal(TERM, t0), Step::Send(HostMessage::Signal(3)));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(s.on_time(t0 + Duration::from_secs(9)), Step::Nothing);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.on_time(t1), Step::Send(HostMessage::Signal(9)));
        assert_eq!(s.deadline(), Some(t1 + AFTER_KILL));
        assert_eq!(s.on_time(t1 + Duration::from_secs(1)), Step::Nothing);
        assert_eq!(s.on_time(t1 + AFTER_KILL), Step::End(TERM));
    }

    #[test]
    fn a_second_stop_signal_ends_the_vm_at_once() {
        let t0 = Instant::now();
        let mut s = GracefulStop::new(15, Duration::from_secs(10));
        assert_eq!(s.on_signal(INT, t0), Step::Send(HostMessage::Signal(15)));
        assert_eq!(s.on_signal(INT, t0), Step::End(INT));
        let mut s = GracefulStop::new(15, Duration::from_secs(1));
        s.on_signal(TERM, t0);
        s.on_time(t0 + Duration::from_secs(1));
        assert_eq!(
            s.on_signal(INT, t0),
            Step::End(TERM),
            "the first reason stays"
        );
    }

    #[test]
    fn no_grace_ends_the_vm_on_the_first_signal() {
        let mut s = GracefulStop::new(15, Duration::ZERO);
        assert_eq!(s.on_signal(TERM, Instant::now()), Step::End(TERM));
    }
}
