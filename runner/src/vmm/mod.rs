//! hyperboot's own virtual machine monitor, on the rust-vmm crates.
//!
//! [`run`] turns a validated [`VmConfig`] into a running VM and drives its one
//! vCPU on the calling thread until the guest stops: exits are handled inline
//! (port I/O for the console, status and exit ports; MMIO for virtio-blk), a
//! seccomp filter is in place before the first guest instruction, and signals
//! or `--timeout` interrupt `KVM_RUN`.

pub mod devices;
pub mod kvm;
pub mod layout;
pub mod loader;
pub mod seccomp;
pub mod sys;
pub mod vcpu;

use std::fs::File;
use std::io::Write;
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
    pub timeout: Option<Duration>,
    pub console: Box<dyn Write + Send>,
    /// Named virtio-console output ports (`hyper.stdout`, `hyper.stderr`)
    /// and where their bytes go; none: no console device.
    pub streams: Vec<(&'static str, Box<dyn Write + Send>)>,
    /// `-i`: hyperboot's stdin goes to the guest on a `hyper.stdin` port
    /// (needs `streams`), and its end is announced as `stdin-eof N`.
    pub stdin: bool,
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
    let mut cmdline = cfg.cmdline.clone();
    if cfg.rootfs.is_some() {
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            layout::VIRTIO_MMIO_BASE,
            layout::VIRTIO_IRQ_BASE
        ));
    }
    let console_base = layout::VIRTIO_MMIO_BASE + layout::VIRTIO_MMIO_SIZE;
    if !cfg.streams.is_empty() {
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{console_base:#x}:{}",
            layout::VIRTIO_IRQ_BASE + 1
        ));
    }
    let loaded = loader::load(&mem, mem_bytes, &mut cfg.kernel, &cfg.initrd, &cmdline)?;
    layout::write_mptable(&mem, 1)?;

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
    let mut blk = match cfg.rootfs.take() {
        Some((file, offset, len)) => {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
            vm.register_irqfd(&irq, layout::VIRTIO_IRQ_BASE)
                .map_err(|e| VmmError::Create("KVM_IRQFD", e))?;
            Some(MmioTransport::new(Block::new(file, offset, len), irq))
        }
        None => None,
    };
    let streams = if cfg.streams.is_empty() {
        None
    } else {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&irq, layout::VIRTIO_IRQ_BASE + 1)
            .map_err(|e| VmmError::Create("KVM_IRQFD", e))?;
        let input = cfg.stdin.then_some("hyper.stdin");
        Some(Arc::new(Mutex::new(MmioTransport::new(
            Console::new(std::mem::take(&mut cfg.streams), input),
            irq,
        ))))
    };

    let console_range = console_base..console_base + layout::VIRTIO_MMIO_SIZE;

    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| VmmError::Create("KVM_CREATE_VCPU", e))?;
    vcpu::setup_cpuid(&kvm, &vcpu, 0, 1)?;
    vcpu::setup_msrs(&vcpu)?;
    vcpu::setup_pvh_regs(&vcpu, &mem, loaded.entry)?;
    vcpu::setup_lapic(&vcpu)?;

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
    if cfg.seccomp {
        seccomp::install()?;
    }
    let blk_range = layout::VIRTIO_MMIO_BASE..layout::VIRTIO_MMIO_BASE + layout::VIRTIO_MMIO_SIZE;
    let mut exits = 0u64;
    let trace = std::env::var_os("HYPER_VMM_TRACE").is_some();
    let first_run_ns = monotonic_ns();
    // Asked to stop: the stop signal goes to the app, SIGKILL after the
    // stop timeout, and the VM is ended 2 s after that if it still runs.
    let mut stopping: Option<(std::time::Instant, bool)> = None;
    let stop = loop {
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
        match exit {
            VcpuExit::IoOut(port, data) => match lock(&pio).write(port, data) {
                Some(StopRequest::ExitPort(v)) => break Stop::ExitPort(v),
                Some(StopRequest::Reset) => break Stop::Reset,
                None => {}
            },
            VcpuExit::IoIn(port, data) => lock(&pio).read(port, data),
            VcpuExit::MmioRead(addr, data) => match (blk.as_mut(), &streams) {
                (Some(b), _) if blk_range.contains(&addr) => {
                    b.read(addr - layout::VIRTIO_MMIO_BASE, data)
                }
                (_, Some(c)) if console_range.contains(&addr) => {
                    lock(c).read(addr - console_base, data)
                }
                _ => data.fill(0),
            },
            VcpuExit::MmioWrite(addr, data) => {
                if let Some(b) = blk.as_mut().filter(|_| blk_range.contains(&addr)) {
                    b.write(addr - layout::VIRTIO_MMIO_BASE, data, &mem);
                } else if let Some(c) = streams.as_ref().filter(|_| console_range.contains(&addr)) {
                    lock(c).write(addr - console_base, data, &mem);
                }
            }
            VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => break Stop::Reset,
            VcpuExit::Hlt => break Stop::GuestError("the guest halted with interrupts off".into()),
            VcpuExit::FailEntry(reason, _) => {
                break Stop::GuestError(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x})"
                ))
            }
            VcpuExit::InternalError => {
                break Stop::GuestError(
                    "KVM internal error: the guest ran something KVM cannot emulate".into(),
                )
            }
            VcpuExit::Exception => {
                break Stop::GuestError("the guest raised an unhandled exception".into())
            }
            other => break Stop::GuestError(format!("unexpected VM exit {other:?}")),
        }
    };
    sys::disarm();
    let mut pio = lock(&pio);
    pio.flush();
    Ok(Outcome {
        stop,
        status: pio.status(),
        exits,
        first_run_ns,
    })
}

/// Locks a device shared with a helper thread (a panicked holder leaves it usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
