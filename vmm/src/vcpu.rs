//! The boot CPU's initial state for the PVH entry: 32-bit protected mode with
//! flat segments and paging off, `rbx` pointing at the start info; CPUID as KVM
//! supports it with this vCPU's topology; the boot MSRs; the local APIC's LINT
//! pins wired as on a PC (ExtINT, NMI).

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{GDT_ADDR, START_INFO_ADDR};

/// Why the vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM cannot report the CPUID it supports")]
    GetCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot set the vCPU's CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot set the vCPU's MSRs")]
    Msrs(#[source] kvm_ioctls::Error),
    #[error("cannot set the vCPU's registers")]
    Regs(#[source] kvm_ioctls::Error),
    #[error("cannot set the vCPU's local APIC")]
    Lapic(#[source] kvm_ioctls::Error),
    #[error("cannot write the GDT into guest memory")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

const CR0_PE: u64 = 1;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Sets CPUID: KVM's supported set, with this vCPU's APIC id and topology,
/// and the TSC-deadline timer KVM emulates but does not list.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u8, count: u8) -> Result<(), VcpuError> {
    let mut cpuid: CpuId = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::GetCpuid)?;
    // With it, Linux does not calibrate its local APIC timer (two spins of
    // 25 ticks each, about 200 ms of every boot at HZ=250): it programs the
    // timer in TSC cycles, whose rate kvm-clock gives it.
    let deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, [23:16] logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running on a hypervisor
                if deadline {
                    e.ecx |= 1 << 24; // TSC-deadline timer
                }
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id), // x2APIC id
            // AMD's extended APIC id, which Linux checks against the APIC's.
            0x8000_001e => e.eax = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)
}

/// Sets the MSRs a freshly reset PC would have, as Linux expects them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back by default
    ];
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| VcpuError::Msrs(kvm_ioctls::Error::new(libc::EINVAL)))?;
    // KVM stops at the first MSR it refuses; the ones after it are optional
    // on some hosts, so a short count is not an error.
    vcpu.set_msrs(&msrs).map_err(VcpuError::Msrs)?;
    Ok(())
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the vCPU at the PVH entry: protected mode, paging off, flat segments.
pub fn setup_pvh_regs(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: u64) -> Result<(), VcpuError> {
    // A GDT in guest memory matching the hidden segment state: null, code, data, TSS.
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0000_8b00_0000_0067,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(VcpuError::Gdt)?;
    }
    let mut sregs = vcpu.get_sregs().map_err(VcpuError::Regs)?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = flat_segment(0x08, 0xb);
    let data = flat_segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        s: 0,
        db: 0,
        g: 0,
        ..Default::default()
    };
    sregs.cr0 = CR0_PE;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(VcpuError::Regs)?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: START_INFO_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VcpuError::Regs)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VcpuError::Regs)
}

/// Wires LINT0 as ExtINT (the PIC's output) and LINT1 as NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(VcpuError::Lapic)?;
    for (reg, mode) in [(LVT_LINT0, MODE_EXTINT), (LVT_LINT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(VcpuError::Lapic)
}
