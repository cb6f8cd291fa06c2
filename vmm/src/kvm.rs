//! Opening KVM, with errors that name the fix.

use kvm_ioctls::{Cap, Kvm};

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("no /dev/kvm: this host has no KVM (load kvm_intel or kvm_amd, enable virtualization in the firmware, or use --backend qemu)")]
    Missing,
    #[error("cannot open /dev/kvm: permission denied (add your user to the kvm group: sudo usermod -aG kvm $USER, then log in again)")]
    Permission,
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM lacks {0}, which hyperboot needs (host kernel too old?); use --backend qemu")]
    Capability(&'static str),
    #[error("KVM API version {0} is not supported (need 12)")]
    Version(i32),
}

/// Opens /dev/kvm and checks every capability the VMM relies on.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(e),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(KvmError::Version(v));
    }
    for (cap, name) in [
        (
            Cap::Irqchip,
            "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)",
        ),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::Capability(name));
        }
    }
    Ok(kvm)
}

/// The host's total memory in MiB (from /proc/meminfo), if known.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
