//! Process-level plumbing for the VMM thread, and the only `unsafe` of the VMM
//! besides mapping guest memory into KVM: signal handlers that stop the vCPU,
//! the `--timeout` timer, and the report of a seccomp violation.
//!
//! A signal that should stop the VM sets a flag and arms a 20 ms repeating
//! timer, so `KVM_RUN` keeps being interrupted (EINTR) until the run loop has
//! seen the flag — even if the signal landed just before the vCPU entered the
//! guest.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The signal that asked the VM to stop (0: none; SIGALRM: the timeout).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

fn arm_timer(first: Duration, interval: Duration) {
    let tv = |d: Duration| libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    let t = libc::itimerval {
        it_interval: tv(interval),
        it_value: tv(first),
    };
    // SAFETY: setitimer reads a valid itimerval; it is async-signal-safe.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()) };
}

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Keep the first reason (a timeout stays a timeout when SIGALRM repeats).
    let _ = STOP_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    arm_timer(Duration::from_millis(20), Duration::from_millis(20));
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills `_sigsys`; the syscall number is the
    // int at offset 24 of siginfo_t on x86-64.
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

fn install(sig: libc::c_int, handler: usize, siginfo: bool) {
    // SAFETY: a zeroed sigaction is valid; handlers only touch atomics and
    // async-signal-safe calls. No SA_RESTART: KVM_RUN must return EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = if siginfo { libc::SA_SIGINFO } else { 0 };
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_kick(_sig: libc::c_int) {}

/// The signals that stop the VM (and the timeout's).
const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGALRM];

/// The signal one vCPU thread sends another to interrupt its `KVM_RUN`.
const KICK: libc::c_int = libc::SIGUSR1;

/// Installs the handlers; arms the timeout when one is given.
pub fn install_handlers(timeout: Option<Duration>) {
    STOP_SIGNAL.store(0, Ordering::SeqCst);
    for sig in STOP_SIGNALS {
        install(sig, on_stop_signal as *const () as usize, false);
    }
    install(KICK, on_kick as *const () as usize, false);
    install(libc::SIGSYS, on_sigsys as *const () as usize, true);
    if let Some(t) = timeout {
        arm_timer(t.max(Duration::from_micros(1)), Duration::ZERO);
    }
}

/// The calling thread, to be kicked later.
pub fn this_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Interrupts `thread`'s `KVM_RUN` (EINTR); a thread not in it just runs the
/// empty handler.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: callers pass threads that have not been joined or detached.
    unsafe { libc::pthread_kill(thread, KICK) };
}

/// Blocks the stop signals in the calling thread, so they reach the boot
/// vCPU's thread, whose loop acts on them.
pub fn block_stop_signals() {
    // SAFETY: a sigset built with the libc calls, for this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The signal that asked the VM to stop, if any.
pub fn stop_signal() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Disarms the timer (the VM has stopped).
pub fn disarm() {
    arm_timer(Duration::ZERO, Duration::ZERO);
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
    // the guest memory object, which outlives the VM (both end with `run`).
    unsafe { vm.set_user_memory_region(region) }
}
