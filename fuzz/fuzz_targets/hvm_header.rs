//! Any bytes as an artifact header and manifest: parsing must never panic,
//! and a header that parses must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = hvm::Header::parse(data) {
        assert_eq!(&h.encode()[..], &data[..hvm::HEADER_LEN]);
        for s in &h.sections {
            assert_eq!(s.offset % hvm::BLOCK_SIZE, 0);
            assert!(s.offset + s.length <= h.file_len);
        }
    }
    let _ = hvm::Manifest::from_json(data);
});
