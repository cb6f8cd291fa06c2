//! A hostile guest driving virtio-blk. The target brings the device up the
//! way a driver would, with the queue placed where the input says (inside or
//! outside guest memory); the input also fills guest memory (descriptors,
//! rings, headers) and then drives further register writes. The device must
//! never panic, never touch memory outside the guest's, and stay usable.
#![no_main]

use hyper_vmm::devices::virtio_blk::Block;
use hyper_vmm::devices::virtio_mmio::MmioTransport;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 * 1024;

fn u32_at(d: &[u8], i: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|k| d.get(i + k).copied().unwrap_or(0));
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // Input bytes repeated over guest memory: descriptors, rings, buffers.
    let mut at = 0;
    while at < MEM {
        let n = data.len().min(MEM - at);
        mem.write_slice(&data[..n], GuestAddress(at as u64))
            .unwrap();
        at += n;
    }
    let mut disk = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut disk, &[0x5a; 8192]).unwrap();
    let mut dev = MmioTransport::new(Block::new(disk, 0, 8192), EventFd::new(0).unwrap());
    let w =
        |dev: &mut MmioTransport<Block>, off: u64, v: u32| dev.write(off, &v.to_le_bytes(), &mem);
    // Bring-up: ack, driver, VERSION_1, features ok, queue 0 where the input says.
    w(&mut dev, 0x70, 1);
    w(&mut dev, 0x70, 3);
    w(&mut dev, 0x24, 1);
    w(&mut dev, 0x20, 1);
    w(&mut dev, 0x70, 11);
    w(&mut dev, 0x30, 0);
    w(&mut dev, 0x38, 1 << (u32_at(data, 0) % 9));
    let addr = |i: usize| u32_at(data, i) % (MEM as u32 + 0x1000);
    w(&mut dev, 0x80, addr(4) & !0xf);
    w(&mut dev, 0x90, addr(8) & !0x1);
    w(&mut dev, 0xa0, addr(12) & !0x3);
    w(&mut dev, 0x44, 1);
    w(&mut dev, 0x70, 15);
    for _ in 0..4 {
        w(&mut dev, 0x50, 0);
    }
    // Then whatever register traffic the tail of the input describes.
    for op in data.get(16..).unwrap_or(&[]).chunks_exact(6).take(64) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x1ff);
        if op[0] & 0x80 != 0 {
            let mut out = [0u8; 4];
            dev.read(offset, &mut out);
        } else {
            dev.write(offset, &op[2..6], &mem);
        }
    }
});
