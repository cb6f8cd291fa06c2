//! The virtio-mmio transport (virtio 1.2, section 4.2, version 2 registers).
//!
//! Every register access comes from the guest and is treated as hostile: reads
//! and writes of the wrong width, unknown offsets and values out of range are
//! ignored (reads return 0), and a queue configured outside guest memory is
//! never used — the device sets DEVICE_NEEDS_RESET instead.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5250_5948; // "HYPR"
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const INT_USED_RING: u32 = VIRTIO_MMIO_INT_VRING;

/// A register's offset, as the match arms below take it.
const fn reg(r: u32) -> u64 {
    r as u64
}
const R_MAGIC: u64 = reg(VIRTIO_MMIO_MAGIC_VALUE);
const R_VERSION: u64 = reg(VIRTIO_MMIO_VERSION);
const R_DEVICE_ID: u64 = reg(VIRTIO_MMIO_DEVICE_ID);
const R_VENDOR: u64 = reg(VIRTIO_MMIO_VENDOR_ID);
const R_DEVICE_FEATURES: u64 = reg(VIRTIO_MMIO_DEVICE_FEATURES);
const R_DEVICE_FEATURES_SEL: u64 = reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL);
const R_DRIVER_FEATURES: u64 = reg(VIRTIO_MMIO_DRIVER_FEATURES);
const R_DRIVER_FEATURES_SEL: u64 = reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL);
const R_QUEUE_SEL: u64 = reg(VIRTIO_MMIO_QUEUE_SEL);
const R_QUEUE_NUM_MAX: u64 = reg(VIRTIO_MMIO_QUEUE_NUM_MAX);
const R_QUEUE_NUM: u64 = reg(VIRTIO_MMIO_QUEUE_NUM);
const R_QUEUE_READY: u64 = reg(VIRTIO_MMIO_QUEUE_READY);
const R_QUEUE_NOTIFY: u64 = reg(VIRTIO_MMIO_QUEUE_NOTIFY);
const R_INTERRUPT_STATUS: u64 = reg(VIRTIO_MMIO_INTERRUPT_STATUS);
const R_INTERRUPT_ACK: u64 = reg(VIRTIO_MMIO_INTERRUPT_ACK);
const R_STATUS: u64 = reg(VIRTIO_MMIO_STATUS);
const R_QUEUE_DESC_LOW: u64 = reg(VIRTIO_MMIO_QUEUE_DESC_LOW);
const R_QUEUE_DESC_HIGH: u64 = reg(VIRTIO_MMIO_QUEUE_DESC_HIGH);
const R_QUEUE_AVAIL_LOW: u64 = reg(VIRTIO_MMIO_QUEUE_AVAIL_LOW);
const R_QUEUE_AVAIL_HIGH: u64 = reg(VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
const R_QUEUE_USED_LOW: u64 = reg(VIRTIO_MMIO_QUEUE_USED_LOW);
const R_QUEUE_USED_HIGH: u64 = reg(VIRTIO_MMIO_QUEUE_USED_HIGH);
const R_CONFIG_GENERATION: u64 = reg(VIRTIO_MMIO_CONFIG_GENERATION);
const R_CONFIG: u64 = reg(VIRTIO_MMIO_CONFIG);

/// Why a device stopped serving its guest driver until the driver resets it
/// (the transport sets DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot update the used ring")]
    UsedRing(#[source] virtio_queue::Error),
    #[error("queue {0} notified but not validly configured")]
    QueueInvalid(usize),
}

/// Puts a chain on the used ring.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    queue
        .add_used(mem, head, len)
        .map_err(DeviceError::UsedRing)
}

/// Serves every chain the guest made available on `queue`, in order: `serve`
/// gets its descriptors and returns the bytes it wrote into them, then the
/// chain goes on the used ring. Returns whether any chain was served.
pub fn serve_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut serve: impl FnMut(&[Descriptor]) -> u32,
) -> Result<bool, DeviceError> {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let len = serve(&descs);
        add_used(queue, mem, head, len)?;
        used = true;
    }
    Ok(used)
}

/// A device behind the transport.
pub trait VirtioDevice {
    fn device_type(&self) -> u32;
    /// Feature bits offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Bytes of the device configuration space.
    fn config(&self) -> &[u8];
    fn queue_max_sizes(&self) -> &[u16];
    /// Handles a notification on queue `index` (checked ready and valid;
    /// any other queue a device touches it must check itself); returns
    /// whether the guest should be interrupted. Errors end the device until
    /// it is reset.
    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError>;
}

/// One virtio-mmio device slot.
pub struct MmioTransport<D: VirtioDevice> {
    pub device: D,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    irq: EventFd,
    /// Set when the guest broke the protocol; says why.
    pub broken: Option<DeviceError>,
    /// Interrupts raised.
    pub interrupts: u64,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("broken", &self.broken)
            .finish()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).expect("valid queue size"))
            .collect();
        Self {
            device,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            irq,
            broken: None,
            interrupts: 0,
        }
    }

    /// Whether the guest's driver finished setting the device up (DRIVER_OK).
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.broken.is_none()
    }

    fn offered(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.broken = None;
    }

    /// A guest read at `offset` within the device's 4 KiB window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= R_CONFIG {
            let cfg = self.device.config();
            let start = (offset - R_CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = start
                    .checked_add(i)
                    .and_then(|j| cfg.get(j))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            R_MAGIC => MAGIC,
            R_VERSION => VERSION,
            R_DEVICE_ID => self.device.device_type(),
            R_VENDOR => VENDOR,
            R_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            R_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            R_QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            R_INTERRUPT_STATUS => self.interrupt_status,
            R_STATUS => self.status,
            R_CONFIG_GENERATION => 0, // config generation: the config never changes
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write; `mem` is needed when a notification makes the device work.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            R_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            R_DRIVER_FEATURES if configurable => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            R_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            R_QUEUE_SEL => self.queue_sel = v,
            R_QUEUE_NUM if configurable => {
                if let Some(q) = self.selected() {
                    // Queue rejects sizes that are zero, too big or not a power of two.
                    if v <= u32::from(u16::MAX) {
                        q.set_size(v as u16);
                    }
                }
            }
            R_QUEUE_READY if configurable => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            R_QUEUE_NOTIFY => self.notify(v, mem),
            R_INTERRUPT_ACK => self.interrupt_status &= !v,
            R_STATUS => {
                if v == 0 {
                    self.reset();
                } else if v & STATUS_FEATURES_OK != 0 && self.driver_features & !self.offered() != 0
                {
                    // Features the device did not offer: refuse FEATURES_OK.
                    self.status = v & !STATUS_FEATURES_OK;
                } else {
                    self.status = v;
                }
            }
            R_QUEUE_DESC_LOW | R_QUEUE_DESC_HIGH | R_QUEUE_AVAIL_LOW | R_QUEUE_AVAIL_HIGH
            | R_QUEUE_USED_LOW | R_QUEUE_USED_HIGH
                if configurable =>
            {
                if let Some(q) = self.selected() {
                    let (lo, hi) = if offset.is_multiple_of(8) {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset {
                        R_QUEUE_DESC_LOW | R_QUEUE_DESC_HIGH => q.set_desc_table_address(lo, hi),
                        R_QUEUE_AVAIL_LOW | R_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {} // unknown or read-only register: ignored
        }
    }

    fn notify(&mut self, index: u32, mem: &GuestMemoryMmap) {
        if self.status & STATUS_DRIVER_OK == 0 || self.broken.is_some() {
            return;
        }
        let index = index as usize;
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() || !queue.is_valid(mem) {
            self.fail(DeviceError::QueueInvalid(index));
            return;
        }
        match self.device.process(index, &mut self.queues, mem) {
            Ok(true) => {
                self.interrupt_status |= INT_USED_RING;
                self.interrupts += 1;
                let _ = self.irq.write(1);
            }
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    /// Runs device work that did not come from a guest notification (input
    /// from another thread), interrupting the guest if it used buffers.
    pub fn poke(
        &mut self,
        mem: &GuestMemoryMmap,
        work: impl FnOnce(&mut D, &mut [Queue], &GuestMemoryMmap) -> Result<bool, DeviceError>,
    ) {
        if self.status & STATUS_DRIVER_OK == 0 || self.broken.is_some() {
            return;
        }
        match work(&mut self.device, &mut self.queues, mem) {
            Ok(true) => {
                self.interrupt_status |= INT_USED_RING;
                self.interrupts += 1;
                let _ = self.irq.write(1);
            }
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, why: DeviceError) {
        self.status |= STATUS_NEEDS_RESET;
        self.broken = Some(why);
    }
}
