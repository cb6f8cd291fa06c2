//! The seccomp filter installed on the VMM thread right before the first
//! guest instruction, and by its helper threads (`-i`) when they start: only
//! the system calls the run loop makes are allowed (mprotect only without
//! PROT_EXEC); anything else raises SIGSYS, which reports the call and exits
//! 125.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// System calls of the run loop: KVM_RUN and device work (ioctl, pread, write
/// to stdout and eventfds), memory management by the allocator, signals and
/// timers, and exiting.
const ALLOWED: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_write,
    libc::SYS_writev,
    // Frames to and from passt on the socket pair it was given (no socket
    // can be created or connected under the filter).
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_setitimer,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What a `-v` share's thread adds: file system calls on descriptors it
/// holds (`*at` calls, metadata, directory listing, writes, syncs). Still no
/// process, socket or exec call.
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
];

/// Installs the filter on the calling thread.
pub fn install() -> Result<(), SeccompError> {
    install_allowing(&[])
}

/// Installs the filter of a `-v` share's thread on the calling thread.
pub fn install_file_server() -> Result<(), SeccompError> {
    install_allowing(FILE_SERVER)
}

fn install_allowing(extra: &[i64]) -> Result<(), SeccompError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(extra)
        .map(|&nr| (nr, vec![]))
        .collect();
    // The allocator of a helper thread grows its arena with mprotect; never
    // to make memory executable.
    let no_exec = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )
    .map_err(SeccompError::Build)?;
    rules.insert(
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![no_exec]).map_err(SeccompError::Build)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    let program: BpfProgram = filter.try_into().map_err(SeccompError::Build)?;
    seccompiler::apply_filter(&program).map_err(SeccompError::Install)
}
