//! The host-guest contract's decoders under hostile bytes: any input, cut
//! into lines as the control channel does, decodes to a message or is
//! refused, never panics; a decoded message encodes to a line that decodes
//! to the same message. The run configuration parser takes the same bytes.
#![no_main]

use hyper_contract::{GuestMessage, HostMessage, LineBuffer, RunConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = LineBuffer::default();
    for &b in data {
        if let Some(line) = lines.push(b) {
            assert!(line.len() <= hyper_contract::control::MAX_LINE + 1);
            if let Ok(m) = GuestMessage::decode(&line) {
                let again = GuestMessage::decode(&m.encode()).expect("re-decodes");
                // An error message is cleaned of control characters once.
                if !matches!(m, GuestMessage::Error(_)) {
                    assert_eq!(again, m);
                }
            }
            if let Ok(m) = HostMessage::decode(&line) {
                assert_eq!(HostMessage::decode(&m.encode()), Ok(m));
            }
        }
    }
    let _ = GuestMessage::find_report(data);
    if let Ok(c) = RunConfig::parse(data) {
        assert_eq!(RunConfig::parse(&c.to_json()).expect("re-parses"), c);
    }
});
