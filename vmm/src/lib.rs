//! hyperboot's own virtual machine monitor, on the rust-vmm crates.
//!
//! [`run`] turns a validated [`VmConfig`] into a running VM and drives its
//! boot vCPU on the calling thread (the others on a thread each) until the
//! guest stops: exits are handled inline on the vCPU's thread (port I/O for
//! the console, status and exit ports; MMIO for virtio-blk and the
//! virtio-console), a seccomp filter is in place on every thread before its
//! first guest instruction, and signals or `--timeout` interrupt `KVM_RUN`.

pub mod devices;
pub mod kvm;
pub mod layout;
pub mod loader;
pub mod p9;
pub mod seccomp;
pub mod sys;
pub mod vcpu;

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VcpuExit;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use devices::pio::{PioBus, StopRequest};
use devices::virtio_blk::Block;
use devices::virtio_console::Console;
use devices::virtio_mmio::MmioTransport;
use loader::SectionReader;

/// A VM to run.
pub struct VmConfig {
    pub kernel: SectionReader,
    pub initrd: Vec<u8>,
    /// Served read-only as /dev/vda: (file, offset, length).
    pub rootfs: Option<(File, u64, u64)>,
    /// The command line before the runner's device announcements.
    pub cmdline: String,
    pub memory_mib: u64,
    /// vCPUs (1 to 64); the first boots, the others wait for the guest's
    /// INIT/SIPI and run on their own threads.
    pub cpus: u8,
    pub timeout: Option<Duration>,
    pub console: Box<dyn Write + Send>,
    /// Named virtio-console output ports (`hyper.stdout`, `hyper.stderr`)
    /// and where their bytes go; none: no console device.
    pub streams: Vec<(&'static str, Box<dyn Write + Send>)>,
    /// `-i`: hyperboot's stdin goes to the guest on a `hyper.stdin` port
    /// (needs `streams`), and its end is announced as `stdin-eof N`.
    pub stdin: bool,
    /// A virtio-net device (the guest's MAC) on a tap or passt backend.
    pub net: Option<([u8; 6], devices::virtio_net::Backend)>,
    /// `-v`: host directories as virtio-9p devices, by mount tag (at most
    /// [`MAX_SHARES`]).
    pub shares: Vec<(String, p9::Server)>,
    /// `-t`: the host terminal's size, sent as `winsize R C` on SIGWINCH.
    pub winsize: Option<fn() -> Option<[u16; 2]>>,
    pub seccomp: bool,
    /// Delivered to the app (through hyperinit) when hyperboot is asked to stop.
    pub stop_signal: i32,
    /// How long the app gets to exit after the stop signal before SIGKILL.
    pub stop_timeout: Duration,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("cmdline", &self.cmdline)
            .field("memory_mib", &self.memory_mib)
            .finish()
    }
}

/// Host directories one VM can share (each takes an interrupt line).
pub const MAX_SHARES: usize = 8;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The guest wrote this byte to the exit port.
    ExitPort(u8),
    /// The guest reset the machine (i8042, triple fault, KVM system event).
    Reset,
    /// A signal to hyperboot (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
    Timeout,
    /// The guest did something the VMM cannot continue from.
    GuestError(String),
}

/// How the VM ended.
#[derive(Debug)]
pub struct Outcome {
    pub stop: Stop,
    /// What the guest wrote on the status channel.
    pub status: Vec<u8>,
    /// Exits to the VMM process.
    pub exits: u64,
    /// Monotonic nanoseconds when the first KVM_RUN was entered.
    pub first_run_ns: u64,
    /// Console ports the guest's driver made ready.
    pub console_ports: u32,
    /// Whether the guest's driver set the network card up (when there is one).
    pub net_ready: Option<bool>,
    /// Per `-v` share: requests answered, malformed chains refused.
    pub shares: Vec<(u64, u64)>,
}

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error("cannot create the VM: {0}")]
    Create(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    MpTable(#[from] layout::MpTableError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("more than {MAX_SHARES} shared directories")]
    TooManyShares,
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

/// Prints how long after `HYPER_SPAWN_NS` a startup phase ended (HYPER_VMM_TRACE).
pub fn phase(name: &str) {
    if std::env::var_os("HYPER_VMM_TRACE").is_some() {
        let spawn = std::env::var("HYPER_SPAWN_NS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        eprintln!(
            "hyperboot: phase {name}: {} us",
            monotonic_ns().saturating_sub(spawn) / 1000
        );
    }
}

pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Creates the VM and runs it to the end.
pub fn run(mut cfg: VmConfig) -> Result<Outcome, VmmError> {
    // Guest memory against the host's: checked once, by the caller (`boot`).
    phase("vmm start");
    let kvm = kvm::open()?;
    phase("kvm open");
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

    phase("vm created");
    let mem_bytes = cfg.memory_mib << 20;
    let mem = GuestMemoryMmap::<()>::from_ranges(&layout::ram_regions(mem_bytes))
        .map_err(|e| VmmError::Memory(cfg.memory_mib, e))?;
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

    phase("memory mapped");
    if cfg.shares.len() > MAX_SHARES {
        return Err(VmmError::TooManyShares);
    }
    // The virtio-mmio devices, each in a fixed slot: a 4 KiB window from
    // VIRTIO_MMIO_BASE and the interrupt line VIRTIO_IRQ_BASE + slot.
    let slot_irq = |slot: usize| -> Result<EventFd, VmmError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&irq, layout::VIRTIO_IRQ_BASE + slot as u32)
            .map_err(|e| VmmError::Create("KVM_IRQFD", e))?;
        Ok(irq)
    };
    let blk = match cfg.rootfs.take() {
        Some((file, offset, len)) => Some(Arc::new(Mutex::new(MmioTransport::new(
            Block::new(file, offset, len),
            slot_irq(0)?,
        )))),
        None => None,
    };
    let streams = if cfg.streams.is_empty() {
        None
    } else {
        let input = cfg.stdin.then_some("hyper.stdin");
        Some(Arc::new(Mutex::new(MmioTransport::new(
            Console::new(std::mem::take(&mut cfg.streams), input),
            slot_irq(1)?,
        ))))
    };
    let mut net_rx = None;
    let net = match cfg.net.take() {
        Some((mac, backend)) => {
            net_rx = Some(backend.try_clone().map_err(VmmError::EventFd)?);
            Some(Arc::new(Mutex::new(MmioTransport::new(
                devices::virtio_net::Net::new(mac, backend),
                slot_irq(2)?,
            ))))
        }
        None => None,
    };
    let mut shares = Vec::with_capacity(cfg.shares.len());
    for (i, (tag, server)) in std::mem::take(&mut cfg.shares).into_iter().enumerate() {
        shares.push(Arc::new(Mutex::new(MmioTransport::new(
            devices::virtio_9p::Share::new(&tag, server),
            slot_irq(SHARE_SLOT + i)?,
        ))));
    }
    let mut slots: Vec<Option<Arc<Mutex<dyn MmioSlot>>>> = vec![
        blk.map(|b| b as Arc<Mutex<dyn MmioSlot>>),
        streams.clone().map(|c| c as Arc<Mutex<dyn MmioSlot>>),
        net.clone().map(|n| n as Arc<Mutex<dyn MmioSlot>>),
    ];
    slots.extend(
        shares
            .iter()
            .map(|s| Some(s.clone() as Arc<Mutex<dyn MmioSlot>>)),
    );
    // The kernel learns of each from the command line.
    let mut cmdline = cfg.cmdline.clone();
    for (slot, _) in slots.iter().enumerate().filter(|(_, d)| d.is_some()) {
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            layout::VIRTIO_MMIO_BASE + slot as u64 * layout::VIRTIO_MMIO_SIZE,
            layout::VIRTIO_IRQ_BASE + slot as u32
        ));
    }
    let loaded = loader::load(&mem, mem_bytes, &mut cfg.kernel, &cfg.initrd, &cmdline)?;
    let cpus = cfg.cpus.clamp(1, 64);
    layout::write_mptable(&mem, cpus)?;

    phase("guest loaded");
    let console_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&console_irq, layout::SERIAL_IRQ)
        .map_err(|e| VmmError::Create("KVM_IRQFD", e))?;
    let control_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&control_irq, layout::CONTROL_IRQ)
        .map_err(|e| VmmError::Create("KVM_IRQFD", e))?;
    let pio = Arc::new(Mutex::new(PioBus::new(
        console_irq,
        control_irq,
        cfg.console,
    )));
    let bus = Arc::new(Bus {
        pio: pio.clone(),
        slots,
        mem: mem.clone(),
    });

    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for id in 0..cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::Create("KVM_CREATE_VCPU", e))?;
        vcpu::setup_cpuid(&kvm, &vcpu, id, cpus)?;
        vcpu::setup_msrs(&vcpu)?;
        if id == 0 {
            vcpu::setup_pvh_regs(&vcpu, &mem, loaded.entry)?;
        }
        vcpu::setup_lapic(&vcpu)?;
        vcpus.push(vcpu);
    }
    let mut vcpu = vcpus.remove(0);

    phase("vcpu ready");
    sys::install_handlers(cfg.timeout);
    // Helper threads start after the handlers (a seccomp violation in them is
    // reported, not a silent kill) and install the same filter themselves.
    if let (true, Some(console)) = (cfg.stdin, &streams) {
        feed_stdin(console.clone(), pio.clone(), mem.clone(), cfg.seccomp);
    }
    if let Some(size) = cfg.winsize {
        forward_winsize(pio.clone(), size);
    }
    if let (Some(backend), Some(net)) = (net_rx, &net) {
        devices::virtio_net::rx_thread(backend, net.clone(), mem.clone(), cfg.seccomp);
    }
    for share in &shares {
        devices::virtio_9p::serve_thread(share.clone(), mem.clone(), cfg.seccomp)?;
    }
    // The other vCPUs: a thread each, under the same filter, stopping the
    // VM through `shared` when their guest code asks to.
    let shared = Arc::new(Shared::new());
    let aps: Vec<_> = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let (bus, shared) = (bus.clone(), shared.clone());
            let filtered = cfg.seccomp;
            std::thread::spawn(move || run_ap(v, i + 1, &bus, &shared, filtered))
        })
        .collect();
    if cfg.seccomp {
        seccomp::install()?;
    }
    let mut exits = 0u64;
    let trace = std::env::var_os("HYPER_VMM_TRACE").is_some();
    let first_run_ns = monotonic_ns();
    // Asked to stop: the stop signal goes to the app, SIGKILL after the
    // stop timeout, and the VM is ended 2 s after that if it still runs.
    let mut stopping: Option<(std::time::Instant, bool)> = None;
    let stop = loop {
        if let Some(stop) = shared.take_stop() {
            break stop;
        }
        if let Some(sig) = sys::stop_signal() {
            let now = std::time::Instant::now();
            match stopping {
                _ if sig == libc::SIGALRM => break Stop::Timeout,
                _ if cfg.stop_timeout.is_zero() => break Stop::Signal(sig),
                None => {
                    lock(&pio).send_control(format!("signal {}\n", cfg.stop_signal).as_bytes());
                    stopping = Some((now + cfg.stop_timeout, false));
                }
                Some((deadline, false)) if now >= deadline => {
                    lock(&pio).send_control(b"signal 9\n");
                    stopping = Some((now + Duration::from_secs(2), true));
                }
                Some((deadline, true)) if now >= deadline => break Stop::Signal(sig),
                Some(_) => {}
            }
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                sys::disarm();
                return Err(VmmError::Run(e));
            }
        };
        exits += 1;
        if trace {
            eprintln!("hyperboot: exit {exits}: {exit:?}");
        }
        if let Some(stop) = bus.handle(exit) {
            break stop;
        }
    };
    sys::disarm();
    shared.end(&aps);
    let mut pio = lock(&pio);
    pio.flush();
    Ok(Outcome {
        stop,
        status: pio.status(),
        exits: exits + shared.exits.load(Ordering::SeqCst),
        first_run_ns,
        console_ports: streams.as_ref().map_or(0, |c| lock(c).device.ready_ports),
        net_ready: net.as_ref().map(|n| lock(n).driver_ok()),
        shares: shares
            .iter()
            .map(|s| {
                let s = lock(s);
                (s.device.served, s.device.refused)
            })
            .collect(),
    })
}

/// The first virtio-mmio slot of the `-v` shares (after the disk, the
/// console and the network card).
const SHARE_SLOT: usize = 3;

/// A virtio-mmio device as the bus sees it: register reads and writes.
trait MmioSlot: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap);
}

impl<D: devices::virtio_mmio::VirtioDevice + Send> MmioSlot for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        MmioTransport::write(self, offset, data, mem)
    }
}

/// The devices every vCPU reaches: port I/O and the virtio-mmio slots.
struct Bus {
    pio: Arc<Mutex<PioBus>>,
    /// One 4 KiB window each from VIRTIO_MMIO_BASE; None: nothing there.
    slots: Vec<Option<Arc<Mutex<dyn MmioSlot>>>>,
    mem: GuestMemoryMmap,
}

impl Bus {
    /// Serves one exit; returns why the VM must stop, if it must.
    /// The device whose window holds `addr`, and the offset in it.
    fn slot(&self, addr: u64) -> Option<(&Mutex<dyn MmioSlot>, u64)> {
        let rel = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let index = usize::try_from(rel / layout::VIRTIO_MMIO_SIZE).ok()?;
        let dev = self.slots.get(index)?.as_ref()?;
        Some((dev, rel % layout::VIRTIO_MMIO_SIZE))
    }

    fn handle(&self, exit: VcpuExit) -> Option<Stop> {
        match exit {
            VcpuExit::IoOut(port, data) => match lock(&self.pio).write(port, data) {
                Some(StopRequest::ExitPort(v)) => return Some(Stop::ExitPort(v)),
                Some(StopRequest::Reset) => return Some(Stop::Reset),
                None => {}
            },
            VcpuExit::IoIn(port, data) => lock(&self.pio).read(port, data),
            VcpuExit::MmioRead(addr, data) => match self.slot(addr) {
                Some((dev, offset)) => lock(dev).read(offset, data),
                None => data.fill(0),
            },
            VcpuExit::MmioWrite(addr, data) => {
                if let Some((dev, offset)) = self.slot(addr) {
                    lock(dev).write(offset, data, &self.mem);
                }
            }
            VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => return Some(Stop::Reset),
            VcpuExit::Hlt => {
                return Some(Stop::GuestError(
                    "the guest halted with interrupts off".into(),
                ))
            }
            VcpuExit::FailEntry(reason, _) => {
                return Some(Stop::GuestError(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x})"
                )))
            }
            VcpuExit::InternalError => {
                return Some(Stop::GuestError(
                    "KVM internal error: the guest ran something KVM cannot emulate".into(),
                ))
            }
            VcpuExit::Exception => {
                return Some(Stop::GuestError(
                    "the guest raised an unhandled exception".into(),
                ))
            }
            other => return Some(Stop::GuestError(format!("unexpected VM exit {other:?}"))),
        }
        None
    }
}

/// What the vCPU threads share with the boot vCPU's loop.
struct Shared {
    /// A stop an AP's guest code asked for, for the boot vCPU's loop.
    stop: Mutex<Option<Stop>>,
    /// Set when the VM is over: the AP threads leave.
    done: AtomicBool,
    /// AP threads that have left.
    left: AtomicUsize,
    exits: AtomicU64,
    main: libc::pthread_t,
}

impl Shared {
    fn new() -> Self {
        Self {
            stop: Mutex::new(None),
            done: AtomicBool::new(false),
            left: AtomicUsize::new(0),
            exits: AtomicU64::new(0),
            main: sys::this_thread(),
        }
    }

    fn take_stop(&self) -> Option<Stop> {
        lock(&self.stop).take()
    }

    /// An AP asks the VM to stop: the boot vCPU is kicked out of KVM_RUN
    /// until its loop has taken the request (a kick can land just before it
    /// enters the guest).
    fn request_stop(&self, stop: Stop) {
        lock(&self.stop).get_or_insert(stop);
        while !self.done.load(Ordering::SeqCst) && lock(&self.stop).is_some() {
            sys::kick(self.main);
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }

    /// The VM is over: every AP thread is kicked until it has left its loop
    /// (bounded: a thread that does not leave is ended with the process).
    fn end(&self, aps: &[std::thread::JoinHandle<()>]) {
        use std::os::unix::thread::JoinHandleExt;
        self.done.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while self.left.load(Ordering::SeqCst) < aps.len() && std::time::Instant::now() < deadline {
            for h in aps {
                // Not joined yet, so the handle still names the thread.
                sys::kick(h.as_pthread_t());
            }
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }
}

/// An application processor's loop: it waits in KVM for the guest's
/// INIT/SIPI, then runs; exits are served on the shared bus.
fn run_ap(mut vcpu: kvm_ioctls::VcpuFd, id: usize, bus: &Bus, shared: &Shared, filtered: bool) {
    // Process signals (stop, timeout) go to the boot vCPU's thread.
    sys::block_stop_signals();
    if filtered && seccomp::install().is_err() {
        shared.request_stop(Stop::GuestError(format!(
            "vCPU {id}: cannot install the seccomp filter"
        )));
        shared.left.fetch_add(1, Ordering::SeqCst);
        return;
    }
    while !shared.done.load(Ordering::SeqCst) {
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                shared.request_stop(Stop::GuestError(format!(
                    "KVM_RUN failed on vCPU {id}: {e}"
                )));
                break;
            }
            Ok(exit) => {
                shared.exits.fetch_add(1, Ordering::Relaxed);
                if let Some(stop) = bus.handle(exit) {
                    shared.request_stop(stop);
                    break;
                }
            }
        }
    }
    shared.left.fetch_add(1, Ordering::SeqCst);
}

/// Locks a device shared with a helper thread (a panicked holder leaves it usable).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `-i`: a thread copies hyperboot's stdin into the console's input port
/// (waiting while the guest has not taken a mebibyte already), then tells
/// hyperinit where it ended. It runs under the same seccomp filter.
fn feed_stdin(
    console: Arc<Mutex<MmioTransport<Console>>>,
    pio: Arc<Mutex<PioBus>>,
    mem: GuestMemoryMmap,
    filtered: bool,
) {
    std::thread::spawn(move || {
        if filtered && seccomp::install().is_err() {
            return;
        }
        use std::io::Read;
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0u64;
        let mut stdin = std::io::stdin().lock();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let mut c = lock(&console);
                let took = c.device.push_input(rest);
                c.poke(&mem, |d, q, m| d.deliver_input(q, m));
                drop(c);
                rest = &rest[took..];
                if !rest.is_empty() {
                    // The guest has not taken the last mebibyte yet (a futex
                    // wait: sleeping system calls are not in the filter).
                    std::thread::park_timeout(Duration::from_millis(1));
                }
            }
            sent += n as u64;
        }
        lock(&pio).send_control(format!("stdin-eof {sent}\n").as_bytes());
    });
}

/// `-t`: the host terminal's new size goes to hyperinit on every SIGWINCH.
fn forward_winsize(pio: Arc<Mutex<PioBus>>, size: fn() -> Option<[u16; 2]>) {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([libc::SIGWINCH]) else {
        return;
    };
    std::thread::spawn(move || {
        for _ in signals.forever() {
            if let Some([r, c]) = size() {
                lock(&pio).send_control(format!("winsize {r} {c}\n").as_bytes());
            }
        }
    });
}
