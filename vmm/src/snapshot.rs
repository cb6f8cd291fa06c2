//! Snapshots of a booted machine, and restoring them.
//!
//! A snapshot is taken at the contract's snapshot point (hyperinit has
//! mounted the root and says `waiting`): every vCPU parked outside
//! `KVM_RUN` and the devices locked, it holds
//! - each vCPU's state: CPUID, MP state, registers, special registers,
//!   XSAVE, XCRs, debug registers, local APIC, MSRs, pending events;
//! - the machine's: PIC and IOAPIC, PIT, KVM clock;
//! - each device's: transport registers and queues, and what the device
//!   itself keeps (console ports, the control channel);
//! - guest memory, sparse: zero pages are holes.
//!
//! # The file
//!
//! A 4 KiB header, the state (binary: bincode, varint integers; each
//! device's own state inside it as JSON text), then guest memory from a page-aligned
//! offset (regions back to back), so that it can be mapped private
//! (copy-on-write) as the restored guest's memory: pages load when touched
//! and VMs restored from one file share the pages they do not write.
//!
//! | offset | header field |
//! | --- | --- |
//! | 0 | magic `HYPERSNP` |
//! | 8 | format (u32, little-endian) |
//! | 16 | key (32 bytes: what the snapshot is of; the owner computes it) |
//! | 48 | digest (32 bytes, see [`Digest`]) |
//! | 80 | state length (u64) |
//! | 88 | memory offset (u64, page-aligned) |
//! | 96 | memory length (u64) |
//!
//! The digest is SHA-256 over the state bytes, then, for every memory page
//! that is not all zero, its index (u64, little-endian) and its bytes — so
//! a page stored as a hole and a page of zeros are the same, and changing,
//! adding or removing any page changes the digest. [`verify`] recomputes it
//! (skipping holes); a restore never trusts a file it has not verified or
//! written itself (the owner keeps that record).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory};

pub const MAGIC: &[u8; 8] = b"HYPERSNP";
/// The format this VMM writes and reads (1: the state was JSON, which took
/// tens of milliseconds of every restore to parse on the nested host).
pub const FORMAT: u32 = 2;
const HEADER: u64 = 4096;
const PAGE: usize = 4096;
/// The state section at most (a few vCPUs' state is tens of KiB).
const STATE_MAX: u64 = 16 << 20;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// SHA-256 digest of a snapshot's content (see the module).
pub type Digest = [u8; 32];

/// Why a snapshot cannot be taken or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read or write the snapshot")]
    Io(#[source] io::Error),
    #[error("not a snapshot of this format (magic or format differ)")]
    Format,
    #[error("the snapshot is of another artifact, machine or hyperboot")]
    Foreign,
    #[error("the snapshot is truncated")]
    Truncated,
    #[error("the snapshot's content does not match its digest")]
    Corrupt,
    #[error("the snapshot's state is not valid: {0}")]
    State(String),
    #[error("KVM refused {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm(what, e)
}

/// One vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

/// The machine's in-kernel devices and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
}

/// Everything but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub memory_mib: u64,
    pub vcpus: Vec<VcpuState>,
    pub machine: MachineState,
    /// Per virtio-mmio slot, the transport's and device's state.
    #[serde(with = "json_text")]
    pub devices: Vec<Option<serde_json::Value>>,
    /// The control channel's.
    #[serde(with = "json_text")]
    pub control: serde_json::Value,
}

/// A field kept as JSON text inside the binary state: the devices' own
/// states are small, free-form, and each device reads its own.
mod json_text {
    use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(v).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}

/// The state's encoding: bincode with a bound on what a length may ask for.
fn state_codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(STATE_MAX)
}

/// The MSRs KVM can save and restore, asked of it once (before any
/// seccomp filter forbids the system ioctl).
pub fn msr_list(kvm: &kvm_ioctls::Kvm) -> Vec<u32> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default()
}

/// Reads every MSR of `list` KVM can give (it stops at the first it
/// cannot: that one is left out and the rest asked again).
fn get_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::new();
    let mut rest: &[u32] = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::State("too many MSRs".into()))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the one it could not read (if any).
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(out)
}

/// Captures one vCPU. Called on its own thread, while it is outside
/// `KVM_RUN` and every other vCPU is too. The order is KVM's: the MP state
/// first (it settles pending APIC events), the pending events last.
pub fn capture_vcpu(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, SnapshotError> {
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = get_msrs(vcpu, msr_list)?;
    let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Puts vCPU `id`'s captured state into a fresh vCPU. The order is KVM's:
/// CPUID and MP state first, registers before pending events (setting
/// registers clears pending exceptions), special registers before the
/// local APIC (they hold the APIC base), the APIC before the MSRs (the TSC
/// deadline needs it), the TSC before the TSC deadline.
pub fn restore_vcpu(vcpu: &VcpuFd, states: &[VcpuState], id: usize) -> Result<(), SnapshotError> {
    let s = states
        .get(id)
        .ok_or_else(|| SnapshotError::State(format!("no state for vCPU {id}")))?;
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|_| SnapshotError::State("too many CPUID entries".into()))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&restored_sregs(&s.sregs, host_is_amd()))
        .map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: a kvm_xsave read back from KVM on a host with the same CPU
    // (the snapshot's key says so); KVM checks what it takes.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    // The vCPUs shared one TSC when they were captured (one after the
    // other, so their values differ by that time): every vCPU gets the
    // first one's.
    let tsc = msr(&states[0], MSR_IA32_TSC);
    if let Some(tsc) = tsc {
        restore_tsc(vcpu, tsc, id == 0)?;
    }
    let (deadline, rest): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = s
        .msrs
        .iter()
        .copied()
        .filter(|m| m.index != MSR_IA32_TSC)
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    // A zero deadline with the timer armed would never fire after the
    // restore: a deadline now fires at once instead (as Firecracker does).
    let deadline: Vec<kvm_msr_entry> = deadline
        .into_iter()
        .map(|mut m| {
            if m.data == 0 {
                m.data = tsc.unwrap_or(0);
            }
            m
        })
        .collect();
    for part in [rest, deadline] {
        set_msrs(vcpu, &part)?;
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    // Tells the guest's kvmclock it was paused (no soft-lockup alarms).
    let _ = vcpu.kvmclock_ctrl();
    Ok(())
}

/// The special registers to restore. KVM on AMD reports the task register
/// as a busy TSS (type 11) whatever the VMCB holds, as Intel's VM entry
/// requires; AMD's `VMRUN` takes either, and what `LTR` leaves cached there
/// is the available type (9). On an AMD host the restored TR gets type 9
/// back: QEMU's emulation of SVM (the nested test host) consults the I/O
/// permission bitmap only for a TR of that type, so with 11 the guest's
/// permitted `out` to the exit port faulted and a restored guest ended by
/// a reset instead.
fn restored_sregs(sregs: &kvm_sregs, amd: bool) -> kvm_sregs {
    let mut sregs = *sregs;
    if amd && sregs.tr.type_ == TSS_BUSY {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
    sregs
}

const TSS_AVAILABLE: u8 = 9;
const TSS_BUSY: u8 = 11;

fn host_is_amd() -> bool {
    let id = std::arch::x86_64::__cpuid(0);
    [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .eq(*b"AuthenticAMD")
}

fn msr(s: &VcpuState, index: u32) -> Option<u64> {
    s.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs =
            Msrs::from_entries(chunk).map_err(|_| SnapshotError::State("too many MSRs".into()))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(SnapshotError::State(format!(
                "KVM refused MSR {:#x}",
                chunk[n].index
            )));
        }
    }
    Ok(())
}

/// Further from any TSC a guest had than KVM's "within one second"
/// (2^44 cycles: an hour at 4 GHz).
const TSC_FAR: u64 = 1 << 44;

/// Sets the guest's TSC to `tsc`, where the snapshot left it.
///
/// KVM (before Linux 6.8) takes a TSC written by the VMM that is within a
/// second of the one it expects (the VM's last written TSC, here the 0 of
/// the vCPU's creation, plus the time since) as an attempt to synchronise
/// vCPUs, and keeps its own value instead. A snapshot taken less than a
/// second into the guest's life (every one on a fast host) would then
/// restore with its TSC back near 0 while its clock and TSC deadline go on
/// from the snapshot: the deadline fires up to that second late, and the
/// guest, whose clock says the timer is past due, programs no earlier one
/// meanwhile (a restored run that sleeps stalls until then). So the first
/// vCPU writes a far value first, which sets the VM's last written TSC, and
/// then the real one, too far from it to be taken for a sync. The other
/// vCPUs write the same value: within KVM's second of the time since their
/// creation, it is taken for a sync and they share the first one's offset,
/// as when captured; later, it is set as written, the time between the two
/// writes behind the first (microseconds). Read back, the TSC must have
/// gone on from `tsc`, or the restore is refused (the boot falls back to
/// cold).
fn restore_tsc(vcpu: &VcpuFd, tsc: u64, first: bool) -> Result<(), SnapshotError> {
    let entry = |data| kvm_msr_entry {
        index: MSR_IA32_TSC,
        data,
        ..Default::default()
    };
    if first {
        set_msrs(vcpu, &[entry(tsc.wrapping_add(TSC_FAR))])?;
    }
    set_msrs(vcpu, &[entry(tsc)])?;
    let now = get_msrs(vcpu, &[MSR_IA32_TSC])?
        .first()
        .map(|m| m.data)
        .ok_or(SnapshotError::State("KVM cannot read the TSC".into()))?;
    if now.wrapping_sub(tsc) >= TSC_FAR / 2 {
        return Err(SnapshotError::State(format!(
            "KVM set the guest's TSC to {now:#x}, not {tsc:#x}"
        )));
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Captures the in-kernel PIC, IOAPIC, PIT and clock (every vCPU paused).
pub fn capture_machine(vm: &VmFd) -> Result<MachineState, SnapshotError> {
    Ok(MachineState {
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Puts them back into a fresh VM. The guest's clock continues from the
/// snapshot's (no jump in its monotonic time); its wall clock is set by
/// hyperinit from the start message.
pub fn restore_machine(vm: &VmFd, m: &MachineState) -> Result<(), SnapshotError> {
    vm.set_pit2(&m.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: m.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for c in [&m.pic_master, &m.pic_slave, &m.ioapic] {
        vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// A snapshot file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub key: [u8; 32],
    pub digest: Digest,
    pub state_len: u64,
    pub memory_offset: u64,
    pub memory_len: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        h[16..48].copy_from_slice(&self.key);
        h[48..80].copy_from_slice(&self.digest);
        h[80..88].copy_from_slice(&self.state_len.to_le_bytes());
        h[88..96].copy_from_slice(&self.memory_offset.to_le_bytes());
        h[96..104].copy_from_slice(&self.memory_len.to_le_bytes());
        h
    }

    fn decode(h: &[u8]) -> Result<Header, SnapshotError> {
        if h.len() < 104 || &h[0..8] != MAGIC || h[8..12] != FORMAT.to_le_bytes() {
            return Err(SnapshotError::Format);
        }
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        let mut key = [0u8; 32];
        key.copy_from_slice(&h[16..48]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&h[48..80]);
        Ok(Header {
            key,
            digest,
            state_len: u64_at(80),
            memory_offset: u64_at(88),
            memory_len: u64_at(96),
        })
    }
}

fn io(e: io::Error) -> SnapshotError {
    SnapshotError::Io(e)
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|b| *b == 0)
}

/// Writes a snapshot of `state` and `mem` into `file` (empty, opened for
/// writing), synced to disk; returns its header (with the digest).
pub fn write(
    file: &File,
    key: [u8; 32],
    state: &State,
    mem: &GuestMemoryMmap,
) -> Result<Header, SnapshotError> {
    use bincode::Options;
    let state_bytes = state_codec()
        .serialize(state)
        .map_err(|e| SnapshotError::State(e.to_string()))?;
    let state_len = state_bytes.len() as u64;
    let memory_offset = (HEADER + state_len).div_ceil(PAGE as u64) * PAGE as u64;
    let memory_len: u64 = mem.iter().map(|r| r.len()).sum();
    // The full length first: the pages never written stay holes.
    file.set_len(memory_offset + memory_len).map_err(io)?;
    file.write_all_at(&state_bytes, HEADER).map_err(io)?;
    let mut hash = Sha256::new();
    hash.update(&state_bytes);
    let mut page = vec![0u8; PAGE];
    let mut index: u64 = 0;
    for region in mem.iter() {
        let slice = region
            .as_volatile_slice()
            .map_err(|e| SnapshotError::State(format!("guest memory: {e}")))?;
        let pages = region.len() as usize / PAGE;
        for p in 0..pages {
            let part = slice
                .get_slice(p * PAGE, PAGE)
                .map_err(|e| SnapshotError::State(format!("guest memory: {e}")))?;
            part.copy_to(&mut page[..]);
            if !is_zero(&page) {
                file.write_all_at(&page, memory_offset + index * PAGE as u64)
                    .map_err(io)?;
                hash.update(index.to_le_bytes());
                hash.update(&page);
            }
            index += 1;
        }
    }
    let header = Header {
        key,
        digest: hash.finalize().into(),
        state_len,
        memory_offset,
        memory_len,
    };
    file.sync_data().map_err(io)?;
    file.write_all_at(&header.encode(), 0).map_err(io)?;
    file.sync_data().map_err(io)?;
    Ok(header)
}

/// Opens a snapshot for a restore: its header (the key must be `key`), the
/// size it must have, and its state. The digest is the caller's to check
/// ([`verify`]) unless it knows the file.
pub fn open(file: &File, key: &[u8; 32]) -> Result<(Header, State), SnapshotError> {
    let mut h = vec![0u8; HEADER as usize];
    file.read_exact_at(&mut h, 0).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
        _ => SnapshotError::Io(e),
    })?;
    let header = Header::decode(&h)?;
    if &header.key != key {
        return Err(SnapshotError::Foreign);
    }
    if header.state_len > STATE_MAX
        || header.memory_offset < HEADER + header.state_len
        || header.memory_offset % PAGE as u64 != 0
        || header.memory_len % PAGE as u64 != 0
    {
        return Err(SnapshotError::Format);
    }
    let size = file.metadata().map_err(io)?.len();
    if size < header.memory_offset.saturating_add(header.memory_len) {
        return Err(SnapshotError::Truncated);
    }
    let mut state = vec![0u8; header.state_len as usize];
    file.read_exact_at(&mut state, HEADER).map_err(io)?;
    use bincode::Options;
    let state: State = state_codec()
        .deserialize(&state)
        .map_err(|e| SnapshotError::State(e.to_string()))?;
    Ok((header, state))
}

/// Recomputes the digest of an opened snapshot (reading only the data the
/// file holds, not its holes) and compares it with the header's.
pub fn verify(file: &File, header: &Header) -> Result<(), SnapshotError> {
    let mut hash = Sha256::new();
    let mut state = vec![0u8; header.state_len as usize];
    file.read_exact_at(&mut state, HEADER).map_err(io)?;
    hash.update(&state);
    let end = header.memory_offset + header.memory_len;
    let mut at = header.memory_offset;
    let mut page = vec![0u8; PAGE];
    let mut chunk = vec![0u8; 1 << 20];
    while at < end {
        // The next data from `at` (a hole runs to the next data or the end).
        let data = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => at, // no SEEK_DATA: read everything
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(data))
            .unwrap_or(end)
            .min(end);
        // Data extents are page-aligned here: the writer wrote whole pages.
        let mut pos = data - (data - header.memory_offset) % PAGE as u64;
        while pos < hole {
            let n = ((hole - pos) as usize).min(chunk.len()) / PAGE * PAGE;
            let n = n.max(PAGE);
            file.read_exact_at(&mut chunk[..n], pos).map_err(io)?;
            for (i, p) in chunk[..n].chunks(PAGE).enumerate() {
                page.copy_from_slice(p);
                if !is_zero(&page) {
                    let index = (pos - header.memory_offset) / PAGE as u64 + i as u64;
                    hash.update(index.to_le_bytes());
                    hash.update(&page);
                }
            }
            pos += n as u64;
        }
        at = pos.max(hole);
    }
    if <[u8; 32]>::from(hash.finalize()) == header.digest {
        Ok(())
    } else {
        Err(SnapshotError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn state() -> State {
        State {
            memory_mib: 1,
            vcpus: Vec::new(),
            machine: MachineState {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            devices: vec![None, Some(serde_json::json!({"status": 15}))],
            control: serde_json::json!({"ready": "port"}),
        }
    }

    #[test]
    fn the_state_round_trips_and_a_hostile_one_is_an_error() {
        use bincode::Options;
        let mut s = state();
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        s.vcpus.push(VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 7,
                ebx: 0x1234,
                ..Default::default()
            }],
            mp_state: Default::default(),
            regs,
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: 42,
                ..Default::default()
            }],
            events: Default::default(),
        });
        let bytes = state_codec().serialize(&s).unwrap();
        let back: State = state_codec().deserialize(&bytes).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(back.vcpus[0].cpuid[0].ebx, 0x1234);
        assert_eq!(back.vcpus[0].msrs[0].data, 42);
        assert_eq!(back.control, serde_json::json!({"ready": "port"}));
        // Cut short, a length far beyond the bound, device text that is
        // not JSON: errors, not panics or huge allocations.
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            assert!(state_codec().deserialize::<State>(&bytes[..cut]).is_err());
        }
        let mut huge = bytes.clone();
        huge[1] = 0xff;
        huge[2..11].fill(0xff);
        assert!(state_codec().deserialize::<State>(&huge).is_err());
        let mut s = state();
        s.devices = vec![];
        let mut b = state_codec().serialize(&s).unwrap();
        let text = b.len() - 16; // inside the control's JSON text
        assert_eq!(b[text], b'{');
        b[text] = b'x';
        assert!(state_codec().deserialize::<State>(&b).is_err());
    }

    #[test]
    fn a_busy_task_register_is_restored_available_on_amd_only() {
        let mut sregs = kvm_sregs::default();
        sregs.tr.type_ = TSS_BUSY;
        assert_eq!(restored_sregs(&sregs, true).tr.type_, TSS_AVAILABLE);
        assert_eq!(restored_sregs(&sregs, false).tr.type_, TSS_BUSY);
        sregs.tr.type_ = 3;
        assert_eq!(restored_sregs(&sregs, true).tr.type_, 3);
        let amd = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap()
            .contains("AuthenticAMD");
        assert_eq!(host_is_amd(), amd);
    }

    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(b"kernel", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 5000], GuestAddress(0x8_0000))
            .unwrap();
        mem
    }

    #[test]
    fn written_snapshots_open_verify_and_keep_memory_sparse() {
        let f = tempfile::tempfile().unwrap();
        let key = [9u8; 32];
        let h = write(&f, key, &state(), &memory()).unwrap();
        let (h2, s) = open(&f, &key).unwrap();
        assert_eq!(h, h2);
        assert_eq!(s.devices[1], Some(serde_json::json!({"status": 15})));
        verify(&f, &h).unwrap();
        let mut b = [0u8; 6];
        f.read_exact_at(&mut b, h.memory_offset + 0x1000).unwrap();
        assert_eq!(&b, b"kernel");
        assert_eq!(h.memory_offset % 4096, 0);
        assert_eq!(f.metadata().unwrap().len(), h.memory_offset + (1 << 20));
    }

    #[test]
    fn foreign_truncated_and_tampered_snapshots_are_refused() {
        let f = tempfile::tempfile().unwrap();
        let key = [9u8; 32];
        let h = write(&f, key, &state(), &memory()).unwrap();
        assert!(matches!(open(&f, &[1u8; 32]), Err(SnapshotError::Foreign)));
        // A page changed, a zero page filled, a data page zeroed.
        for (at, bytes) in [
            (0x1000u64, &b"KERNEL"[..]),
            (0x4_0000, b"x"),
            (0x8_0000, &[0u8; 4096]),
        ] {
            let g = tempfile::tempfile().unwrap();
            write(&g, key, &state(), &memory()).unwrap();
            g.write_all_at(bytes, h.memory_offset + at).unwrap();
            let (hg, _) = open(&g, &key).unwrap();
            assert!(
                matches!(verify(&g, &hg), Err(SnapshotError::Corrupt)),
                "{at:#x}"
            );
        }
        // The state changed.
        let g = tempfile::tempfile().unwrap();
        write(&g, key, &state(), &memory()).unwrap();
        g.write_all_at(b" ", 4096 + 1).unwrap();
        let hg = Header::decode(&{
            let mut b = vec![0u8; 4096];
            g.read_exact_at(&mut b, 0).unwrap();
            b
        })
        .unwrap();
        assert!(verify(&g, &hg).is_err());
        // Cut short, or not a snapshot at all.
        f.set_len(h.memory_offset + 4096).unwrap();
        assert!(matches!(open(&f, &key), Err(SnapshotError::Truncated)));
        let junk = tempfile::tempfile().unwrap();
        junk.write_all_at(&[0u8; 8192], 0).unwrap();
        assert!(matches!(open(&junk, &key), Err(SnapshotError::Format)));
        let empty = tempfile::tempfile().unwrap();
        assert!(matches!(open(&empty, &key), Err(SnapshotError::Truncated)));
    }
}
