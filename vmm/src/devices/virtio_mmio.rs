//! The virtio-mmio transport (virtio 1.2, section 4.2, version 2 registers).
//!
//! Every register access comes from the guest and is treated as hostile: reads
//! and writes of the wrong width, unknown offsets and values out of range are
//! ignored (reads return 0), and a queue configured outside guest memory is
//! never used — the device sets DEVICE_NEEDS_RESET instead.
//!
//! Exits are what a boot spends most on, so the VMM keeps them out of the
//! register protocol where it can (see `vm.rs`):
//! - reads: with a [`RegisterPage`], the transport publishes every readable
//!   register into a page the guest maps read-only over the device's window,
//!   after each change and before the vCPU resumes; the guest reads memory;
//! - writes that only store a value used later ([`COALESCED`]: the driver's
//!   features, queue sizes and addresses, interrupt acknowledgements) are
//!   queued by KVM and applied, in order, before the next exit is served;
//! - queue notifications go to an eventfd (`ioeventfd`) per queue, but for
//!   the queues a device serves in the vCPU's own exit
//!   ([`VirtioDevice::served_in_exit`]).
//!
//! With a register page the interrupt status is sticky: once raised, the
//! used-ring bit stays set until the device is reset, since a queued
//! acknowledgement applied after a newer interrupt would otherwise hide it;
//! the driver then looks at its queues on every interrupt, which costs
//! nothing when they hold nothing.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryMmap, MmapRegion, VolatileMemory};
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

/// The register ranges (offset, length) whose writes KVM may queue instead
/// of exiting: nothing the guest reads depends on them until a later write
/// that does exit (FEATURES_OK, QUEUE_READY), and the queue is applied
/// before that exit is served.
pub const COALESCED: [(u64, u32); 4] = [
    (R_DRIVER_FEATURES, 8), // DriverFeatures, DriverFeaturesSel
    (R_QUEUE_NUM, 4),
    (R_INTERRUPT_ACK, 4),
    (R_QUEUE_DESC_LOW, 0x28), // QueueDesc, QueueDriver (avail), QueueDevice (used)
];

/// The offset of the queue-notify register (its writes go to ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = R_QUEUE_NOTIFY;

/// The readable registers a [`RegisterPage`] shows (the config space aside).
const READABLE: [u64; 10] = [
    R_MAGIC,
    R_VERSION,
    R_DEVICE_ID,
    R_VENDOR,
    R_DEVICE_FEATURES,
    R_QUEUE_NUM_MAX,
    R_QUEUE_READY,
    R_INTERRUPT_STATUS,
    R_STATUS,
    R_CONFIG_GENERATION,
];

/// A device's 4 KiB register window as guest-readable memory: one page of
/// a mapping the VMM shares with the guest read-only.
#[derive(Debug, Clone)]
pub struct RegisterPage {
    region: Arc<MmapRegion>,
    offset: usize,
}

impl RegisterPage {
    /// Page `index` of `region` (which must hold it).
    pub fn new(region: Arc<MmapRegion>, index: usize) -> Self {
        Self {
            region,
            offset: index * 0x1000,
        }
    }

    fn put(&self, offset: u64, bytes: &[u8]) {
        let at = self.offset + offset as usize;
        if let Ok(s) = self.region.get_slice(at, bytes.len()) {
            s.copy_from(bytes);
        }
    }
}

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
    /// Whether the guest's notifications of queue `index` are served in the
    /// vCPU's own exit (no ioeventfd): for a queue whose driver spins until
    /// its buffer comes back, so the buffer is back when the guest resumes.
    fn served_in_exit(&self, _index: usize) -> bool {
        false
    }
    /// What the device keeps besides its queues, for a snapshot.
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes back what [`VirtioDevice::save`] gave.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Takes whatever the guest has queued for the host without waiting
    /// for its notification (the VM is ending: output must not be lost).
    fn flush(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        Ok(false)
    }
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
    page: Option<RegisterPage>,
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
            page: None,
        }
    }

    /// The transport's registers, its queues and the device's own state,
    /// for a snapshot.
    pub fn save(&self) -> serde_json::Value {
        let queues: Vec<serde_json::Value> = self
            .queues
            .iter()
            .map(|q| {
                let s = q.state();
                serde_json::json!({
                    "max_size": s.max_size, "next_avail": s.next_avail, "next_used": s.next_used,
                    "event_idx": s.event_idx_enabled, "size": s.size, "ready": s.ready,
                    "desc": s.desc_table, "avail": s.avail_ring, "used": s.used_ring,
                })
            })
            .collect();
        serde_json::json!({
            "queue_sel": self.queue_sel,
            "device_features_sel": self.device_features_sel,
            "driver_features_sel": self.driver_features_sel,
            "driver_features": self.driver_features,
            "status": self.status,
            "interrupt_status": self.interrupt_status,
            "queues": queues,
            "device": self.device.save(),
        })
    }

    /// Takes back a [`MmioTransport::save`] of the same device.
    pub fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let u = |k: &str| v[k].as_u64().ok_or(format!("no {k}"));
        let queues = v["queues"].as_array().ok_or("no queues")?;
        if queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                queues.len(),
                self.queues.len()
            ));
        }
        for (q, s) in self.queues.iter_mut().zip(queues) {
            let n = |k: &str| s[k].as_u64().ok_or(format!("no queue {k}"));
            let state = virtio_queue::QueueState {
                max_size: n("max_size")? as u16,
                next_avail: n("next_avail")? as u16,
                next_used: n("next_used")? as u16,
                event_idx_enabled: s["event_idx"].as_bool().unwrap_or(false),
                size: n("size")? as u16,
                ready: s["ready"].as_bool().unwrap_or(false),
                desc_table: n("desc")?,
                avail_ring: n("avail")?,
                used_ring: n("used")?,
            };
            if state.max_size != q.max_size() {
                return Err("a queue's size differs".into());
            }
            *q = Queue::try_from(state).map_err(|e| format!("queue: {e}"))?;
        }
        self.queue_sel = u("queue_sel")? as u32;
        self.device_features_sel = u("device_features_sel")? as u32;
        self.driver_features_sel = u("driver_features_sel")? as u32;
        self.driver_features = u("driver_features")?;
        self.status = u("status")? as u32;
        self.interrupt_status = u("interrupt_status")? as u32;
        self.broken = None;
        self.device.restore(&v["device"])?;
        self.publish();
        Ok(())
    }

    /// Publishes the registers into `page` from now on (see the module).
    pub fn set_page(&mut self, page: RegisterPage) {
        self.page = Some(page);
        self.publish();
    }

    /// Writes every readable register, and the config space, into the page.
    fn publish(&self) {
        let Some(page) = &self.page else {
            return;
        };
        for r in READABLE {
            page.put(r, &self.register(r).to_le_bytes());
        }
        page.put(R_CONFIG, self.device.config());
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

    /// A 32-bit register's value as the guest reads it.
    fn register(&self, offset: u64) -> u32 {
        let selected = self.queues.get(self.queue_sel as usize);
        match offset {
            R_MAGIC => MAGIC,
            R_VERSION => VERSION,
            R_DEVICE_ID => self.device.device_type(),
            R_VENDOR => VENDOR,
            R_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            R_QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size())),
            R_QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready())),
            R_INTERRUPT_STATUS => self.interrupt_status,
            R_STATUS => self.status,
            R_CONFIG_GENERATION => 0, // config generation: the config never changes
            _ => 0,
        }
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
        if data.len() != 4 || !READABLE.contains(&offset) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.register(offset).to_le_bytes());
    }

    /// A guest write; `mem` is needed when a notification makes the device
    /// work. The register page shows its effect before this returns.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        self.apply(offset, data, mem);
        self.publish();
    }

    fn apply(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
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
            // Sticky with a register page (see the module).
            R_INTERRUPT_ACK if self.page.is_none() => self.interrupt_status &= !v,
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

    /// The guest notified queue `index` (from the register, or its ioeventfd).
    pub fn notify(&mut self, index: u32, mem: &GuestMemoryMmap) {
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
        let result = self.device.process(index, &mut self.queues, mem);
        self.after(result);
    }

    /// Interrupts the guest after work that used its buffers, or stops
    /// the device after a protocol error.
    fn after(&mut self, result: Result<bool, DeviceError>) {
        match result {
            Ok(true) => {
                self.interrupt_status |= INT_USED_RING;
                self.interrupts += 1;
                // The page shows the status before the interrupt arrives.
                self.publish();
                let _ = self.irq.write(1);
            }
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    /// Serves every ready queue as if notified.
    pub fn notify_all(&mut self, mem: &GuestMemoryMmap) {
        for i in 0..self.queues.len() {
            if self.queues[i].ready() {
                self.notify(i as u32, mem);
            }
        }
    }

    /// Takes what the guest queued for the host (the VM is ending).
    pub fn flush(&mut self, mem: &GuestMemoryMmap) {
        self.poke(mem, |d, q, m| d.flush(q, m));
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
        let result = work(&mut self.device, &mut self.queues, mem);
        self.after(result);
    }

    fn fail(&mut self, why: DeviceError) {
        self.status |= STATUS_NEEDS_RESET;
        self.broken = Some(why);
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    struct Dummy;

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            1 << 40 | 1 << 3
        }
        fn config(&self) -> &[u8] {
            b"0123456789"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 64]
        }
        fn process(
            &mut self,
            _index: usize,
            _queues: &mut [Queue],
            _mem: &GuestMemoryMmap,
        ) -> Result<bool, DeviceError> {
            Ok(true)
        }
    }

    /// What the guest reads from the page at `offset`.
    fn page_u32(region: &MmapRegion, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        region
            .get_slice(0x1000 + offset as usize, 4)
            .unwrap()
            .copy_to(&mut b[..]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_register_page_reads_as_the_registers_do_through_a_driver_setup() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let region = Arc::new(MmapRegion::new(0x2000).unwrap());
        let mut t = MmioTransport::new(Dummy, EventFd::new(libc::EFD_NONBLOCK).unwrap());
        t.set_page(RegisterPage::new(region.clone(), 1));
        let check = |t: &mut MmioTransport<Dummy>| {
            for r in READABLE {
                let mut d = [0u8; 4];
                t.read(r, &mut d);
                assert_eq!(
                    page_u32(&region, r),
                    u32::from_le_bytes(d),
                    "register {r:#x}"
                );
            }
        };
        let w = |t: &mut MmioTransport<Dummy>, r: u64, v: u32| t.write(r, &v.to_le_bytes(), &mem);
        check(&mut t);
        assert_eq!(page_u32(&region, R_MAGIC), MAGIC);
        assert_eq!(page_u32(&region, R_DEVICE_ID), 2);
        w(&mut t, R_STATUS, 1 | 2);
        w(&mut t, R_DEVICE_FEATURES_SEL, 1);
        check(&mut t);
        assert_eq!(page_u32(&region, R_DEVICE_FEATURES), 1 << 8 | 1);
        w(&mut t, R_DRIVER_FEATURES_SEL, 1);
        w(&mut t, R_DRIVER_FEATURES, 1);
        w(&mut t, R_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        assert_eq!(page_u32(&region, R_STATUS), 1 | 2 | STATUS_FEATURES_OK);
        w(&mut t, R_QUEUE_SEL, 1);
        check(&mut t);
        assert_eq!(page_u32(&region, R_QUEUE_NUM_MAX), 64);
        w(&mut t, R_QUEUE_NUM, 64);
        for (r, v) in [
            (R_QUEUE_DESC_LOW, 0x1000),
            (R_QUEUE_AVAIL_LOW, 0x2000),
            (R_QUEUE_USED_LOW, 0x3000),
        ] {
            w(&mut t, r, v);
        }
        w(&mut t, R_QUEUE_READY, 1);
        assert_eq!(page_u32(&region, R_QUEUE_READY), 1);
        w(&mut t, R_QUEUE_SEL, 0);
        assert_eq!(page_u32(&region, R_QUEUE_READY), 0);
        assert_eq!(page_u32(&region, R_QUEUE_NUM_MAX), 256);
        w(
            &mut t,
            R_STATUS,
            1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        // A notification that uses buffers: the status shows it, and stays.
        w(&mut t, R_QUEUE_NOTIFY, 1);
        assert_eq!(page_u32(&region, R_INTERRUPT_STATUS), INT_USED_RING);
        w(&mut t, R_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(
            page_u32(&region, R_INTERRUPT_STATUS),
            INT_USED_RING,
            "sticky"
        );
        check(&mut t);
        let mut cfg = [0u8; 10];
        region
            .get_slice(0x1000 + R_CONFIG as usize, 10)
            .unwrap()
            .copy_to(&mut cfg);
        assert_eq!(&cfg, b"0123456789");
        // Reset clears it all.
        w(&mut t, R_STATUS, 0);
        check(&mut t);
        assert_eq!(page_u32(&region, R_STATUS), 0);
        assert_eq!(page_u32(&region, R_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn without_a_page_acknowledgements_clear_the_status() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut t = MmioTransport::new(Dummy, EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let w = |t: &mut MmioTransport<Dummy>, r: u64, v: u32| t.write(r, &v.to_le_bytes(), &mem);
        w(&mut t, R_QUEUE_SEL, 0);
        w(&mut t, R_QUEUE_NUM, 256);
        w(&mut t, R_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, R_QUEUE_AVAIL_LOW, 0x5000);
        w(&mut t, R_QUEUE_USED_LOW, 0x6000);
        w(&mut t, R_QUEUE_READY, 1);
        w(&mut t, R_STATUS, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        w(&mut t, R_QUEUE_NOTIFY, 0);
        let mut d = [0u8; 4];
        t.read(R_INTERRUPT_STATUS, &mut d);
        assert_eq!(u32::from_le_bytes(d), INT_USED_RING);
        w(&mut t, R_INTERRUPT_ACK, INT_USED_RING);
        t.read(R_INTERRUPT_STATUS, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }
}
