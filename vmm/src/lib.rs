//! hyper's own virtual machine monitor, on the rust-vmm crates: KVM, vCPUs,
//! guest memory, the PVH boot, the port-I/O devices and virtio-mmio devices
//! (block, console, net, 9p with its own server).
//!
//! It knows no command line, no QEMU and no network policy: its owner (the
//! runner) hands it a validated [`VmConfig`], [`Vm::create`] builds the
//! machine, [`Vm::start`] runs it — a thread per vCPU and per device helper,
//! each named and under its own seccomp filter ([`seccomp::Profile`]) —
//! and the owner talks to it through a [`Controller`]: control messages to
//! hyperinit ([`hyper_contract::HostMessage`]) and the order to end. The
//! guest ends the VM itself through the exit port, a reset or a fault;
//! [`Running::wait`] then returns the [`Outcome`].
//!
//! Exits are handled on the vCPU thread that took them, against devices
//! behind mutexes ([`bus`]); no event loop.

pub mod bus;
pub mod control;
pub mod devices;
pub mod kvm;
pub mod layout;
pub mod loader;
pub mod p9;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
pub mod sys;
pub mod vcpu;
mod vm;

pub use vm::{Controller, Running, Vm};

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Mutex;

/// A VM to run.
pub struct VmConfig {
    pub kernel: loader::SectionReader,
    pub initrd: loader::Initrd,
    /// Served read-only as /dev/vda: (file, offset, length).
    pub rootfs: Option<(File, u64, u64)>,
    /// The command line before the VMM's device announcements.
    pub cmdline: String,
    pub memory_mib: u64,
    /// vCPUs (1 to 64); the first boots, the others wait for the guest's
    /// INIT/SIPI.
    pub cpus: u8,
    /// Where the COM1 console's bytes go.
    pub console: Box<dyn Write + Send>,
    /// Named virtio-console output ports (`hyper.stdout`, `hyper.stderr`)
    /// and where their bytes go; none: no console device.
    pub streams: Vec<(&'static str, Box<dyn Write + Send>)>,
    /// The app's stdin: fed to the guest on a `hyper.stdin` port (needs
    /// `streams`), its end announced as `stdin-eof N`.
    pub stdin: Option<Box<dyn Read + Send>>,
    /// A virtio-net device (the guest's MAC) on a tap or passt backend.
    pub net: Option<([u8; 6], devices::virtio_net::Backend)>,
    /// `-v`: host directories as virtio-9p devices, by mount tag (at most
    /// [`MAX_SHARES`]).
    pub shares: Vec<(String, p9::Server)>,
    /// Whether every thread runs under its seccomp filter (tests of the
    /// filters themselves turn it off).
    pub seccomp: bool,
    /// Offer the control channel on a virtio-console port
    /// (`hyper.control`, contract 3) besides COM2.
    pub control_port: bool,
    /// Let the guest read device registers from read-only pages instead of
    /// exiting (see `devices/virtio_mmio.rs`); off where KVM cannot emulate
    /// the guest's writes to them (nested PVM).
    pub register_pages: bool,
    /// Called once, from the thread that ends the VM, when it ends.
    pub on_end: Option<Box<dyn Fn() + Send + Sync>>,
    /// Contract 4: hyperinit waits at the snapshot point for its start
    /// message; this builds it (when it is sent, so its clock is current).
    pub start: Option<Box<dyn FnOnce() -> Vec<u8> + Send>>,
    /// Take a snapshot at the snapshot point, before the start message.
    pub snapshot: Option<SnapshotPlan>,
    /// Boot from this snapshot instead of the kernel: opened, its key
    /// checked, and its digest verified (or known) by the owner. The guest
    /// is at the snapshot point: `start` is sent at once.
    pub restore: Option<(File, snapshot::Header, snapshot::State)>,
}

/// Where and how a snapshot is taken.
pub struct SnapshotPlan {
    /// What it is of (see [`snapshot`]).
    pub key: [u8; 32],
    /// An empty file to write it into, opened before any seccomp filter.
    pub file: File,
    /// Called with the outcome, from the snapshot thread (under its
    /// filter: file calls only): puts the file in place, or removes it.
    pub done: Box<dyn FnOnce(Result<snapshot::Header, snapshot::SnapshotError>) + Send>,
    /// End the VM once the snapshot is made (`hyperboot prepare`) instead
    /// of sending the start message.
    pub stop_after: bool,
}

impl std::fmt::Debug for SnapshotPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotPlan").finish()
    }
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("cmdline", &self.cmdline)
            .field("memory_mib", &self.memory_mib)
            .field("cpus", &self.cpus)
            .finish()
    }
}

/// Host directories one VM can share (each takes an interrupt line).
pub const MAX_SHARES: usize = 8;

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The guest wrote this byte to the exit port.
    ExitPort(u8),
    /// The guest reset the machine (i8042, triple fault, KVM system event).
    Reset,
    /// The owner ended it ([`Controller::end`]).
    Host,
    /// The guest did something the VMM cannot continue from.
    Guest(GuestFault),
}

/// A guest the VMM cannot run any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestFault {
    #[error("the guest halted with interrupts off")]
    Halted,
    #[error("KVM could not enter the guest (hardware reason {0:#x})")]
    FailEntry(u64),
    #[error("KVM internal error: the guest ran something KVM cannot emulate")]
    Internal,
    #[error("the guest raised an unhandled exception")]
    Exception,
    #[error("unexpected VM exit {0}")]
    Unexpected(String),
    #[error("KVM_RUN failed on vCPU {vcpu} (errno {errno})")]
    Run { vcpu: usize, errno: i32 },
}

/// Per `-v` share: requests answered, malformed chains refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShareStats {
    pub served: u64,
    pub refused: u64,
}

/// The network card: whether the guest's driver set it up, and its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetStats {
    pub ready: bool,
    pub sent: u64,
    pub received: u64,
    /// Frames refused (malformed chains, no room) or lost (backlog full,
    /// backend gone).
    pub dropped: u64,
}

/// How the VM ended.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    /// What the guest wrote on the control channel (at most 512 bytes).
    pub status: Vec<u8>,
    /// Exits to the VMM process.
    pub exits: u64,
    /// Monotonic nanoseconds when the first KVM_RUN was entered.
    pub first_run_ns: u64,
    /// Console ports the guest's driver made ready.
    pub console_ports: u32,
    /// Whether the run had begun (contract 4: the start message was sent).
    pub started: bool,
    /// Bytes for hyperinit on the control port (the start message,
    /// requests) it had not taken when the VM ended.
    pub control_waiting: usize,
    /// The network card, when there is one.
    pub net: Option<NetStats>,
    pub shares: Vec<ShareStats>,
    pub stats: stats::VmStats,
}

/// Why the VM could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error("cannot create the VM: {0} failed")]
    Create(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    MpTable(#[from] layout::MpTableError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("cannot start the VM's threads")]
    Spawn(#[from] sys::SpawnError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot install the VMM's signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot map the devices' register pages: {0}")]
    Registers(String),
    #[error("cannot restore the snapshot")]
    Restore(#[from] snapshot::SnapshotError),
    #[error("the snapshot's devices do not match this VM's: {0}")]
    RestoreDevices(String),
    #[error("more than {MAX_SHARES} shared directories")]
    TooManyShares,
}

/// Prints how long after `HYPER_SPAWN_NS` a startup phase ended (HYPER_VMM_TRACE).
pub fn phase(name: &str) {
    if std::env::var_os("HYPER_VMM_TRACE").is_some() {
        eprintln!("hyperboot: phase {name}: {} us", since_spawn_us());
    }
}

/// Microseconds since `HYPER_SPAWN_NS` (since the clock's origin without
/// it): the time base of HYPER_VMM_TRACE's lines.
pub(crate) fn since_spawn_us() -> u64 {
    let spawn = std::env::var("HYPER_SPAWN_NS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    sys::monotonic_ns().saturating_sub(spawn) / 1000
}

pub use sys::monotonic_ns;

/// Locks a device shared between threads (a panicked holder leaves it usable).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
