//! One VM: [`Vm::create`] turns a [`VmConfig`] into a machine ready to run
//! (KVM objects, guest memory, devices in their slots, the kernel loaded,
//! vCPUs set up); [`Vm::start`] starts its threads; the [`Controller`] is
//! how its owner talks to it; [`Running::wait`] collects the [`Outcome`].
//!
//! Ending: whoever ends the VM (a vCPU on the guest's request or fault, or
//! the owner) records the reason once, marks the VM done and kicks every
//! vCPU thread that has registered; a thread registers under the same lock
//! and checks "done" there, so none is missed, and the kick sets its
//! `immediate_exit`, so one that lands just before `KVM_RUN` is not lost.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use hyper_contract::HostMessage;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, MmioSlot};
use crate::control::{Carrier, Control};
use crate::devices::pio::PioBus;
use crate::devices::virtio_9p::Share;
use crate::devices::virtio_blk::Block;
use crate::devices::virtio_console::Console;
use crate::devices::virtio_mmio::{MmioTransport, RegisterPage, COALESCED, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio_net::{self, Net};
use crate::seccomp::Profile;
use crate::{
    kvm, layout, loader, lock, snapshot, sys, vcpu, End, NetStats, Outcome, ShareStats, VmConfig,
    VmmError,
};
use crate::{GuestFault, MAX_SHARES};

/// The first virtio-mmio slot of the `-v` shares (after the disk, the
/// console and the network card).
const SHARE_SLOT: usize = 3;

/// A queue's notification eventfd, with its device and queue index.
type Notifier = (Arc<Mutex<dyn MmioSlot>>, u32, EventFd);

/// A machine ready to run.
pub struct Vm {
    timeline: crate::stats::Timeline,
    /// The names of the occupied virtio-mmio slots.
    slot_names: Vec<(usize, String)>,
    guest_memory: (usize, usize),
    /// Kept open while the VM runs; the snapshot thread reads the
    /// machine's state through it.
    vm: Arc<VmFd>,
    bus: Arc<Bus>,
    vcpus: Vec<VcpuFd>,
    blk: Option<Arc<Mutex<MmioTransport<Block>>>>,
    console: Option<Arc<Mutex<MmioTransport<Console>>>>,
    net: Option<Arc<Mutex<MmioTransport<Net>>>>,
    net_rx: Option<virtio_net::Backend>,
    shares: Vec<Arc<Mutex<MmioTransport<Share>>>>,
    control: Arc<Mutex<Control>>,
    /// Each queue's notification eventfd, with its device and index.
    notifiers: Vec<Notifier>,
    /// The devices' register pages, mapped read-only into the guest.
    _registers: Option<Arc<MmapRegion>>,
    stdin: Option<Box<dyn Read + Send>>,
    seccomp: bool,
    on_end: Option<Box<dyn Fn() + Send + Sync>>,
    start: Option<Box<dyn FnOnce() -> Vec<u8> + Send>>,
    snapshot: Option<crate::SnapshotPlan>,
    /// The MSRs a snapshot saves (asked of KVM before any filter).
    msr_list: Vec<u32>,
    /// Booted from a snapshot: hyperinit waits for its start already.
    restored: bool,
    /// hyperinit says `waiting` (contract 4): the snapshot thread's cue.
    waiting: Option<std::sync::mpsc::Receiver<()>>,
    memory_mib: u64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .field("shares", &self.shares.len())
            .finish()
    }
}

impl Vm {
    /// Builds the machine. Guest memory against the host's is the owner's
    /// check, made once before.
    pub fn create(mut cfg: VmConfig) -> Result<Vm, VmmError> {
        crate::phase("vmm start");
        if cfg.shares.len() > MAX_SHARES {
            return Err(VmmError::TooManyShares);
        }
        let kvm = kvm::open()?;
        crate::phase("kvm open");
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::Create("KVM_CREATE_VM", e))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| VmmError::Create("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmmError::Create("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmmError::Create("KVM_CREATE_PIT2", e))?;
        crate::phase("vm created");
        let mut timeline = crate::stats::Timeline {
            vm_created: sys::monotonic_ns(),
            ..Default::default()
        };

        let mem_bytes = cfg.memory_mib << 20;
        let restore = cfg.restore.take();
        let mem = match &restore {
            None => {
                let mem = GuestMemoryMmap::<()>::from_ranges(&layout::ram_regions(mem_bytes))
                    .map_err(|e| VmmError::Memory(cfg.memory_mib, e))?;
                for region in mem.iter() {
                    // A host without THP boots in 4 KiB pages, as before.
                    let _ = sys::advise_huge_pages(region);
                }
                mem
            }
            Some((file, header, state)) => {
                if state.memory_mib != cfg.memory_mib || header.memory_len != mem_bytes {
                    return Err(snapshot::SnapshotError::Foreign.into());
                }
                restored_memory(file, header.memory_offset, mem_bytes)?
            }
        };
        for (slot, region) in mem.iter().enumerate() {
            sys::map_region(
                &vm,
                slot as u32,
                region.start_addr().0,
                region.len(),
                region.as_ptr(),
            )
            .map_err(|e| VmmError::Create("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        crate::phase("memory mapped");
        timeline.memory_ready = sys::monotonic_ns();
        let guest_memory = mem
            .iter()
            .next()
            .map_or((0, 0), |r| (r.as_ptr() as usize, r.len() as usize));

        // The virtio-mmio devices, each in a fixed slot: a 4 KiB window from
        // VIRTIO_MMIO_BASE and the interrupt line VIRTIO_IRQ_BASE + slot.
        let irq = |line: u32| -> Result<EventFd, VmmError> {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
            vm.register_irqfd(&fd, line)
                .map_err(|e| VmmError::Create("KVM_IRQFD", e))?;
            Ok(fd)
        };
        let slot_irq = |slot: usize| irq(layout::VIRTIO_IRQ_BASE + slot as u32);
        let blk = match cfg.rootfs.take() {
            Some((file, offset, len)) => Some(Arc::new(Mutex::new(MmioTransport::new(
                Block::new(file, offset, len),
                slot_irq(0)?,
            )))),
            None => None,
        };
        let control = Arc::new(Mutex::new(Control::default()));
        let waiting = if cfg.start.is_some() {
            let (tx, rx) = std::sync::mpsc::channel();
            let mut c = lock(&control);
            c.on_waiting(tx);
            c.gate();
            drop(c);
            Some(rx)
        } else {
            None
        };
        let console = if cfg.streams.is_empty() && !cfg.control_port {
            None
        } else {
            let input = cfg.stdin.is_some().then_some("hyper.stdin");
            Some(Arc::new(Mutex::new(MmioTransport::new(
                Console::new(
                    std::mem::take(&mut cfg.streams),
                    input,
                    cfg.control_port.then(|| control.clone()),
                ),
                slot_irq(1)?,
            ))))
        };
        let mut net_rx = None;
        let net = match cfg.net.take() {
            Some((mac, backend)) => {
                net_rx = Some(backend.try_clone().map_err(VmmError::EventFd)?);
                Some(Arc::new(Mutex::new(MmioTransport::new(
                    Net::new(mac, backend),
                    slot_irq(2)?,
                ))))
            }
            None => None,
        };
        let mut shares = Vec::with_capacity(cfg.shares.len());
        for (i, (tag, server)) in std::mem::take(&mut cfg.shares).into_iter().enumerate() {
            shares.push(Arc::new(Mutex::new(MmioTransport::new(
                Share::new(&tag, server),
                slot_irq(SHARE_SLOT + i)?,
            ))));
        }
        let mut slot_names: Vec<(usize, String)> = [
            (blk.is_some(), "virtio-blk"),
            (console.is_some(), "virtio-console"),
            (net.is_some(), "virtio-net"),
        ]
        .into_iter()
        .enumerate()
        .filter(|(_, (present, _))| *present)
        .map(|(i, (_, name))| (i, name.to_string()))
        .collect();
        slot_names.extend((0..shares.len()).map(|i| (SHARE_SLOT + i, format!("virtio-9p vol{i}"))));
        let mut slots: Vec<Option<Arc<Mutex<dyn MmioSlot>>>> = vec![
            blk.clone().map(|b| b as Arc<Mutex<dyn MmioSlot>>),
            console.clone().map(|c| c as Arc<Mutex<dyn MmioSlot>>),
            net.clone().map(|n| n as Arc<Mutex<dyn MmioSlot>>),
        ];
        slots.extend(
            shares
                .iter()
                .map(|s| Some(s.clone() as Arc<Mutex<dyn MmioSlot>>)),
        );
        let Quiet {
            registers,
            notifiers,
            queued,
        } = quiet_registers(&kvm, &vm, &slots, mem.num_regions(), cfg.register_pages)?;
        let cpus = cfg.cpus.clamp(1, 64);
        let mut vcpu_states = None;
        if let Some((_, _, state)) = restore {
            restore_devices(&slots, &control, &state)?;
            snapshot::restore_machine(&vm, &state.machine)?;
            if state.vcpus.len() != usize::from(cpus) {
                return Err(snapshot::SnapshotError::Foreign.into());
            }
            vcpu_states = Some(state.vcpus);
        }
        // The kernel learns of each from the command line.
        let mut cmdline = cfg.cmdline.clone();
        for (slot, _) in slots.iter().enumerate().filter(|(_, d)| d.is_some()) {
            cmdline.push_str(&format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                layout::VIRTIO_MMIO_BASE + slot as u64 * layout::VIRTIO_MMIO_SIZE,
                layout::VIRTIO_IRQ_BASE + slot as u32
            ));
        }
        let entry = if vcpu_states.is_some() {
            0 // the kernel is in the snapshot's memory
        } else {
            let loaded = loader::load(&mem, mem_bytes, &mut cfg.kernel, &cfg.initrd, &cmdline)?;
            layout::write_mptable(&mem, cpus)?;
            loaded.entry
        };
        crate::phase("guest loaded");
        timeline.kernel_ready = sys::monotonic_ns();

        let pio = Arc::new(Mutex::new(PioBus::new(
            irq(layout::SERIAL_IRQ)?,
            irq(layout::CONTROL_IRQ)?,
            cfg.console,
            control.clone(),
        )));
        let bus = Arc::new(Bus {
            pio,
            slots,
            mem: mem.clone(),
            exits: Default::default(),
            queued: queued.then(|| Mutex::new(())),
        });
        let mut vcpus = Vec::with_capacity(usize::from(cpus));
        for id in 0..cpus {
            let mut vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmmError::Create("KVM_CREATE_VCPU", e))?;
            if queued {
                vcpu.map_coalesced_mmio_ring()
                    .map_err(|e| VmmError::Create("mmap of the coalesced MMIO ring", e))?;
            }
            match &vcpu_states {
                Some(states) => snapshot::restore_vcpu(&vcpu, states, usize::from(id))?,
                None => {
                    vcpu::setup_cpuid(&kvm, &vcpu, id, cpus)?;
                    vcpu::setup_msrs(&vcpu)?;
                    if id == 0 {
                        vcpu::setup_pvh_regs(&vcpu, &mem, entry)?;
                    }
                    vcpu::setup_lapic(&vcpu)?;
                }
            }
            vcpus.push(vcpu);
        }
        crate::phase("vcpu ready");
        Ok(Vm {
            timeline,
            slot_names,
            guest_memory,
            vm: Arc::new(vm),
            bus,
            vcpus,
            blk,
            console,
            net,
            net_rx,
            shares,
            control,
            notifiers,
            _registers: registers,
            stdin: cfg.stdin.take(),
            seccomp: cfg.seccomp,
            on_end: cfg.on_end.take(),
            start: cfg.start.take(),
            msr_list: if cfg.snapshot.is_some() {
                snapshot::msr_list(&kvm)
            } else {
                Vec::new()
            },
            snapshot: cfg.snapshot.take(),
            restored: vcpu_states.is_some(),
            waiting,
            memory_mib: cfg.memory_mib,
        })
    }

    /// Starts the device helpers, then a thread per vCPU (`vcpu0`, …);
    /// returns at once.
    pub fn start(mut self) -> Result<Running, VmmError> {
        sys::install_handlers().map_err(VmmError::Signals)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        let shared = Arc::new(Shared {
            pio: self.bus.pio.clone(),
            console: self.console.clone(),
            control: self.control.clone(),
            mem: self.bus.mem.clone(),
            stop: stop.try_clone().map_err(VmmError::EventFd)?,
            end: Mutex::new(None),
            done: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            on_end: self.on_end.take(),
            exits: AtomicU64::new(0),
            first_run_ns: AtomicU64::new(0),
            first_exit_ns: AtomicU64::new(0),
            ended_ns: AtomicU64::new(0),
            pause: Pause::default(),
            msr_list: std::mem::take(&mut self.msr_list),
            started: AtomicBool::new(self.start.is_none()),
        });
        let mem = self.bus.mem.clone();
        let filtered = self.seccomp;
        if let Some(start) = self.start.take() {
            let starter = Starter {
                vm: self.vm.clone(),
                shared: shared.clone(),
                bus: self.bus.clone(),
                waiting: self.waiting.take(),
                restored: self.restored,
                plan: self.snapshot.take(),
                start,
                cpus: self.vcpus.len(),
                memory_mib: self.memory_mib,
            };
            sys::spawn("start".into(), Profile::Snapshot, filtered, move || {
                starter.run()
            })?;
        }
        if let (Some(stdin), Some(console)) = (self.stdin.take(), &self.console) {
            let (console, shared) = (console.clone(), shared.clone());
            let mem = mem.clone();
            sys::spawn("stdin".into(), Profile::Helper, filtered, move || {
                feed_stdin(stdin, &console, &shared, &mem)
            })?;
        }
        if let (Some(backend), Some(net)) = (self.net_rx.take(), &self.net) {
            let (net, mem) = (net.clone(), mem.clone());
            sys::spawn("net-rx".into(), Profile::Helper, filtered, move || {
                virtio_net::receive(backend, &net, &mem)
            })?;
        }
        for (i, share) in self.shares.iter().enumerate() {
            let (share, mem) = (share.clone(), mem.clone());
            sys::spawn(
                format!("vol{i}"),
                Profile::FileServer,
                filtered,
                move || crate::devices::virtio_9p::serve(&share, &mem),
            )?;
        }
        if !self.notifiers.is_empty() {
            let notifiers = std::mem::take(&mut self.notifiers);
            let (bus, mem) = (self.bus.clone(), mem.clone());
            sys::spawn("virtio".into(), Profile::Helper, filtered, move || {
                serve_notifications(&notifiers, &stop, &bus, &mem)
            })?;
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (id, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let (bus, own) = (self.bus.clone(), shared.clone());
            match sys::spawn(format!("vcpu{id}"), Profile::Vcpu, filtered, move || {
                run_vcpu(vcpu, id, &bus, &own)
            }) {
                Ok(h) => vcpus.push(h),
                Err(e) => {
                    shared.finish(End::Host);
                    for h in vcpus {
                        let _ = h.join();
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(Running {
            controller: Controller { shared },
            vcpus,
            vm: self,
        })
    }
}

/// What the VM's threads and its owner share.
struct Shared {
    pio: Arc<Mutex<PioBus>>,
    console: Option<Arc<Mutex<MmioTransport<Console>>>>,
    control: Arc<Mutex<Control>>,
    mem: GuestMemoryMmap,
    /// Written when the VM ends: the notification thread leaves.
    stop: EventFd,
    /// Why the VM ended; set once.
    end: Mutex<Option<End>>,
    done: AtomicBool,
    /// The vCPU threads (by vCPU id) that run and may need a kick; a
    /// thread leaves the list, under its lock, before it returns.
    threads: Mutex<Vec<(usize, libc::pthread_t)>>,
    on_end: Option<Box<dyn Fn() + Send + Sync>>,
    exits: AtomicU64,
    first_run_ns: AtomicU64,
    first_exit_ns: AtomicU64,
    ended_ns: AtomicU64,
    /// Parks every vCPU outside `KVM_RUN` (for a snapshot).
    pause: Pause,
    /// The MSRs a vCPU saves when parked for a snapshot.
    msr_list: Vec<u32>,
    /// The run has begun: at once, or (contract 4) once the start message
    /// is sent. Nothing of the run (stdin, requests) reaches the guest
    /// before, so none of it can end up in a snapshot.
    started: AtomicBool,
}

/// Parking the vCPUs: the snapshot thread asks, kicks each out of
/// `KVM_RUN`; each vCPU thread, seeing the request, saves its own state
/// when asked to, counts itself parked and waits to be let go.
#[derive(Default)]
struct Pause {
    requested: AtomicBool,
    inner: Mutex<Parked>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct Parked {
    count: usize,
    capture: bool,
    states: Vec<Option<Result<snapshot::VcpuState, snapshot::SnapshotError>>>,
}

impl Shared {
    /// vCPU `id`'s thread, outside `KVM_RUN`: parks while a pause is asked.
    fn park_if_asked(&self, vcpu: &VcpuFd, id: usize) {
        if !self.pause.requested.load(Ordering::SeqCst) {
            return;
        }
        let mut p = lock(&self.pause.inner);
        if !self.pause.requested.load(Ordering::SeqCst) {
            return;
        }
        if p.capture {
            let state = snapshot::capture_vcpu(vcpu, &self.msr_list);
            if let Some(slot) = p.states.get_mut(id) {
                *slot = Some(state);
            }
        }
        p.count += 1;
        self.pause.cv.notify_all();
        while self.pause.requested.load(Ordering::SeqCst) && !self.done.load(Ordering::SeqCst) {
            p = self
                .pause
                .cv
                .wait_timeout(p, std::time::Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        p.count -= 1;
    }

    /// Parks all `n` vCPUs (capturing their state if `capture`); false when
    /// the VM ended first.
    fn pause_all(&self, n: usize, capture: bool) -> bool {
        {
            let mut p = lock(&self.pause.inner);
            p.capture = capture;
            p.states = (0..n).map(|_| None).collect();
        }
        self.pause.requested.store(true, Ordering::SeqCst);
        let mut p = lock(&self.pause.inner);
        while p.count < n {
            if self.done.load(Ordering::SeqCst) {
                return false;
            }
            for &(_, t) in lock(&self.threads).iter() {
                // SAFETY: a listed thread is alive (see `finish`).
                unsafe { sys::kick_thread(t) };
            }
            p = self
                .pause
                .cv
                .wait_timeout(p, std::time::Duration::from_millis(20))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    /// Lets the parked vCPUs run again.
    fn resume_all(&self) {
        let _p = lock(&self.pause.inner);
        self.pause.requested.store(false, Ordering::SeqCst);
        self.pause.cv.notify_all();
    }

    /// Registers the calling thread as vCPU `id`'s; false when the VM has
    /// ended already.
    fn register(&self, id: usize) -> bool {
        let mut threads = lock(&self.threads);
        if self.done.load(Ordering::SeqCst) {
            return false;
        }
        threads.push((id, sys::this_thread()));
        true
    }

    /// vCPU `id`'s thread is about to return: no kick may target it after.
    fn unregister(&self, id: usize) {
        lock(&self.threads).retain(|(t, _)| *t != id);
    }

    /// Ends the VM for `why`, unless it has ended already.
    fn finish(&self, why: End) {
        {
            let mut end = lock(&self.end);
            if end.is_some() {
                return;
            }
            *end = Some(why);
        }
        crate::stats::mark_once(&self.ended_ns);
        self.done.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
        for &(_, t) in lock(&self.threads).iter() {
            // SAFETY: a registered thread unregisters, under this lock, before
            // it returns; so every thread listed here is alive.
            unsafe { sys::kick_thread(t) };
        }
        if let Some(f) = &self.on_end {
            f();
        }
    }
}

/// How the owner of a running VM talks to it. Cheap to clone.
#[derive(Clone)]
pub struct Controller {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("ended", &self.has_ended())
            .finish()
    }
}

impl Controller {
    /// Sends a request to hyperinit on the control channel (held until it
    /// says it listens); false when the guest is not taking them.
    pub fn send(&self, m: HostMessage) -> bool {
        let shared = &self.shared;
        // The control lock is released before the carrier's is taken.
        let carrier = lock(&shared.control).request(m);
        match carrier {
            None => true,
            Some(Carrier::Com2) => lock(&shared.pio).send_com2(&m),
            Some(Carrier::Port) => {
                let Some(console) = &shared.console else {
                    return false;
                };
                let mut c = lock(console);
                let queued = c.device.push_control(&m);
                c.poke(&shared.mem, |d, q, mem| d.deliver_input(q, mem));
                queued
            }
        }
    }

    /// Ends the VM now (its reason: [`End::Host`], unless it had ended).
    pub fn end(&self) {
        self.shared.finish(End::Host);
    }

    pub fn has_ended(&self) -> bool {
        self.shared.done.load(Ordering::SeqCst)
    }
}

/// A VM whose threads run.
pub struct Running {
    controller: Controller,
    vcpus: Vec<JoinHandle<()>>,
    vm: Vm,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

impl Running {
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// Waits for every vCPU thread to leave (they do once the VM has
    /// ended) and says how it went.
    pub fn wait(mut self) -> Outcome {
        for h in std::mem::take(&mut self.vcpus) {
            let _ = h.join();
        }
        let shared = &self.controller.shared;
        let end = lock(&shared.end).clone().unwrap_or(End::Host);
        let mut pio = lock(&self.vm.bus.pio);
        pio.flush();
        let stats = self.stats(shared, &pio);
        Outcome {
            end,
            status: lock(&self.vm.control).status().to_vec(),
            exits: shared.exits.load(Ordering::SeqCst),
            first_run_ns: shared.first_run_ns.load(Ordering::SeqCst),
            console_ports: self
                .vm
                .console
                .as_ref()
                .map_or(0, |c| lock(c).device.ready_ports),
            started: shared.started.load(Ordering::SeqCst),
            control_waiting: self
                .vm
                .console
                .as_ref()
                .map_or(0, |c| lock(c).device.control_waiting()),
            net: self.vm.net.as_ref().map(|n| {
                let n = lock(n);
                NetStats {
                    ready: n.driver_ok(),
                    sent: n.device.sent,
                    received: n.device.received,
                    dropped: n.device.dropped,
                }
            }),
            shares: self
                .vm
                .shares
                .iter()
                .map(|s| {
                    let s = lock(s);
                    ShareStats {
                        served: s.device.served,
                        refused: s.device.refused,
                    }
                })
                .collect(),
            stats,
        }
    }

    /// Exits by kind, interrupts by device, milestones.
    fn stats(&self, shared: &Shared, pio: &PioBus) -> crate::stats::VmStats {
        let c = &self.vm.bus.exits;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let mut interrupts = vec![("serial".to_string(), get(&pio.interrupts))];
        let slot_interrupts = |i: usize| -> u64 {
            match i {
                0 => self.vm.blk.as_ref().map_or(0, |d| lock(d).interrupts),
                1 => self.vm.console.as_ref().map_or(0, |d| lock(d).interrupts),
                2 => self.vm.net.as_ref().map_or(0, |d| lock(d).interrupts),
                n => self
                    .vm
                    .shares
                    .get(n - SHARE_SLOT)
                    .map_or(0, |d| lock(d).interrupts),
            }
        };
        interrupts.extend(
            self.vm
                .slot_names
                .iter()
                .map(|(i, n)| (n.clone(), slot_interrupts(*i))),
        );
        crate::stats::VmStats {
            timeline: crate::stats::Timeline {
                first_run: get(&shared.first_run_ns),
                first_exit: get(&shared.first_exit_ns),
                first_output: self
                    .vm
                    .console
                    .as_ref()
                    .map_or(0, |d| lock(d).device.first_output),
                timings: lock(&self.vm.control).timings_at(),
                ended: get(&shared.ended_ns),
                ..self.vm.timeline.clone()
            },
            exits: crate::stats::ExitCounts {
                total: get(&shared.exits),
                com1: get(&c.com1),
                com2: get(&c.com2),
                exit_port: get(&c.exit_port),
                other_io: get(&c.other_io),
                mmio: self
                    .vm
                    .slot_names
                    .iter()
                    .map(|(i, n)| (n.clone(), c.mmio.get(*i).map_or(0, get)))
                    .collect(),
                mmio_unmapped: get(&c.mmio_unmapped),
                hlt: get(&c.hlt),
                other: get(&c.other),
                queued_writes: get(&c.queued_writes),
                notifications: get(&c.notifications),
            },
            interrupts,
            guest_memory: self.vm.guest_memory,
        }
    }
}

/// A vCPU thread: runs the guest until the VM ends; exits are served on the
/// shared bus. The boot vCPU starts at the PVH entry, the others wait in KVM
/// for the guest's INIT/SIPI.
fn run_vcpu(mut vcpu: VcpuFd, id: usize, bus: &Bus, shared: &Shared) {
    sys::enter_vcpu(&mut vcpu);
    if !shared.register(id) {
        sys::leave_vcpu();
        return;
    }
    let trace = std::env::var_os("HYPER_VMM_TRACE").is_some();
    if id == 0 {
        shared
            .first_run_ns
            .store(sys::monotonic_ns(), Ordering::SeqCst);
    }
    while !shared.done.load(Ordering::SeqCst) {
        if shared.pause.requested.load(Ordering::SeqCst) {
            // A snapshot saves the devices: with every write the guest
            // queued for them applied.
            bus.apply_queued(&mut vcpu);
        }
        shared.park_if_asked(&vcpu, id);
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                shared.finish(End::Guest(GuestFault::Run {
                    vcpu: id,
                    errno: e.errno(),
                }));
                break;
            }
            Ok(exit) => {
                let n = shared.exits.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 {
                    crate::stats::mark_once(&shared.first_exit_ns);
                }
                if trace {
                    eprintln!(
                        "hyperboot: exit {n} (vCPU {id}) at {} us: {exit:?}",
                        crate::since_spawn_us()
                    );
                }
                let end = match exit {
                    VcpuExit::MmioWrite(addr, data) => {
                        // Writes KVM queued before this one apply first.
                        let mut copy = [0u8; 8];
                        let len = data.len().min(copy.len());
                        copy[..len].copy_from_slice(&data[..len]);
                        bus.apply_queued(&mut vcpu);
                        bus.mmio_write(addr, &copy[..len]);
                        None
                    }
                    other => bus.handle(other),
                };
                if let Some(end) = end {
                    shared.finish(end);
                    break;
                }
            }
        }
    }
    shared.unregister(id);
    sys::leave_vcpu();
}

/// `-i`: copies the app's stdin into the console's input port (waiting while
/// the guest has not taken a mebibyte already), then tells hyperinit where
/// it ended.
fn feed_stdin(
    mut stdin: Box<dyn Read + Send>,
    console: &Mutex<MmioTransport<Console>>,
    shared: &Arc<Shared>,
    mem: &GuestMemoryMmap,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent = 0u64;
    while !shared.started.load(Ordering::SeqCst) {
        if shared.done.load(Ordering::SeqCst) {
            return;
        }
        std::thread::park_timeout(std::time::Duration::from_millis(1));
    }
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let mut c = lock(console);
            let took = c.device.push_input(rest);
            c.poke(mem, |d, q, m| d.deliver_input(q, m));
            drop(c);
            rest = &rest[took..];
            if !rest.is_empty() {
                if shared.done.load(Ordering::SeqCst) {
                    return;
                }
                // The guest has not taken the last mebibyte yet.
                std::thread::park_timeout(std::time::Duration::from_millis(1));
            }
        }
        sent += n as u64;
    }
    Controller {
        shared: shared.clone(),
    }
    .send(HostMessage::StdinEof(sent));
}

/// What [`quiet_registers`] set up.
struct Quiet {
    registers: Option<Arc<MmapRegion>>,
    notifiers: Vec<Notifier>,
    queued: bool,
}

/// Keeps exits out of the register protocol where KVM can (see
/// `devices/virtio_mmio.rs`): every device window becomes a read-only page
/// the transport keeps current (`KVM_MEM_READONLY`: reads are memory,
/// writes still exit), the write-only registers that only store a value are
/// queued by KVM (coalesced MMIO), and each queue's notification goes to an
/// eventfd.
/// Each is skipped where KVM lacks it: the registers then exit as before.
fn quiet_registers(
    kvm: &kvm_ioctls::Kvm,
    vm: &VmFd,
    slots: &[Option<Arc<Mutex<dyn MmioSlot>>>],
    memslot: usize,
    pages: bool,
) -> Result<Quiet, VmmError> {
    let window = |slot: usize| layout::VIRTIO_MMIO_BASE + slot as u64 * layout::VIRTIO_MMIO_SIZE;
    let present = || {
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((i, d.as_ref()?)))
    };
    let mut registers = None;
    if pages && kvm.check_extension(Cap::ReadonlyMem) && !slots.is_empty() {
        let size = slots.len() * layout::VIRTIO_MMIO_SIZE as usize;
        let region =
            Arc::new(MmapRegion::new(size).map_err(|e| VmmError::Registers(e.to_string()))?);
        sys::map_readonly(vm, memslot as u32, layout::VIRTIO_MMIO_BASE, &region)
            .map_err(|e| VmmError::Create("KVM_SET_USER_MEMORY_REGION (registers)", e))?;
        for (i, dev) in present() {
            lock(dev).publish_to(RegisterPage::new(region.clone(), i));
        }
        registers = Some(region);
    }
    let queued = kvm.check_extension(Cap::CoalescedMmio);
    if queued {
        for (i, _) in present() {
            for (offset, len) in COALESCED {
                vm.register_coalesced_mmio(IoEventAddress::Mmio(window(i) + offset), len)
                    .map_err(|e| VmmError::Create("KVM_REGISTER_COALESCED_MMIO", e))?;
            }
        }
    }
    let mut notifiers = Vec::new();
    for (i, dev) in present() {
        let queues = lock(dev).queue_count();
        for q in 0..queues as u32 {
            if lock(dev).served_in_exit(q as usize) {
                continue; // the register write exits to the vCPU's thread
            }
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
            vm.register_ioevent(
                &fd,
                &IoEventAddress::Mmio(window(i) + QUEUE_NOTIFY_OFFSET),
                q,
            )
            .map_err(|e| VmmError::Create("KVM_IOEVENTFD", e))?;
            notifiers.push((dev.clone(), q, fd));
        }
    }
    Ok(Quiet {
        registers,
        notifiers,
        queued,
    })
}

/// The `virtio` thread: serves the queue notifications that reach the
/// eventfds, until the VM ends.
fn serve_notifications(notifiers: &[Notifier], stop: &EventFd, bus: &Bus, mem: &GuestMemoryMmap) {
    use std::os::fd::AsRawFd;
    let fds: Vec<i32> = notifiers
        .iter()
        .map(|(_, _, fd)| fd.as_raw_fd())
        .chain([stop.as_raw_fd()])
        .collect();
    let trace = std::env::var_os("HYPER_VMM_TRACE").is_some();
    loop {
        let ready = match sys::wait_readable(&fds) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if ready.last() == Some(&true) {
            return;
        }
        for ((dev, q, fd), _) in notifiers.iter().zip(&ready).filter(|(_, r)| **r) {
            if fd.read().is_ok() {
                if trace {
                    eprintln!(
                        "hyperboot: notification of queue {q} at {} us",
                        crate::since_spawn_us()
                    );
                }
                crate::stats::ExitCounters::add(&bus.exits.notifications);
                lock(dev).notify(*q, mem);
            }
        }
    }
}

/// Guest memory mapped private (copy-on-write) from a snapshot's memory
/// section: pages load as the guest touches them, and VMs restored from one
/// file share the ones they do not write.
fn restored_memory(
    file: &std::fs::File,
    offset: u64,
    mem_bytes: u64,
) -> Result<GuestMemoryMmap, VmmError> {
    use vm_memory::{FileOffset, GuestRegionMmap};
    let mut regions = Vec::new();
    let mut at = offset;
    for (addr, size) in layout::ram_regions(mem_bytes) {
        let file = file.try_clone().map_err(snapshot::SnapshotError::Io)?;
        let region = MmapRegion::build(
            Some(FileOffset::new(file, at)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| VmmError::Registers(format!("cannot map the snapshot's memory: {e}")))?;
        regions
            .push(GuestRegionMmap::new(region, addr).ok_or_else(|| {
                VmmError::Registers("a snapshot memory region is invalid".into())
            })?);
        at += size as u64;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| VmmError::Registers(format!("cannot map the snapshot's memory: {e}")))
}

/// Puts each device's saved state back; the snapshot's device set must be
/// this VM's.
fn restore_devices(
    slots: &[Option<Arc<Mutex<dyn MmioSlot>>>],
    control: &Mutex<Control>,
    state: &snapshot::State,
) -> Result<(), VmmError> {
    if state.devices.len() != slots.len() {
        return Err(VmmError::RestoreDevices(format!(
            "{} device slots saved, {} here",
            state.devices.len(),
            slots.len()
        )));
    }
    for (i, (slot, saved)) in slots.iter().zip(&state.devices).enumerate() {
        match (slot, saved) {
            (None, None) => {}
            (Some(dev), Some(v)) => lock(dev)
                .restore(v)
                .map_err(|e| VmmError::RestoreDevices(format!("slot {i}: {e}")))?,
            _ => {
                return Err(VmmError::RestoreDevices(format!(
                    "slot {i} is present in one and not the other"
                )))
            }
        }
    }
    lock(control).restore(&state.control);
    Ok(())
}

/// The `start` thread (contract 4): when hyperinit says `waiting` (or at
/// once, after a restore), takes the snapshot if one is planned, then sends
/// the start message.
struct Starter {
    vm: Arc<VmFd>,
    shared: Arc<Shared>,
    bus: Arc<Bus>,
    waiting: Option<std::sync::mpsc::Receiver<()>>,
    restored: bool,
    plan: Option<crate::SnapshotPlan>,
    start: Box<dyn FnOnce() -> Vec<u8> + Send>,
    cpus: usize,
    memory_mib: u64,
}

impl Starter {
    fn run(self) {
        let Starter {
            vm,
            shared,
            bus,
            waiting,
            restored,
            plan,
            start,
            cpus,
            memory_mib,
        } = self;
        if restored {
            // A notification may have been on its way at the snapshot.
            for dev in bus.slots.iter().flatten() {
                lock(dev).notify_all(&bus.mem);
            }
        } else {
            let Some(waiting) = waiting else {
                return;
            };
            loop {
                match waiting.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if shared.done.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            if let Some(plan) = plan {
                let result = take_snapshot(&vm, &shared, &bus, cpus, memory_mib, &plan);
                let stop = plan.stop_after;
                (plan.done)(result);
                if stop {
                    shared.finish(End::Host);
                    return;
                }
            }
        }
        let message = start();
        if let Some(console) = &shared.console {
            let mut c = lock(console);
            if c.device.push_control_bytes(&message) {
                c.poke(&bus.mem, |d, q, m| d.deliver_input(q, m));
            }
        }
        // The run has begun: requests held so far go after the start
        // message, and stdin may flow.
        shared.started.store(true, Ordering::SeqCst);
        let held = lock(&shared.control).open_gate();
        let controller = Controller { shared };
        for m in held {
            controller.send(m);
        }
    }
}

/// Parks every vCPU, saves the machine, its devices and its memory into the
/// plan's file, and lets the vCPUs go again.
fn take_snapshot(
    vm: &VmFd,
    shared: &Shared,
    bus: &Bus,
    cpus: usize,
    memory_mib: u64,
    plan: &crate::SnapshotPlan,
) -> Result<snapshot::Header, snapshot::SnapshotError> {
    if !shared.pause_all(cpus, true) {
        return Err(snapshot::SnapshotError::State("the VM ended first".into()));
    }
    let result = (|| {
        let machine = snapshot::capture_machine(vm)?;
        let vcpus = std::mem::take(&mut lock(&shared.pause.inner).states)
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    Err(snapshot::SnapshotError::State("a vCPU did not park".into()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Every device held still while its state and guest memory are read.
        let held: Vec<Option<std::sync::MutexGuard<'_, dyn MmioSlot>>> = bus
            .slots
            .iter()
            .map(|d| d.as_ref().map(|d| lock(d)))
            .collect();
        let devices = held.iter().map(|g| g.as_ref().map(|g| g.save())).collect();
        let control = lock(&shared.control).save();
        let state = snapshot::State {
            memory_mib,
            vcpus,
            machine,
            devices,
            control,
        };
        let header = snapshot::write(&plan.file, plan.key, &state, &bus.mem);
        drop(held);
        header
    })();
    shared.resume_all();
    result
}
