//! Thread and signal plumbing of the VMM, and the only `unsafe` of the VMM
//! besides mapping guest memory into KVM and the vCPU's `kvm_run` page:
//!
//! - [`spawn`]: a named thread of a running VM, with the host's signals
//!   blocked (they belong to hyperboot's supervisor) and its seccomp
//!   [`Profile`] installed before it runs anything else;
//! - the kick: one vCPU thread interrupts another's `KVM_RUN` with a
//!   real-time signal whose handler sets the target's `immediate_exit`, so a
//!   kick that lands just before the thread enters the guest is not lost;
//! - the report of a seccomp violation (SIGSYS): the call's number on
//!   stderr, then exit 125.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::seccomp::{Profile, SeccompError};

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal one thread sends a vCPU thread to interrupt `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn on_kick(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's vCPU's kvm_run page, set by
            // `enter_vcpu` and valid while the vCPU lives (the thread clears
            // it before the vCPU is dropped). KVM reads immediate_exit when
            // KVM_RUN starts; a volatile byte store is all a handler does.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills `_sigsys`; the system call number
    // is the int at offset 24 of siginfo_t on x86-64.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut msg = *b"hyperboot: seccomp blocked system call 000; this is a bug in hyperboot\n";
    let digits = [(nr / 100 % 10) as u8, (nr / 10 % 10) as u8, (nr % 10) as u8];
    msg[39..42].copy_from_slice(&digits.map(|d| b'0' + d));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is valid.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(125);
    }
}

/// Installs the kick and SIGSYS handlers, once per process; and has rustix
/// read the auxiliary vector (for the vDSO's clock) now, while a system call
/// to do so is still allowed.
pub fn install_handlers() -> std::io::Result<()> {
    let _ = monotonic_ns();
    let _ = rustix::param::page_size();
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .and_then(|()| register_signal_handler(libc::SIGSYS, on_sigsys))
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Blocks every signal the host may send hyperboot (they are its
/// supervisor's to take) in the calling thread; the kick, SIGSYS and the
/// faults stay deliverable.
fn block_host_signals() {
    // SAFETY: a sigset built with the libc calls, for this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for keep in [
            kick_signal(),
            libc::SIGSYS,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGABRT,
        ] {
            libc::sigdelset(&mut set, keep);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Each VM thread's stack: their deepest path is a 9p request or a
/// virtio chain, far below this.
const STACK_SIZE: usize = 512 * 1024;

/// Starts a named thread of the VM: host signals blocked, then the seccomp
/// filter of `profile` (when `filtered`), then `body`. Returns once the
/// filter is in place (or could not be), so a failure is the caller's error.
pub fn spawn<T: Send + 'static>(
    name: String,
    profile: Profile,
    filtered: bool,
    body: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, SpawnError> {
    let program = if filtered {
        Some(profile.program()?)
    } else {
        None
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.clone())
        // Small, so that no stack is ever backed by a 2 MiB huge page.
        .stack_size(STACK_SIZE)
        .spawn(move || {
            block_host_signals();
            if let Some(p) = &program {
                if let Err(e) = crate::seccomp::install_program(p) {
                    let _ = ready_tx.send(Err(e));
                    // The caller fails the VM; this thread never runs guest work.
                    loop {
                        std::thread::park();
                    }
                }
            }
            let _ = ready_tx.send(Ok(()));
            body()
        })
        .map_err(|e| SpawnError::Thread(name.clone(), e))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(SpawnError::Seccomp(name, e)),
        Err(_) => Err(SpawnError::Died(name)),
    }
}

/// A VM thread that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot build a seccomp filter")]
    Filter(#[from] SeccompError),
    #[error("cannot start thread {0}")]
    Thread(String, #[source] std::io::Error),
    #[error("thread {0} cannot install its seccomp filter")]
    Seccomp(String, #[source] SeccompError),
    #[error("thread {0} ended before it started")]
    Died(String),
}

/// Marks the calling thread as running `vcpu`, for the kick handler. The
/// thread MUST call [`leave_vcpu`] before the vCPU is dropped.
pub fn enter_vcpu(vcpu: &mut kvm_ioctls::VcpuFd) {
    let run: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|p| p.set(run));
}

/// The calling thread no longer runs a vCPU.
pub fn leave_vcpu() {
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

/// The calling thread, to be kicked later.
pub fn this_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Interrupts the `KVM_RUN` of `thread` (or makes its next one return at
/// once).
///
/// # Safety
///
/// `thread` MUST be a live thread: one that has not returned yet.
pub unsafe fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: the caller guarantees the thread is alive.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// Maps guest memory region `slot` into the VM.
pub fn map_region(
    vm: &kvm_ioctls::VmFd,
    slot: u32,
    guest: u64,
    size: u64,
    host: *mut u8,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: guest,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` is the start of a live mapping of `size` bytes owned by
    // the guest memory object, which outlives the VM (both are dropped
    // together, the VM first).
    unsafe { vm.set_user_memory_region(region) }
}

/// Asks the host to back a guest memory region with transparent huge
/// pages (`MADV_HUGEPAGE`), as QEMU and Cloud Hypervisor do. On a host
/// whose THP setting is `madvise` (as this project's machines have it)
/// fresh anonymous memory is otherwise 4 KiB pages: each page
/// the booting kernel touches costs a nested page fault, and KVM maps the
/// guest in 4 KiB pages. With it, KVM maps 2 MiB at a time (measured in
/// the nested host: a cold boot's kernel phase a third shorter, for
/// about 5 MiB more of the VM's memory resident). On a host set to
/// `always` it changes nothing; on one set to `never` the kernel ignores it.
pub fn advise_huge_pages(region: &vm_memory::MmapRegion) -> std::io::Result<()> {
    // SAFETY: the range is exactly a live mapping owned by `region`;
    // MADV_HUGEPAGE changes how it is backed, never its contents.
    let r = unsafe {
        libc::madvise(
            region.as_ptr().cast::<libc::c_void>(),
            region.size(),
            libc::MADV_HUGEPAGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Maps `region` into the VM at `guest` as memslot `slot`, read-only: the
/// guest's reads are memory, its writes exit as MMIO.
pub fn map_readonly(
    vm: &kvm_ioctls::VmFd,
    slot: u32,
    guest: u64,
    region: &vm_memory::MmapRegion,
) -> Result<(), kvm_ioctls::Error> {
    let r = kvm_bindings::kvm_userspace_memory_region {
        slot,
        flags: kvm_bindings::KVM_MEM_READONLY,
        guest_phys_addr: guest,
        memory_size: region.size() as u64,
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: `region` is a live mapping of `size` bytes; its owner keeps it
    // (in an Arc held by the VM) until the VM is gone.
    unsafe { vm.set_user_memory_region(r) }
}

/// Waits until at least one of `fds` is readable; says which are.
pub fn wait_readable(fds: &[std::os::fd::RawFd]) -> std::io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `polled` is a live array of `len` pollfd entries.
    let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(polled.iter().map(|p| p.revents != 0).collect())
}

/// Monotonic nanoseconds (CLOCK_MONOTONIC), for timings.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's flags for the mapping that holds `addr`, from
    /// /proc/self/smaps ("VmFlags: rd wr mr mw me ac hg").
    fn vm_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut here = false;
        for line in smaps.lines() {
            let range = line.split_once(' ').map_or(line, |(r, _)| r);
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    here = (start..end).contains(&addr);
                    continue;
                }
            }
            if here {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(String::from).collect();
                }
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps");
    }

    #[test]
    fn guest_memory_is_advised_to_use_huge_pages() {
        let region = vm_memory::MmapRegion::<()>::new(4 << 20).unwrap();
        let addr = region.as_ptr() as usize;
        assert!(!vm_flags(addr).contains(&"hg".to_string()));
        advise_huge_pages(&region).expect("MADV_HUGEPAGE (a kernel with THP)");
        let flags = vm_flags(addr);
        assert!(flags.contains(&"hg".to_string()), "{flags:?}");
    }
}
