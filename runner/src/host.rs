//! What the host offers: KVM, and whether it is the nested PVM kind on which
//! stock guest kernels crawl (the README, "Testing without hardware
//! virtualization").

use std::path::Path;

/// The host's KVM situation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kvm {
    /// /dev/kvm is usable and the CPU has vmx or svm.
    Hardware,
    /// /dev/kvm is provided by kvm_pvm: usable, but stock guests run emulated.
    Pvm,
    /// No usable /dev/kvm; the reason says what to do.
    Unavailable(Unavailable),
}

/// Why /dev/kvm cannot be used, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no /dev/kvm: this host has no KVM (load kvm_intel or kvm_amd, enable virtualization in the firmware, or use --backend qemu)")]
    Missing,
    #[error("cannot open /dev/kvm: permission denied (add your user to the kvm group: sudo usermod -aG kvm $USER, then log in again)")]
    Permission,
    #[error("cannot open /dev/kvm: {0}")]
    Open(String),
}

/// Probes /dev/kvm, the loaded modules and the CPU flags.
pub fn probe() -> Kvm {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Kvm::Unavailable(Unavailable::Missing)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Kvm::Unavailable(Unavailable::Permission)
        }
        Err(e) => return Kvm::Unavailable(Unavailable::Open(e.to_string())),
        Ok(_) => {}
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(Path::new("/sys/module/kvm_pvm").exists(), &cpuinfo)
}

/// Pure part of [`probe`].
pub fn classify(pvm_module: bool, cpuinfo: &str) -> Kvm {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if pvm_module || !hw {
        Kvm::Pvm
    } else {
        Kvm::Hardware
    }
}

/// Whether `name` (a path, or a program looked up on `$PATH`) is a file.
pub fn on_path(name: &str) -> bool {
    if name.contains('/') {
        return std::path::Path::new(name).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(false, "flags\t: fpu vmx sse"), Kvm::Hardware);
        assert_eq!(classify(false, "flags\t: fpu svm"), Kvm::Hardware);
        assert_eq!(classify(true, "flags\t: fpu vmx"), Kvm::Pvm);
        assert_eq!(classify(false, "flags\t: fpu hypervisor"), Kvm::Pvm);
    }
}
