//! Devices of the microVM: the legacy port-I/O bus and virtio over MMIO.

pub mod pio;
pub mod virtio_9p;
pub mod virtio_blk;
pub mod virtio_console;
pub mod virtio_mmio;
pub mod virtio_net;
