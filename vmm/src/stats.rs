//! What the VMM measures of a run, for `hyperboot --stats`: exits to the
//! VMM process by what caused them, interrupts raised by each device, and
//! the milestones of the machine's life (monotonic nanoseconds).

use std::sync::atomic::{AtomicU64, Ordering};

/// The virtio-mmio slots a VM can have (disk, console, net, 8 shares).
pub const SLOTS: usize = 11;

/// Exits counted as they happen, from any vCPU thread.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub com1: AtomicU64,
    pub com2: AtomicU64,
    pub exit_port: AtomicU64,
    pub other_io: AtomicU64,
    pub mmio: [AtomicU64; SLOTS],
    pub mmio_unmapped: AtomicU64,
    pub hlt: AtomicU64,
    pub other: AtomicU64,
    /// Not exits: register writes KVM queued and the VMM applied later,
    /// and queue notifications that reached an eventfd.
    pub queued_writes: AtomicU64,
    pub notifications: AtomicU64,
}

impl ExitCounters {
    pub fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A run's exits by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitCounts {
    pub total: u64,
    /// Port I/O: COM1 (the console), COM2 (the control channel), the exit
    /// port, anything else.
    pub com1: u64,
    pub com2: u64,
    pub exit_port: u64,
    pub other_io: u64,
    /// MMIO by device (slot name), and to no device.
    pub mmio: Vec<(String, u64)>,
    pub mmio_unmapped: u64,
    pub hlt: u64,
    pub other: u64,
    /// Not exits: writes KVM queued without one, notifications through
    /// eventfds.
    pub queued_writes: u64,
    pub notifications: u64,
}

/// Monotonic nanoseconds of a run's milestones (0: did not happen).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    pub vm_created: u64,
    pub memory_ready: u64,
    pub kernel_ready: u64,
    pub first_run: u64,
    pub first_exit: u64,
    pub first_output: u64,
    /// hyperinit's `timings` line reached the host (contract 2).
    pub timings: u64,
    pub ended: u64,
}

/// What `Running::wait` reports beyond how the VM ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStats {
    pub timeline: Timeline,
    pub exits: ExitCounts,
    /// Interrupts each device raised (`serial` for both UARTs).
    pub interrupts: Vec<(String, u64)>,
    /// The guest memory mapping (start address, length), to tell guest
    /// pages from the VMM's own in the process's memory.
    pub guest_memory: (usize, usize),
}

/// Sets `at` to now unless it is set already.
pub fn mark_once(at: &AtomicU64) {
    let _ = at.compare_exchange(
        0,
        crate::sys::monotonic_ns(),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
}
