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

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5250_5948; // "HYPR"
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const INT_USED_RING: u32 = 1;

/// Puts a chain on the used ring; the error names what failed.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), String> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| format!("cannot update the used ring: {e}"))
}

/// Serves every chain the guest made available on `queue`, in order: `serve`
/// gets its descriptors and returns the bytes it wrote into them, then the
/// chain goes on the used ring. Returns whether any chain was served.
pub fn serve_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut serve: impl FnMut(&[Descriptor]) -> u32,
) -> Result<bool, String> {
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
    ) -> Result<bool, String>;
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
    /// Set when the guest broke the protocol; says why (for `-v`).
    pub broken: Option<String>,
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
        if offset >= 0x100 {
            let cfg = self.device.config();
            let start = (offset - 0x100) as usize;
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
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0, // config generation: the config never changes
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
            0x014 => self.device_features_sel = v,
            0x020 if configurable => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if configurable => {
                if let Some(q) = self.selected() {
                    // Queue rejects sizes that are zero, too big or not a power of two.
                    if v <= u32::from(u16::MAX) {
                        q.set_size(v as u16);
                    }
                }
            }
            0x044 if configurable => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => self.notify(v, mem),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
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
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if configurable => {
                if let Some(q) = self.selected() {
                    let (lo, hi) = if offset.is_multiple_of(8) {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset {
                        0x080 | 0x084 => q.set_desc_table_address(lo, hi),
                        0x090 | 0x094 => q.set_avail_ring_address(lo, hi),
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
            self.fail(format!("queue {index} notified but not validly configured"));
            return;
        }
        match self.device.process(index, &mut self.queues, mem) {
            Ok(true) => {
                self.interrupt_status |= INT_USED_RING;
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
        work: impl FnOnce(&mut D, &mut [Queue], &GuestMemoryMmap) -> Result<bool, String>,
    ) {
        if self.status & STATUS_DRIVER_OK == 0 || self.broken.is_some() {
            return;
        }
        match work(&mut self.device, &mut self.queues, mem) {
            Ok(true) => {
                self.interrupt_status |= INT_USED_RING;
                let _ = self.irq.write(1);
            }
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, why: String) {
        self.status |= STATUS_NEEDS_RESET;
        self.broken = Some(why);
    }
}
