//! The backends that run a VM: hyperboot's own VMM ([`kvm`], on the
//! `hyper-vmm` crate) and QEMU `microvm` ([`qemu`]). Both take the same
//! artifact and run configuration, are supervised the same way
//! ([`crate::supervise`]) and return the same [`crate::exit::Outcome`].
//! Here: which backend and accelerator a host gets, and the kernel command
//! line.

pub mod kvm;
pub mod qemu;

use crate::host::Kvm;
use crate::BootError;

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Auto,
    Kvm,
    Qemu,
}

/// `--accel` (QEMU backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// What every backend boots: the verified artifact, the run-configuration
/// archive for its initrd, the image's stop signal, the kernel command line.
#[derive(Debug)]
pub struct Boot<'a> {
    pub artifact: &'a hvm::Artifact,
    pub archive: &'a [u8],
    pub stop_signal: i32,
    pub cmdline: String,
    pub opts: &'a crate::BootOptions,
    /// The contract version the artifact's init speaks.
    pub contract: u32,
}

/// Kernel arguments for a stock kernel on nested PVM KVM (the README,
/// "Testing without hardware virtualization").
pub const PVM_WORKAROUNDS: &str =
    "noxsave clearcpuid=cx16,popcnt,smap,fsgsbase,invpcid,pcid,rdrand,rdseed clocksource=jiffies hyper.no_int3_selftest";

/// Which VMM runs the guest, decided from `--backend` and the host.
pub fn choose(choice: Backend, kvm: &Kvm) -> Result<Backend, BootError> {
    Ok(match (choice, kvm) {
        (Backend::Qemu, _) => Backend::Qemu,
        (Backend::Kvm, Kvm::Unavailable(why)) => {
            return Err(BootError::NoKvm("--backend kvm", why.clone()))
        }
        (Backend::Kvm, _) | (Backend::Auto, Kvm::Hardware) => Backend::Kvm,
        (Backend::Auto, Kvm::Pvm) => {
            tracing::info!("/dev/kvm is nested KVM of the PVM kind, on which guest user space cannot run: using the QEMU backend with TCG");
            Backend::Qemu
        }
        (Backend::Auto, Kvm::Unavailable(why)) => {
            tracing::info!("{why}: using the QEMU backend with TCG");
            Backend::Qemu
        }
    })
}

/// QEMU's accelerator for `choice` on this host, and whether the PVM
/// workarounds are needed.
pub fn pick_accel(choice: AccelChoice, kvm: &Kvm) -> Result<(Accel, bool), BootError> {
    Ok(match (choice, kvm) {
        (AccelChoice::Tcg, _) => (Accel::Tcg, false),
        (AccelChoice::Kvm, Kvm::Unavailable(why)) => {
            return Err(BootError::NoKvm("--accel kvm", why.clone()))
        }
        (AccelChoice::Kvm, Kvm::Pvm) => {
            tracing::warn!("/dev/kvm is nested KVM of the PVM kind: the guest kernel boots emulated (about a minute) and its user space cannot make system calls; use --accel tcg");
            (Accel::Kvm, true)
        }
        (_, Kvm::Hardware) => (Accel::Kvm, false),
        (AccelChoice::Auto, Kvm::Pvm) => {
            tracing::debug!("/dev/kvm is nested KVM of the PVM kind, which runs stock guest kernels far slower than TCG: using TCG");
            (Accel::Tcg, false)
        }
        (AccelChoice::Auto, Kvm::Unavailable(why)) => {
            tracing::debug!("{why}; using TCG");
            (Accel::Tcg, false)
        }
    })
}

/// The kernel command line: the artifact's, then the log level and debug
/// switches, then `extra`, then the PVM workarounds where needed, then
/// `HYPER_KERNEL_ARGS` (a debugging aid, as QEMU's -append: added last, so
/// they win).
pub fn kernel_cmdline(base: &str, verbose: bool, console: bool, pvm: bool, extra: &str) -> String {
    let mut c = base.to_string();
    // The IO-APIC timer check waits a fixed number of ticks in a delay
    // loop: a guest starved of CPU (many TCG guests on few cores) misses
    // them and panics ("IO-APIC + timer doesn't work"). Both backends'
    // timers are known to work.
    c.push_str(" no_timer_check");
    c.push_str(if verbose || console {
        " loglevel=8"
    } else {
        " loglevel=1"
    });
    if verbose {
        c.push_str(" hyper.debug");
    }
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    if pvm {
        c.push(' ');
        c.push_str(PVM_WORKAROUNDS);
    }
    if let Ok(more) = std::env::var("HYPER_KERNEL_ARGS") {
        if !more.trim().is_empty() {
            c.push(' ');
            c.push_str(more.trim());
        }
    }
    c
}
