//! What hyperboot does while a VM runs, whatever runs it: it takes the host's
//! signals (SIGINT, SIGTERM, SIGHUP through the [`GracefulStop`], SIGWINCH as
//! the terminal's new size for `-t`, SIGQUIT, SIGUSR1 and SIGUSR2 passed on
//! to the app as `docker run`'s signal proxy does), keeps `--timeout`, and
//! returns how the VM ended. A backend provides the two things this needs of a VM
//! ([`VmControl`]) and says when it has ended ([`Event::Ended`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use hyper_contract::HostMessage;
use signal_hook::consts::{SIGHUP, SIGINT, SIGPIPE, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};

/// Host signals hyperboot hands to the app as they are.
const PROXIED: [i32; 3] = [SIGQUIT, SIGUSR1, SIGUSR2];

use crate::exit::Ending;
use crate::stop::{GracefulStop, Step};

/// What a backend's VM must do for the supervisor.
pub trait VmControl {
    /// Sends a request to hyperinit.
    fn send(&self, m: HostMessage);
    /// Ends the VM now (the backend sends [`Event::Ended`] once it has).
    fn end(&self);
}

/// What the supervisor waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A host signal to hyperboot.
    Signal(i32),
    /// `hyperboot stop -t SECS`: a graceful stop with this grace.
    Stop(Duration),
    /// `hyperboot kill -s N`: signal N to the app.
    Deliver(i32),
    /// The app's stream `fd` (1, 2) lost its reader ([`ReaderGone`]).
    Closed(u8),
    /// The VM has ended.
    Ended,
}

/// The host signals hyperboot takes while a VM runs, as events.
#[derive(Debug)]
pub struct Signals {
    handle: signal_hook::iterator::Handle,
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// The events of one run: signals are forwarded by a thread of their own
/// (`signals`); the backend sends [`Event::Ended`] on the sender.
pub fn events() -> std::io::Result<(Sender<Event>, Receiver<Event>, Signals)> {
    let (tx, rx) = channel();
    let mut signals = signal_hook::iterator::Signals::new(
        [SIGINT, SIGTERM, SIGHUP, SIGWINCH]
            .into_iter()
            .chain(PROXIED),
    )?;
    let handle = signals.handle();
    let forward = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // It reads its self-pipe and sends on a channel: the
            // supervisor's filter covers that (and it is the only filter
            // this thread gets, whatever the backend).
            if let Err(e) = hyper_vmm::seccomp::Profile::Supervisor.install() {
                tracing::warn!("the signal thread runs without a seccomp filter: {e}");
            }
            for s in signals.forever() {
                if forward.send(Event::Signal(s)).is_err() {
                    break;
                }
            }
        })?;
    Ok((tx, rx, Signals { handle }))
}

/// Says that a stream of the app's has lost its reader: hyperboot's stdout
/// or stderr is a pipe whose reader has gone (`hyperboot … | head -1`). An
/// init of contract 6 is told which (`closed 1|2`) and closes the app's pipe
/// for it, so the app's next write fails as it would in a shell pipeline
/// (SIGPIPE, or EPIPE for an app that ignores SIGPIPE, as Python, Go and
/// Node do); an older init ignores that, so the app gets SIGPIPE instead.
/// What the app writes after is dropped.
#[derive(Debug, Clone)]
pub struct ReaderGone(std::sync::Arc<Gone>);

#[derive(Debug)]
struct Gone {
    tx: std::sync::Mutex<Sender<Event>>,
    contract: u32,
    /// Whether stdout (0) and stderr (1) were reported (an older init's
    /// one SIGPIPE: 0).
    told: [AtomicBool; 2],
}

impl ReaderGone {
    /// For a run whose init speaks `contract`.
    pub fn new(tx: Sender<Event>, contract: u32) -> ReaderGone {
        ReaderGone(std::sync::Arc::new(Gone {
            tx: std::sync::Mutex::new(tx),
            contract,
            told: Default::default(),
        }))
    }

    /// Looks at the result of a write to the app's stream `fd` (1 or 2).
    pub fn check<T>(&self, fd: u8, r: &std::io::Result<T>) {
        let Err(e) = r else { return };
        let g = &*self.0;
        if e.kind() != std::io::ErrorKind::BrokenPipe || !matches!(fd, 1 | 2) {
            return;
        }
        // Contract 6: one `closed` per stream; older: one SIGPIPE a run.
        let (slot, event) = match g.contract >= 6 {
            true => (usize::from(fd - 1), Event::Closed(fd)),
            false => (0, Event::Deliver(SIGPIPE)),
        };
        if g.told[slot].swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::debug!("the reader of the app's fd {fd} has gone");
        let _ = g.tx.lock().unwrap_or_else(|e| e.into_inner()).send(event);
    }
}

/// A writer for the app's stream `fd` that tells [`ReaderGone`] of a broken
/// pipe.
#[derive(Debug)]
pub struct AppStream<W> {
    inner: W,
    fd: u8,
    gone: ReaderGone,
}

impl<W> AppStream<W> {
    pub fn new(inner: W, fd: u8, gone: ReaderGone) -> AppStream<W> {
        AppStream { inner, fd, gone }
    }
}

impl<W: std::io::Write> std::io::Write for AppStream<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.inner.write(buf);
        self.gone.check(self.fd, &r);
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.gone.check(self.fd, &r);
        r
    }
}

/// How long hyperboot waits for a VM it ended to be gone.
const END_WAIT: Duration = Duration::from_secs(10);

/// Supervises a running VM until it ends; returns how.
pub fn supervise(
    rx: &Receiver<Event>,
    vm: &dyn VmControl,
    mut stop: GracefulStop,
    timeout: Option<Duration>,
    tty: bool,
) -> Ending {
    let deadline = timeout.map(|t| Instant::now() + t);
    let end = |why: Ending| {
        vm.end();
        let until = Instant::now() + END_WAIT;
        while let Ok(ev) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            if ev == Event::Ended {
                break;
            }
        }
        why
    };
    loop {
        let until = [deadline, stop.deadline()].into_iter().flatten().min();
        let ev = match until {
            Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let now = Instant::now();
        let step = match ev {
            Ok(Event::Ended) | Err(RecvTimeoutError::Disconnected) => return Ending::Guest,
            Ok(Event::Signal(SIGWINCH)) => {
                if let (true, Some([rows, cols])) = (tty, crate::terminal::size()) {
                    vm.send(HostMessage::Winsize { rows, cols });
                }
                Step::Nothing
            }
            Ok(Event::Signal(s)) if PROXIED.contains(&s) => Step::Send(HostMessage::Signal(s)),
            Ok(Event::Signal(s)) => {
                tracing::debug!("signal {s}");
                stop.on_signal(s, now)
            }
            Ok(Event::Stop(grace)) => {
                stop.set_grace(grace);
                stop.on_signal(SIGTERM, now)
            }
            Ok(Event::Deliver(sig)) => Step::Send(HostMessage::Signal(sig)),
            Ok(Event::Closed(fd)) => Step::Send(HostMessage::Closed(fd)),
            Err(RecvTimeoutError::Timeout) => {
                if deadline.is_some_and(|d| now >= d) {
                    return end(Ending::Timeout);
                }
                stop.on_time(now)
            }
        };
        match step {
            Step::Nothing => {}
            Step::Send(m) => {
                tracing::debug!("to the guest: {m:?}");
                vm.send(m)
            }
            Step::End(sig) => {
                tracing::debug!("ending the VM (signal {sig})");
                return end(Ending::Signal(sig));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A VM that records what it is asked and ends when told to.
    struct FakeVm {
        sent: Mutex<Vec<HostMessage>>,
        tx: Sender<Event>,
    }

    impl VmControl for FakeVm {
        fn send(&self, m: HostMessage) {
            self.sent.lock().unwrap().push(m);
        }
        fn end(&self) {
            let _ = self.tx.send(Event::Ended);
        }
    }

    fn fake() -> (FakeVm, Sender<Event>, Receiver<Event>) {
        let (tx, rx) = channel();
        (
            FakeVm {
                sent: Mutex::default(),
                tx: tx.clone(),
            },
            tx,
            rx,
        )
    }

    /// Writes to a pipe, then to it again after its reader has gone, through
    /// [`AppStream`]s for fds 1 and 2 of an init of `contract`; returns what
    /// the supervisor was told.
    fn broken_pipes(contract: u32) -> Vec<Event> {
        use std::io::Write;
        let (tx, rx) = channel();
        let gone = ReaderGone::new(tx, contract);
        let mut streams = [1, 2].map(|fd| {
            let (r, w) = rustix::pipe::pipe().unwrap();
            (
                Some(r),
                AppStream::new(std::fs::File::from(w), fd, gone.clone()),
            )
        });
        for (_, w) in &mut streams {
            w.write_all(b"read").unwrap();
        }
        assert!(
            rx.try_recv().is_err(),
            "nothing to say while the readers read"
        );
        for (r, w) in &mut streams {
            drop(r.take());
            // Rust's runtime ignores SIGPIPE: the writes fail with EPIPE.
            assert!(w.write_all(b"lost").is_err());
            assert!(w.write_all(b"lost").is_err());
        }
        rx.try_iter().collect()
    }

    #[test]
    fn an_app_stream_without_its_reader_is_closed_in_the_guest_once() {
        assert_eq!(broken_pipes(6), [Event::Closed(1), Event::Closed(2)]);
    }

    #[test]
    fn an_older_init_gets_sigpipe_for_the_app_instead_once() {
        assert_eq!(broken_pipes(5), [Event::Deliver(SIGPIPE)]);
    }

    #[test]
    fn a_signal_asks_the_app_and_a_second_ends_the_vm() {
        let (vm, tx, rx) = fake();
        tx.send(Event::Signal(SIGTERM)).unwrap();
        tx.send(Event::Signal(SIGINT)).unwrap();
        let stop = GracefulStop::new(3, Duration::from_secs(60));
        assert_eq!(
            supervise(&rx, &vm, stop, None, false),
            Ending::Signal(SIGTERM)
        );
        assert_eq!(*vm.sent.lock().unwrap(), [HostMessage::Signal(3)]);
    }

    #[test]
    fn an_app_that_ignores_its_stop_signal_is_killed_then_the_vm_ended() {
        let (vm, tx, rx) = fake();
        tx.send(Event::Signal(SIGINT)).unwrap();
        let stop = GracefulStop::new(15, Duration::from_millis(50));
        let t = Instant::now();
        assert_eq!(
            supervise(&rx, &vm, stop, None, false),
            Ending::Signal(SIGINT)
        );
        assert!(t.elapsed() >= crate::stop::AFTER_KILL);
        assert_eq!(
            *vm.sent.lock().unwrap(),
            [HostMessage::Signal(15), HostMessage::Signal(9)]
        );
    }

    #[test]
    fn the_timeout_ends_the_vm_and_an_ending_guest_ends_the_watch() {
        let (vm, _tx, rx) = fake();
        let stop = GracefulStop::new(15, Duration::from_secs(10));
        let r = supervise(
            &rx,
            &vm,
            stop.clone(),
            Some(Duration::from_millis(20)),
            false,
        );
        assert_eq!(r, Ending::Timeout);
        let (vm, tx, rx) = fake();
        tx.send(Event::Ended).unwrap();
        assert_eq!(supervise(&rx, &vm, stop, None, false), Ending::Guest);
        assert!(vm.sent.lock().unwrap().is_empty());
    }
}
