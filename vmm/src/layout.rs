//! The guest physical address map and the tables the firmware would provide:
//! the E820-style memory map (handed over in the PVH start info) and the MP
//! table that tells the kernel about the CPUs and the IOAPIC (no ACPI).
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_6000  PVH start info, modules, memory map
//! 0x0002_0000  kernel command line     0x0009_fc00  MP table (EBDA), reserved to 1 MiB
//! 0x0010_0000  RAM (kernel at 16 MiB, initrd at the top of low RAM)
//! 0xd000_0000  virtio-mmio devices, 4 KiB each   0xfec0_0000 IOAPIC   0xfee0_0000 LAPIC
//! 0x1_0000_0000  RAM above the MMIO gap when the guest has more than 3 GiB
//! ```

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const GDT_ADDR: u64 = 0x500;
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MODLIST_ADDR: u64 = 0x6040;
pub const MEMMAP_ADDR: u64 = 0x6080;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9_fc00;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// First GSI given to virtio devices (after the legacy ISA ones in use).
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const SERIAL_IRQ: u32 = 4;
/// COM2, the control channel to hyperinit.
pub const CONTROL_IRQ: u32 = 3;

/// RAM regions for `mem_bytes` of guest memory, split around the MMIO gap.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_bytes - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// One memory map entry: (address, size, type) with type 1 = RAM, 2 = reserved.
pub type MemmapEntry = (u64, u64, u32);

/// The memory map the kernel sees.
pub fn memmap(mem_bytes: u64) -> Vec<MemmapEntry> {
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let mut m = vec![
        (0, EBDA_START, 1),
        (EBDA_START, HIMEM_START - EBDA_START, 2),
        (HIMEM_START, low_end - HIMEM_START, 1),
    ];
    if mem_bytes > MMIO_GAP_START {
        m.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START, 1));
    }
    m
}

/// The highest address below the MMIO gap that is RAM (for the initrd).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Errors writing firmware tables.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the MP table into guest memory")]
pub struct MpTableError(#[source] vm_memory::GuestMemoryError);

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes an Intel MultiProcessor Specification 1.4 table at [`EBDA_START`]:
/// `cpus` processors, one ISA bus, one IOAPIC with the 16 ISA interrupts
/// identity-mapped, ExtINT on LINT0 and NMI on LINT1.
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    const APIC_VERSION: u8 = 0x14;
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        // Processor entry (20 bytes): type 0, APIC id, version, flags (enabled, BSP), signature, features.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry (8 bytes): type 1, bus id 0, "ISA   ".
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC entry (8 bytes): type 2, id, version, enabled, address.
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupt entries (8 bytes): type 3, INT, flags (conforming), bus 0, irq, ioapic, pin.
    for irq in 0..16u8 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupt entries: ExtINT → LINT0 and NMI → LINT1 on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let header_len = 44usize;
    let table_addr = EBDA_START + 16;
    let mut table = Vec::with_capacity(header_len + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((header_len + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HYPER   "); // OEM id
    table.extend_from_slice(b"HYPERVM     "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fps = Vec::with_capacity(16);
    fps.extend_from_slice(b"_MP_");
    fps.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fps.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (×16), rev 1.4, checksum, features
    fps[10] = checksum(&fps);

    mem.write_slice(&fps, GuestAddress(EBDA_START))
        .map_err(MpTableError)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(MpTableError)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_split_around_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
        let m = memmap(4 << 30);
        assert_eq!(
            m.iter().filter(|e| e.2 == 1).map(|e| e.1).sum::<u64>(),
            (4 << 30) - (HIMEM_START - EBDA_START)
        );
    }

    #[test]
    fn mp_table_checksums_hold() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_mptable(&mem, 2).unwrap();
        let mut fps = [0u8; 16];
        mem.read_slice(&mut fps, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fps[..4], b"_MP_");
        assert_eq!(fps.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = {
            let mut h = [0u8; 6];
            mem.read_slice(&mut h, GuestAddress(EBDA_START + 16))
                .unwrap();
            assert_eq!(&h[..4], b"PCMP");
            u16::from_le_bytes([h[4], h[5]]) as usize
        };
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(EBDA_START + 16))
            .unwrap();
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert!(EBDA_START + 16 + len as u64 <= HIMEM_START);
    }
}
