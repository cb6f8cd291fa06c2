//! The devices every vCPU reaches, and what one exit does to them: port I/O
//! goes to the legacy bus ([`crate::devices::pio`]), MMIO to the virtio-mmio
//! slot whose 4 KiB window holds the address (nothing there: reads are 0,
//! writes ignored); everything else either stops the VM or is a guest fault.
//! Register writes KVM queued without an exit (coalesced MMIO) are applied,
//! in order, before an MMIO write exit is served ([`Bus::apply_queued`]).
//! When the guest asks to stop, every device first takes what the guest
//! queued for the host, so no output is lost.

use std::sync::{Arc, Mutex};

use hyper_contract::HostMessage;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::devices::pio::{PioBus, StopRequest, COM1, COM2, EXIT_PORT};
use crate::devices::virtio_mmio::{MmioTransport, RegisterPage, VirtioDevice};
use crate::stats::ExitCounters;
use crate::{layout, lock, End, GuestFault};

/// A virtio-mmio device as the bus sees it: register reads and writes.
pub trait MmioSlot: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap);
    /// A notification of queue `index` that came through its eventfd.
    fn notify(&mut self, index: u32, mem: &GuestMemoryMmap);
    /// Takes what the guest queued for the host (the VM is ending).
    fn flush(&mut self, mem: &GuestMemoryMmap);
    /// Shows the registers in `page` from now on.
    fn publish_to(&mut self, page: RegisterPage);
    /// The transport's and device's state, for a snapshot; and back.
    fn save(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String>;
    /// Serves every queue as if the guest had notified it (after a
    /// restore: a notification may have been pending at the snapshot).
    fn notify_all(&mut self, mem: &GuestMemoryMmap);
    fn queue_count(&self) -> usize;
    /// See [`VirtioDevice::served_in_exit`].
    fn served_in_exit(&self, index: usize) -> bool;
}

impl<D: VirtioDevice + Send> MmioSlot for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        MmioTransport::write(self, offset, data, mem)
    }

    fn notify(&mut self, index: u32, mem: &GuestMemoryMmap) {
        MmioTransport::notify(self, index, mem)
    }

    fn flush(&mut self, mem: &GuestMemoryMmap) {
        MmioTransport::flush(self, mem)
    }

    fn publish_to(&mut self, page: RegisterPage) {
        self.set_page(page)
    }

    fn queue_count(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    fn served_in_exit(&self, index: usize) -> bool {
        self.device.served_in_exit(index)
    }

    fn save(&self) -> serde_json::Value {
        MmioTransport::save(self)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        MmioTransport::restore(self, state)
    }

    fn notify_all(&mut self, mem: &GuestMemoryMmap) {
        MmioTransport::notify_all(self, mem)
    }
}

/// The port-I/O bus and the virtio-mmio slots.
pub struct Bus {
    pub pio: Arc<Mutex<PioBus>>,
    /// One 4 KiB window each from VIRTIO_MMIO_BASE; None: nothing there.
    pub slots: Vec<Option<Arc<Mutex<dyn MmioSlot>>>>,
    pub mem: GuestMemoryMmap,
    pub exits: ExitCounters,
    /// Whether KVM queues some register writes (coalesced MMIO), and the
    /// lock under which one vCPU at a time applies them: the queue is the
    /// VM's, shared by every vCPU.
    pub queued: Option<Mutex<()>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("slots", &self.slots.iter().filter(|s| s.is_some()).count())
            .finish()
    }
}

impl Bus {
    /// The device whose window holds `addr`, and the offset in it; the
    /// exit is counted against it.
    fn slot(&self, addr: u64) -> Option<(&Mutex<dyn MmioSlot>, u64)> {
        let found = (|| {
            let rel = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
            let index = usize::try_from(rel / layout::VIRTIO_MMIO_SIZE).ok()?;
            let dev = self.slots.get(index)?.as_ref()?;
            Some((index, dev, rel % layout::VIRTIO_MMIO_SIZE))
        })();
        match found {
            Some((index, dev, offset)) => {
                if let Some(c) = self.exits.mmio.get(index) {
                    ExitCounters::add(c);
                }
                Some((&**dev, offset))
            }
            None => {
                ExitCounters::add(&self.exits.mmio_unmapped);
                None
            }
        }
    }

    /// The device in the window holding `addr`, and the offset in it.
    fn window(&self, addr: u64) -> Option<(&Mutex<dyn MmioSlot>, u64)> {
        let rel = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let index = usize::try_from(rel / layout::VIRTIO_MMIO_SIZE).ok()?;
        let dev = self.slots.get(index)?.as_ref()?;
        Some((&**dev, rel % layout::VIRTIO_MMIO_SIZE))
    }

    /// Applies, in order, the register writes KVM queued since the last
    /// call (read through `vcpu`'s mapping of the VM's queue).
    pub fn apply_queued(&self, vcpu: &mut VcpuFd) {
        let Some(one_at_a_time) = &self.queued else {
            return;
        };
        let _held = lock(one_at_a_time);
        while let Ok(Some(w)) = vcpu.coalesced_mmio_read() {
            ExitCounters::add(&self.exits.queued_writes);
            let len = (w.len as usize).min(w.data.len());
            if let Some((dev, offset)) = self.window(w.phys_addr) {
                lock(dev).write(offset, &w.data[..len], &self.mem);
            }
        }
    }

    /// Every device takes what the guest queued for the host.
    fn flush_all(&self) {
        for dev in self.slots.iter().flatten() {
            lock(dev).flush(&self.mem);
        }
    }

    fn count_io(&self, port: u16) {
        let c = &self.exits;
        ExitCounters::add(match port {
            p if (COM1..COM1 + 8).contains(&p) => &c.com1,
            p if (COM2..COM2 + 8).contains(&p) => &c.com2,
            EXIT_PORT => &c.exit_port,
            _ => &c.other_io,
        });
    }

    /// Serves an MMIO write exit (after [`Bus::apply_queued`]).
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, offset)) = self.slot(addr) {
            lock(dev).write(offset, data, &self.mem);
        }
    }

    /// Serves one exit; returns why the VM must end, if it must.
    pub fn handle(&self, exit: VcpuExit) -> Option<End> {
        match exit {
            VcpuExit::IoOut(port, data) => {
                self.count_io(port);
                let (asked, drain) = {
                    let mut pio = lock(&self.pio);
                    let asked = pio.write(port, data);
                    (asked, pio.take_drain())
                };
                if drain {
                    // hyperinit asked on COM2 (an older init): its output
                    // on the console ports goes out first.
                    self.flush_all();
                    lock(&self.pio).send_com2(&HostMessage::Drained);
                }
                match asked {
                    Some(StopRequest::ExitPort(v)) => {
                        self.flush_all();
                        return Some(End::ExitPort(v));
                    }
                    Some(StopRequest::Reset) => {
                        self.flush_all();
                        return Some(End::Reset);
                    }
                    None => {}
                }
            }
            VcpuExit::IoIn(port, data) => {
                self.count_io(port);
                lock(&self.pio).read(port, data)
            }
            VcpuExit::MmioRead(addr, data) => match self.slot(addr) {
                Some((dev, offset)) => lock(dev).read(offset, data),
                None => data.fill(0),
            },
            VcpuExit::MmioWrite(addr, data) => self.mmio_write(addr, data),
            VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => return Some(End::Reset),
            VcpuExit::Hlt => {
                ExitCounters::add(&self.exits.hlt);
                return Some(End::Guest(GuestFault::Halted));
            }
            VcpuExit::FailEntry(reason, _) => {
                return Some(End::Guest(GuestFault::FailEntry(reason)))
            }
            VcpuExit::InternalError => return Some(End::Guest(GuestFault::Internal)),
            VcpuExit::Exception => return Some(End::Guest(GuestFault::Exception)),
            other => return Some(End::Guest(GuestFault::Unexpected(format!("{other:?}")))),
        }
        None
    }
}
