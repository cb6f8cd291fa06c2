//! The `-v` 9p server takes requests from a hostile guest: any sequence of
//! messages must get well-formed replies that fit the guest's buffer, never
//! a panic, and nothing may appear, change or vanish outside the shared
//! directory (the share sits inside a directory that must end as it began).
#![no_main]

use hyper_vmm::p9::Server;
use libfuzzer_sys::fuzz_target;

/// Tversion, then Tattach of fid 0: the session every guest starts with.
const START: &[&[u8]] = &[
    b"\x13\x00\x00\x00\x64\xff\xff\x00\x00\x01\x00\x08\x009P2000.L",
    b"\x17\x00\x00\x00\x68\x01\x00\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00",
];

fuzz_target!(|data: &[u8]| {
    let outer = tempfile::tempdir().unwrap();
    let share = outer.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("file"), b"contents").unwrap();
    std::fs::create_dir(share.join("dir")).unwrap();
    std::os::unix::fs::symlink("..", share.join("dir/up")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", share.join("pw")).unwrap();
    let sibling = outer.path().join("sibling");
    std::fs::write(&sibling, b"outside").unwrap();

    let mut server = Server::new(&share, data.first().is_some_and(|b| b & 1 == 1), 64).unwrap();
    let mut rest = data.get(1..).unwrap_or_default();
    let mut messages: Vec<Vec<u8>> = START.iter().map(|m| m.to_vec()).collect();
    // Then the input: each message is a 2-byte body length, a room byte, a
    // type, a tag and the body; the size field is filled in.
    let mut rooms = vec![4096usize; 2];
    while let Some((head, tail)) = rest.split_first_chunk::<4>() {
        let len = usize::from(u16::from_le_bytes([head[0], head[1]])).min(tail.len());
        let mut m = ((7 + len) as u32).to_le_bytes().to_vec();
        m.push(head[3]);
        m.extend_from_slice(&[head[2], 0]);
        m.extend_from_slice(&tail[..len]);
        messages.push(m);
        rooms.push(11 + usize::from(head[2]) * 64);
        rest = &tail[len..];
    }
    for (m, room) in messages.iter().zip(rooms) {
        let reply = server.handle(m, room);
        assert!(
            reply.len() >= 7 && reply.len() <= room.max(11),
            "reply of {}",
            reply.len()
        );
        assert_eq!(&reply[..4], &(reply.len() as u32).to_le_bytes());
        assert_eq!(&reply[5..7], &m[5..7], "the tag comes back");
        assert!(reply[4] == m[4].wrapping_add(1) || reply[4] == 7);
    }
    drop(server);
    let mut names: Vec<_> = std::fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["share", "sibling"], "something escaped the share");
    assert_eq!(std::fs::read(&sibling).unwrap(), b"outside");
});
