//! Layer records read back from the layer cache are untrusted bytes: any
//! input must decode or be refused, never panic, and what decodes must name
//! only tables and spool bytes that exist.
#![no_main]

use hyperfs::layer::Op;
use hyperfs::record::decode;
use hyperfs::tree::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 4 bytes choose the spool file's length the record is checked against.
    let Some((len, record)) = data.split_first_chunk::<4>() else {
        return;
    };
    let spool_len = u64::from(u32::from_le_bytes(*len));
    if let Ok(r) = decode(record, 1, spool_len) {
        for op in &r.ops {
            if let Op::Node { node, .. } = &op.op {
                if let Kind::File(c) = &node.kind {
                    assert!(c.holes as usize <= r.holes.len());
                    assert!(c.packed as usize <= r.packs.len());
                    assert_eq!(c.file, 1);
                }
            }
        }
        for table in &r.packs {
            for chunk in table {
                assert!(chunk.at + u64::from(chunk.blocks) * 4096 <= spool_len);
            }
        }
    }
});
