//! The control channel's host end, whichever way it travels: the
//! virtio-console port [`hyper_contract::CONTROL_PORT`] (contract 3) or COM2
//! (older inits). Both carriers hand the guest's bytes to one [`Control`];
//! it keeps what the guest said (bounded), answers `drain`, and holds the
//! host's requests until hyperinit says `ready` — then they go on the
//! carrier it said that on.
//!
//! Locking: a carrier calls in with its own device locked (device, then
//! control); the owner's requests take the control lock alone and release
//! it before they lock the carrier ([`Control::request`]), so the two
//! orders never meet.

use hyper_contract::{GuestMessage, HostMessage, LineBuffer};

/// What the guest wrote on the control channel at most: a handful of short
/// lines; more is a misbehaving guest.
pub const STATUS_MAX: usize = 1024;
/// Requests held before hyperinit listens, at most.
const HELD_MAX: usize = 16;

/// How the control channel travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// The second UART.
    Com2,
    /// The `hyper.control` virtio-console port.
    Port,
}

/// What a carrier must do after passing the guest's bytes on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replies {
    /// Messages for the guest, on this carrier, in order.
    pub send: Vec<HostMessage>,
    /// The guest asked for `drained`: the carrier MUST first take every
    /// output the guest has queued, then send [`HostMessage::Drained`].
    pub drain: bool,
    /// hyperinit is at the snapshot point, waiting for its start message.
    pub waiting: bool,
}

/// The state of the control channel.
#[derive(Debug, Default)]
pub struct Control {
    status: Vec<u8>,
    com2: LineBuffer,
    port: LineBuffer,
    /// Where hyperinit listens, once it said `ready`.
    ready: Option<Carrier>,
    held: Vec<HostMessage>,
    /// Told when hyperinit says `waiting` (the snapshot thread).
    waiting: Option<std::sync::mpsc::Sender<()>>,
    /// Requests are held until the start message is sent, even once
    /// hyperinit listens (contract 4: nothing of the run before it).
    gated: bool,
    /// When (monotonic ns) hyperinit's `timings` line reached the host: the
    /// anchor of its milestones on the host's clock (contract 2).
    timings_at: u64,
}

impl Control {
    /// Bytes the guest wrote on `carrier`.
    pub fn from_guest(&mut self, carrier: Carrier, bytes: &[u8]) -> Replies {
        let room = STATUS_MAX.saturating_sub(self.status.len());
        self.status
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        let mut replies = Replies::default();
        for &b in bytes {
            let lines = match carrier {
                Carrier::Com2 => &mut self.com2,
                Carrier::Port => &mut self.port,
            };
            let Some(line) = lines.push(b) else {
                continue;
            };
            match GuestMessage::decode(&line) {
                Ok(GuestMessage::Ready) if self.ready.is_none() => {
                    self.ready = Some(carrier);
                    if !self.gated {
                        replies.send.append(&mut self.held);
                    }
                }
                Ok(GuestMessage::Drain { .. }) if self.ready == Some(carrier) => {
                    replies.drain = true;
                }
                Ok(GuestMessage::Timings { .. }) => {
                    self.timings_at = crate::sys::monotonic_ns();
                }
                Ok(GuestMessage::Waiting) if self.ready == Some(carrier) => {
                    replies.waiting = true;
                    if let Some(tx) = &self.waiting {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
        }
        replies
    }

    /// Tells `tx` each time hyperinit says `waiting`.
    pub fn on_waiting(&mut self, tx: std::sync::mpsc::Sender<()>) {
        self.waiting = Some(tx);
    }

    /// A request from the owner: the carrier to send it on now, or None
    /// when it is held until hyperinit listens (or dropped past
    /// `HELD_MAX`).
    pub fn request(&mut self, m: HostMessage) -> Option<Carrier> {
        let hold = self.ready.is_none() || self.gated;
        if hold && self.held.len() < HELD_MAX {
            self.held.push(m);
        }
        if hold {
            None
        } else {
            self.ready
        }
    }

    /// Holds every request until [`Control::open_gate`] (a start message
    /// is to be sent first).
    pub fn gate(&mut self) {
        self.gated = true;
    }

    /// The start message is sent: the requests held, for the owner to send
    /// again (they are held still if hyperinit does not listen yet).
    pub fn open_gate(&mut self) -> Vec<HostMessage> {
        self.gated = false;
        std::mem::take(&mut self.held)
    }

    /// Where hyperinit listens and what it said, for a snapshot (the
    /// requests held are the owner's of that run, not of the snapshot).
    pub fn save(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": match self.ready {
                Some(Carrier::Port) => "port",
                Some(Carrier::Com2) => "com2",
                None => "",
            },
            "status": self.status,
        })
    }

    /// Takes back a [`Control::save`]; requests already held stay held (or
    /// go, once hyperinit listens: returned for the carrier to send).
    pub fn restore(&mut self, v: &serde_json::Value) -> Vec<HostMessage> {
        self.ready = match v["ready"].as_str() {
            Some("port") => Some(Carrier::Port),
            Some("com2") => Some(Carrier::Com2),
            _ => None,
        };
        self.status = serde_json::from_value(v["status"].clone()).unwrap_or_default();
        self.status.truncate(STATUS_MAX);
        if self.ready.is_some() && !self.gated {
            std::mem::take(&mut self.held)
        } else {
            Vec::new()
        }
    }

    /// What the guest wrote on the control channel (at most [`STATUS_MAX`]
    /// bytes).
    pub fn status(&self) -> &[u8] {
        &self.status
    }

    /// When hyperinit's last `timings` line arrived (monotonic ns; 0: none).
    pub fn timings_at(&self) -> u64 {
        self.timings_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_wait_for_ready_and_go_where_it_was_said() {
        let mut c = Control::default();
        assert_eq!(c.request(HostMessage::Signal(15)), None);
        assert_eq!(c.request(HostMessage::StdinEof(3)), None);
        let r = c.from_guest(Carrier::Port, b"rea");
        assert_eq!(r, Replies::default());
        let r = c.from_guest(Carrier::Port, b"dy\n");
        assert_eq!(
            r.send,
            vec![HostMessage::Signal(15), HostMessage::StdinEof(3)]
        );
        assert_eq!(c.request(HostMessage::Drained), Some(Carrier::Port));
        // A second `ready`, or one on the other carrier, changes nothing.
        assert!(c.from_guest(Carrier::Com2, b"ready\n").send.is_empty());
        assert_eq!(c.request(HostMessage::Signal(2)), Some(Carrier::Port));
    }

    #[test]
    fn drain_is_answered_on_the_listening_carrier_only() {
        let mut c = Control::default();
        assert!(!c.from_guest(Carrier::Com2, b"drain 1 2\n").drain);
        c.from_guest(Carrier::Com2, b"ready\n");
        assert!(!c.from_guest(Carrier::Port, b"drain 1 2\n").drain);
        assert!(c.from_guest(Carrier::Com2, b"drain 1 2\nexit=0\n").drain);
        assert!(c.status().ends_with(b"drain 1 2\nexit=0\n"));
    }

    #[test]
    fn a_flooding_guest_is_bounded() {
        let mut c = Control::default();
        for _ in 0..1000 {
            c.from_guest(Carrier::Port, &[b'x'; 100]);
        }
        assert_eq!(c.status().len(), STATUS_MAX);
        for _ in 0..100 {
            c.request(HostMessage::Signal(1));
        }
        assert_eq!(
            c.from_guest(Carrier::Port, b"\nready\n").send.len(),
            HELD_MAX
        );
    }

    #[test]
    fn a_gated_channel_holds_requests_until_the_start_is_sent() {
        let mut c = Control::default();
        c.gate();
        assert_eq!(c.request(HostMessage::StdinEof(0)), None);
        // hyperinit listens at the snapshot point: still nothing goes.
        assert!(c
            .from_guest(
                Carrier::Port,
                b"ready
waiting
"
            )
            .send
            .is_empty());
        assert_eq!(c.request(HostMessage::Signal(15)), None);
        // A snapshot keeps no request of this run.
        let mut restored = Control::default();
        restored.gate();
        assert!(restored.restore(&c.save()).is_empty());
        assert_eq!(
            c.open_gate(),
            vec![HostMessage::StdinEof(0), HostMessage::Signal(15)]
        );
        assert_eq!(c.request(HostMessage::Signal(2)), Some(Carrier::Port));
        assert!(restored.open_gate().is_empty());
        assert_eq!(
            restored.request(HostMessage::Signal(2)),
            Some(Carrier::Port)
        );
    }
}
