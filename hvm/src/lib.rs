//! The `.hvm` artifact format: one sealed file holding everything needed to boot
//! an OCI image as a microVM.
//!
//! # Layout
//!
//! All integers are little-endian. The file is a sequence of 4096-byte blocks.
//!
//! * **Header** — the first block (bytes `0..4096`):
//!
//!   | offset | size | field |
//!   | --- | --- | --- |
//!   | 0 | 8 | magic, MUST be `HYPERHVM` |
//!   | 8 | 2 | format version, MUST be 1 |
//!   | 10 | 2 | reserved, MUST be 0 |
//!   | 12 | 4 | section count, MUST be at most [`MAX_SECTIONS`] |
//!   | 16 | 8 | total file length in bytes; a reader MUST refuse a file of any other length |
//!   | 24 | 40 | reserved, MUST be 0 |
//!   | 64 | 64 × count | the section table |
//!
//!   Every byte after the section table up to 4096 MUST be 0.
//!
//! * **Section table entry** (64 bytes):
//!
//!   | offset | size | field |
//!   | --- | --- | --- |
//!   | 0 | 4 | kind ([`SectionKind`]) |
//!   | 4 | 4 | flags: bit 0 [`FLAG_REQUIRED`]; other bits MUST be 0 |
//!   | 8 | 8 | offset of the section in the file, MUST be a multiple of 4096 and ≥ 4096 |
//!   | 16 | 8 | length in bytes |
//!   | 24 | 32 | sha256 of the section's bytes |
//!   | 56 | 8 | reserved, MUST be 0 |
//!
//!   Sections MUST NOT overlap and MUST lie inside the file. Bytes between
//!   sections are zero padding. A reader MUST refuse an unknown kind flagged
//!   required and MUST skip an unknown kind that is not. Known kinds MUST each
//!   appear exactly once.
//!
//! * **Sections**: `manifest` (canonical JSON, [`Manifest`]), `kernel` (an
//!   uncompressed x86-64 `vmlinux` ELF with a PVH entry note), `initrd` (a newc
//!   cpio holding `/init`, the guest init, whose host-guest contract version
//!   the manifest records in `init.contract`), `rootfs` (a read-only EROFS image,
//!   served to the guest as a block device straight from the file, which is why
//!   every section is block aligned).
//!
//! # The seal
//!
//! The artifact digest is `sha256` of the whole 4096-byte header. The header holds
//! every section's sha256, so the digest covers every byte of the artifact. A
//! reader MUST verify every section's hash before using the artifact
//! ([`Artifact::open`] does), and a runner MUST refuse a file whose seal does
//! not hold.
//!
//! # Reproducibility
//!
//! A writer MUST NOT put wall-clock time, random ids, host paths or hash-map
//! order into any section: the same inputs give a byte-identical artifact.
#![forbid(unsafe_code)]

pub mod cpio;
mod header;
mod manifest;
mod reader;
mod writer;

pub use header::{
    Header, HeaderError, Section, SectionKind, BLOCK_SIZE, FLAG_REQUIRED, HEADER_LEN, MAGIC,
    MAX_SECTIONS, VERSION,
};
pub use manifest::{
    BuilderInfo, ImageConfig, ImageInfo, InitInfo, KernelInfo, Manifest, Platform, RootfsInfo,
};
pub use reader::{Artifact, ReadError};
pub use writer::{ArtifactWriter, FileSink, SectionWriter, Sink, WriteError};

/// hyper's per-user cache directory: `$XDG_CACHE_HOME/hyper`, else
/// `~/.cache/hyper` (blobs for hyperbuild, verification records for hyperboot).
pub fn cache_home() -> std::path::PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        })
        .join("hyper")
}

/// Formats a raw sha256 as `sha256:<hex>`.
pub fn digest_string(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(digest))
}
