//! The devices every vCPU reaches, and what one exit does to them: port I/O
//! goes to the legacy bus ([`crate::devices::pio`]), MMIO to the virtio-mmio
//! slot whose 4 KiB window holds the address (nothing there: reads are 0,
//! writes ignored); everything else either stops the VM or is a guest fault.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuExit;
use vm_memory::GuestMemoryMmap;

use crate::devices::pio::{PioBus, StopRequest, COM1, COM2, EXIT_PORT};
use crate::devices::virtio_mmio::{MmioTransport, VirtioDevice};
use crate::stats::ExitCounters;
use crate::{layout, lock, End, GuestFault};

/// A virtio-mmio device as the bus sees it: register reads and writes.
pub trait MmioSlot: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap);
}

impl<D: VirtioDevice + Send> MmioSlot for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        MmioTransport::write(self, offset, data, mem)
    }
}

/// The port-I/O bus and the virtio-mmio slots.
pub struct Bus {
    pub pio: Arc<Mutex<PioBus>>,
    /// One 4 KiB window each from VIRTIO_MMIO_BASE; None: nothing there.
    pub slots: Vec<Option<Arc<Mutex<dyn MmioSlot>>>>,
    pub mem: GuestMemoryMmap,
    pub exits: ExitCounters,
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

    fn count_io(&self, port: u16) {
        let c = &self.exits;
        ExitCounters::add(match port {
            p if (COM1..COM1 + 8).contains(&p) => &c.com1,
            p if (COM2..COM2 + 8).contains(&p) => &c.com2,
            EXIT_PORT => &c.exit_port,
            _ => &c.other_io,
        });
    }

    /// Serves one exit; returns why the VM must end, if it must.
    pub fn handle(&self, exit: VcpuExit) -> Option<End> {
        match exit {
            VcpuExit::IoOut(port, data) => {
                self.count_io(port);
                let asked = lock(&self.pio).write(port, data);
                match asked {
                    Some(StopRequest::ExitPort(v)) => return Some(End::ExitPort(v)),
                    Some(StopRequest::Reset) => return Some(End::Reset),
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
            VcpuExit::MmioWrite(addr, data) => {
                if let Some((dev, offset)) = self.slot(addr) {
                    lock(dev).write(offset, data, &self.mem);
                }
            }
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
