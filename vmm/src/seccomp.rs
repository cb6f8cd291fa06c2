//! Per-thread seccomp filters. Every thread of a running VM installs the
//! filter of its [`Profile`] itself, before it touches anything the guest
//! controls: only the system calls that thread makes are allowed, `ioctl`
//! only with the request numbers that thread uses, `mprotect` never with
//! `PROT_EXEC`. Anything else raises SIGSYS, which the VMM reports (naming
//! the call) before exiting 125; a thread without that handler dies of it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// What a thread does, hence what it may ask of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A vCPU: `KVM_RUN`, and the `KVM_GET_*` requests that read its own
    /// state for a snapshot; device work on its exits (reads of the rootfs,
    /// writes to stdout, eventfds and passt's socket).
    Vcpu,
    /// A device helper (stdin feeder, network receiver): no ioctl at all.
    Helper,
    /// A `-v` share's 9p server: the helper's calls plus file calls on
    /// descriptors it holds (`*at` calls, metadata, listing, writes, syncs);
    /// still no ioctl, process, socket or exec call.
    FileServer,
    /// The thread that sends hyperinit its start message at the snapshot
    /// point, and takes the snapshot first when asked: the device calls,
    /// file calls to write the snapshot and put it in place, and the
    /// `KVM_GET_*` requests that read the machine's in-kernel devices.
    Snapshot,
    /// The thread that owns a running VM (hyperboot's main thread): waits
    /// for signals and the end, sends control messages, restores the
    /// terminal: the terminal ioctls `TCGETS*`, `TCSETS*` and `TIOCGWINSZ`
    /// only, and `wait4` for its children.
    Supervisor,
}

/// Every thread: memory management by the allocator, futexes, signals,
/// time, its own exit.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // How the kernel resumes a sleep with a timeout (poll, clock_nanosleep,
    // futex) that a stop interrupted: Ctrl-Z then `fg`, SIGSTOP and SIGCONT,
    // a debugger attaching.
    libc::SYS_restart_syscall,
];

/// Device work: the rootfs, frames to and from passt on the socket pair it
/// was given (no socket can be created or connected), polling.
const DEVICES: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

const FILE_SERVER: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_getdents64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
];

const SNAPSHOT: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_openat,
    libc::SYS_mkdirat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
    libc::SYS_flock,
    libc::SYS_getrandom,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_rename,
    libc::SYS_mkdir,
    libc::SYS_unlink,
    libc::SYS_stat,
    libc::SYS_lstat,
];

const SUPERVISOR: &[i64] = &[
    libc::SYS_lseek,
    libc::SYS_rt_sigaction,
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
];

/// The `KVM_RUN` request number (`_IO(KVMIO, 0x80)`).
pub const KVM_RUN: u64 = 0xae80;

/// `_IOR`/`_IOW`/`_IOWR(KVMIO, nr, T)` for a `T` of `size` bytes.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
const R: u64 = 2;
const RW: u64 = 3;

/// What a vCPU reads of itself for a snapshot.
const VCPU_STATE_IOCTLS: &[u64] = &[
    kvm_ioc(R, 0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>()),
    kvm_ioc(R, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()),
    kvm_ioc(R, 0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>()),
    kvm_ioc(R, 0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>()),
    kvm_ioc(R, 0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>()),
    kvm_ioc(R, 0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>()),
    kvm_ioc(
        R,
        0x8e,
        std::mem::size_of::<kvm_bindings::kvm_lapic_state>(),
    ),
    kvm_ioc(RW, 0x91, std::mem::size_of::<kvm_bindings::kvm_cpuid2>()),
    kvm_ioc(RW, 0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>()),
    kvm_ioc(
        R,
        0x9f,
        std::mem::size_of::<kvm_bindings::kvm_vcpu_events>(),
    ),
];

/// What the snapshot thread reads of the machine.
const MACHINE_STATE_IOCTLS: &[u64] = &[
    kvm_ioc(RW, 0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>()),
    kvm_ioc(R, 0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>()),
    kvm_ioc(R, 0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>()),
];

/// The terminal requests the supervisor makes (the `*2` forms are what
/// rustix uses).
const TERMINAL_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TCGETS2,
    libc::TCSETS2,
    libc::TCSETSW2,
    libc::TCSETSF2,
    libc::TIOCGWINSZ,
];

impl Profile {
    fn calls(self) -> Vec<i64> {
        let extra: &[&[i64]] = match self {
            Profile::Vcpu | Profile::Helper => &[DEVICES],
            Profile::FileServer => &[DEVICES, FILE_SERVER],
            Profile::Snapshot => &[DEVICES, SNAPSHOT],
            Profile::Supervisor => &[SUPERVISOR],
        };
        BASE.iter()
            .chain(extra.iter().flat_map(|c| c.iter()))
            .copied()
            .collect()
    }

    fn ioctls(self) -> Vec<u64> {
        match self {
            Profile::Vcpu => [KVM_RUN].iter().chain(VCPU_STATE_IOCTLS).copied().collect(),
            Profile::Helper | Profile::FileServer => Vec::new(),
            Profile::Snapshot => MACHINE_STATE_IOCTLS.to_vec(),
            Profile::Supervisor => TERMINAL_IOCTLS.to_vec(),
        }
    }

    /// The filter as a BPF program (built before it is needed, so that
    /// installing it allocates nothing).
    pub fn program(self) -> Result<BpfProgram, SeccompError> {
        let arg = |index, op, value| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
                .map_err(SeccompError::Build)
        };
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            self.calls().into_iter().map(|nr| (nr, vec![])).collect();
        // The allocator of a helper thread grows its arena with mprotect;
        // never to make memory executable.
        let no_exec = arg(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)?;
        rules.insert(
            libc::SYS_mprotect,
            vec![SeccompRule::new(vec![no_exec]).map_err(SeccompError::Build)?],
        );
        let ioctls = self
            .ioctls()
            .into_iter()
            .map(|request| {
                SeccompRule::new(vec![arg(1, SeccompCmpOp::Eq, request)?])
                    .map_err(SeccompError::Build)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !ioctls.is_empty() {
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(SeccompError::Build)?;
        filter.try_into().map_err(SeccompError::Build)
    }

    /// Builds and installs the filter on the calling thread.
    pub fn install(self) -> Result<(), SeccompError> {
        install_program(&self.program()?)
    }
}

/// Installs a built filter on the calling thread.
pub fn install_program(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child after installing `profile`'s filter
    /// (built in the parent: the child only applies it); returns how the
    /// child ended (exit code, or the signal that killed it).
    fn in_child(profile: Profile, body: fn()) -> Result<i32, i32> {
        let program = profile.program().unwrap();
        // SAFETY: the child only applies a prebuilt filter, makes raw system
        // calls and _exits: no allocation, no lock another thread may hold.
        match unsafe { libc::fork() } {
            0 => {
                if install_program(&program).is_err() {
                    // SAFETY: _exit is async-signal-safe.
                    unsafe { libc::_exit(100) };
                }
                body();
                // SAFETY: as above.
                unsafe { libc::_exit(0) }
            }
            pid => {
                assert!(pid > 0, "fork failed");
                let mut status = 0;
                // SAFETY: waits for our own child; `status` is a live int.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                if libc::WIFEXITED(status) {
                    Ok(libc::WEXITSTATUS(status))
                } else {
                    Err(libc::WTERMSIG(status))
                }
            }
        }
    }

    fn kvm_create_vm() {
        // SAFETY: raw system calls on a path literal and a descriptor.
        unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            libc::ioctl(fd, 0xae01, 0); // KVM_CREATE_VM
        }
    }

    fn kvm_run_request() {
        // SAFETY: as above; /dev/null refuses the request (ENOTTY) but the
        // filter lets it through.
        unsafe {
            libc::ioctl(0, KVM_RUN as _, 0);
        }
    }

    fn terminal_size() {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ fills a live winsize (or fails with ENOTTY).
        unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    }

    fn exec_shell() {
        // SAFETY: execve of a literal path with empty argv and envp.
        unsafe {
            let argv = [std::ptr::null::<libc::c_char>()];
            libc::execve(c"/bin/sh".as_ptr(), argv.as_ptr(), argv.as_ptr());
        }
    }

    /// A child sleeping in `poll` with a timeout under `profile`'s filter is
    /// stopped and continued there, as Ctrl-Z and `fg` do: the kernel
    /// resumes the sleep through `restart_syscall`. Returns how it ended.
    fn stopped_and_continued_in_a_sleep(profile: Profile) -> Result<i32, i32> {
        let program = profile.program().unwrap();
        // SAFETY: as in `in_child`.
        match unsafe { libc::fork() } {
            0 => {
                if install_program(&program).is_err() {
                    // SAFETY: _exit is async-signal-safe.
                    unsafe { libc::_exit(100) };
                }
                // SAFETY: a poll of no descriptors is a 600 ms sleep.
                unsafe { libc::poll(std::ptr::null_mut(), 0, 600) };
                // SAFETY: as above.
                unsafe { libc::_exit(0) }
            }
            pid => {
                assert!(pid > 0, "fork failed");
                std::thread::sleep(std::time::Duration::from_millis(200));
                let mut status = 0;
                // SAFETY: signals and waits for our own child; `status` is
                // a live int.
                unsafe {
                    libc::kill(pid, libc::SIGSTOP);
                    libc::waitpid(pid, &mut status, libc::WUNTRACED);
                    assert!(
                        libc::WIFSTOPPED(status),
                        "the child did not stop: {status:#x}"
                    );
                    libc::kill(pid, libc::SIGCONT);
                    libc::waitpid(pid, &mut status, 0);
                }
                if libc::WIFEXITED(status) {
                    Ok(libc::WEXITSTATUS(status))
                } else {
                    Err(libc::WTERMSIG(status))
                }
            }
        }
    }

    #[test]
    fn every_thread_survives_a_stop_and_continue_in_a_sleep() {
        for profile in [
            Profile::Vcpu,
            Profile::Helper,
            Profile::FileServer,
            Profile::Snapshot,
            Profile::Supervisor,
        ] {
            assert_eq!(
                stopped_and_continued_in_a_sleep(profile),
                Ok(0),
                "{profile:?}"
            );
        }
    }

    #[test]
    fn a_vcpu_thread_may_run_kvm_run_and_nothing_else() {
        assert_eq!(in_child(Profile::Vcpu, kvm_run_request), Ok(0));
        assert_eq!(
            in_child(Profile::Vcpu, kvm_create_vm),
            Err(libc::SIGSYS),
            "open (and KVM_CREATE_VM) must kill a vCPU thread"
        );
        assert_eq!(in_child(Profile::Vcpu, terminal_size), Err(libc::SIGSYS));
        assert_eq!(in_child(Profile::Vcpu, exec_shell), Err(libc::SIGSYS));
    }

    #[test]
    fn helpers_make_no_ioctl_and_the_supervisor_only_terminal_ones() {
        assert_eq!(
            in_child(Profile::Helper, kvm_run_request),
            Err(libc::SIGSYS)
        );
        assert_eq!(
            in_child(Profile::FileServer, terminal_size),
            Err(libc::SIGSYS)
        );
        assert_eq!(in_child(Profile::Supervisor, terminal_size), Ok(0));
        assert_eq!(
            in_child(Profile::Supervisor, kvm_run_request),
            Err(libc::SIGSYS)
        );
        assert_eq!(in_child(Profile::Supervisor, exec_shell), Err(libc::SIGSYS));
    }
}
