//! Our EROFS images judged by an independent implementation: Debian's
//! `fsck.erofs` checks every image and extracts it, and the extracted tree must
//! be exactly the one the layers describe.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use hyperbuild::spool::{Compression, Spool};
use hyperbuild::{erofs, layer, tree::Tree};
use tar::EntryType;

mod common;
use common::TarLayer as Layer;

fn fsck() -> &'static str {
    common::need("fsck.erofs", "erofs-utils");
    "fsck.erofs"
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Bytes no compressor shrinks (xorshift), for plain extents.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Files whose 128 KiB chunks compress, do not, or are all zeros, in turn,
/// with a partial last chunk: every kind of extent the writer makes.
fn mixed(len: usize) -> Vec<u8> {
    const CHUNK: usize = 128 << 10;
    let mut out = Vec::with_capacity(len);
    let mut i = 0;
    while out.len() < len {
        let n = CHUNK.min(len - out.len());
        match i % 3 {
            0 => out.extend(pattern(n, i as u8)),
            1 => out.extend(noise(n, i as u64)),
            _ => out.extend(std::iter::repeat_n(0u8, n)),
        }
        i += 1;
    }
    out
}

fn write_image(layers: &[Vec<u8>], out: &Path) -> u64 {
    write_image_as(layers, out, Compression::None)
}

fn write_image_as(layers: &[Vec<u8>], out: &Path, c: Compression) -> u64 {
    let mut tree = Tree::new();
    let mut spool = Spool::with_compression(c).unwrap();
    for (i, l) in layers.iter().enumerate() {
        layer::apply(&mut tree, &mut spool, i, l.as_slice()).unwrap();
    }
    let mut f = fs::File::create(out).unwrap();
    erofs::write(&tree, &spool, &mut f).unwrap()
}

#[test]
fn fsck_extracts_exactly_the_flattened_tree() {
    extracts_exactly(Compression::None);
}

/// The same tree with compressed contents: LZ4 extents, plain ones, chunks
/// of zeros, every size around the block and chunk edges.
#[test]
fn fsck_extracts_exactly_the_flattened_tree_compressed() {
    extracts_exactly(Compression::Lz4);
    extracts_exactly(Compression::Lz4hc);
}

fn extracts_exactly(compression: Compression) {
    let sizes = [0usize, 1, 100, 4095, 4096, 4097, 8192, 12_345, 200_000];
    let mut l0 = Layer::new().dir("data/", 0o755);
    for (i, s) in sizes.iter().enumerate() {
        l0 = l0.file(&format!("data/f{s}"), 0o644, &pattern(*s, i as u8));
    }
    let edges = [8191usize, 131_072, 131_073, 262_144, 1_000_000];
    for s in edges {
        l0 = l0.file(&format!("data/m{s}"), 0o644, &mixed(s));
    }
    l0 = l0.file("data/noise", 0o644, &noise(300_000, 7));
    let long_name = "n".repeat(255);
    let long_target = format!("../{}", "t/".repeat(150));
    let mut big_dir = Layer::new();
    for i in 0..700 {
        big_dir = big_dir.file(
            &format!("many/entry-number-{i:05}"),
            0o600,
            format!("{i}").as_bytes(),
        );
    }
    let l0 = l0
        .file("bin/tool", 0o4755, b"#!/bin/sh\n")
        .file("bin/sgid", 0o2711, b"x")
        .dir("sticky/", 0o1777)
        .file("noperm", 0o000, b"secret")
        .owned_file("owned", 70_000, 80_000, b"big ids")
        .file(&long_name, 0o644, b"long")
        .file("ünïcödé name", 0o644, b"utf8")
        .link(EntryType::Symlink, "rel", "data/f100")
        .link(EntryType::Symlink, "abs", "/data/f1")
        .link(EntryType::Symlink, "dangling", "/no/such/file")
        .link(EntryType::Symlink, "longlink", &long_target)
        .link(EntryType::Link, "data/hard", "data/f4097")
        .special(EntryType::Char, "dev/null", 1, 3)
        .special(EntryType::Block, "dev/vdb", 254, 16)
        .special(EntryType::Fifo, "fifo", 0, 0)
        .file("gone", 0o644, b"to be deleted")
        .bytes();
    let l1 = Layer::new()
        .file(".wh.gone", 0o644, b"")
        .link(EntryType::Link, "bin/tool-link", "bin/tool")
        .bytes();

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.erofs");
    let size = write_image_as(&[l0, big_dir.bytes(), l1], &img, compression);
    assert_eq!(size, fs::metadata(&img).unwrap().len());
    assert_eq!(size % 4096, 0);

    let ex = dir.path().join("ex");
    // erofs-utils 1.5 chowns after chmod when preserving owners, which clears
    // setuid/setgid; extract without owners and read owners with dump.erofs.
    let out = Command::new(fsck())
        .arg(format!("--extract={}", ex.display()))
        .arg("--no-preserve-owner")
        .arg("--preserve-perms")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck.erofs refused the image: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for (i, s) in sizes.iter().enumerate() {
        assert!(
            fs::read(ex.join(format!("data/f{s}"))).unwrap() == pattern(*s, i as u8),
            "content of f{s} ({compression:?})"
        );
    }
    // Uncompressed, whole chunks of zeros are holes, which fsck.erofs 1.5
    // cannot extract (the kernel reads them in the QEMU tier).
    let with_holes = |s: usize| s > 2 * (128 << 10);
    for s in edges
        .into_iter()
        .filter(|&s| compression != Compression::None || !with_holes(s))
    {
        assert!(
            fs::read(ex.join(format!("data/m{s}"))).unwrap() == mixed(s),
            "content of m{s} ({compression:?})"
        );
    }
    assert!(fs::read(ex.join("data/noise")).unwrap() == noise(300_000, 7));
    // Compressed images hold compressed inodes, and are smaller.
    let layout = |p: &str| {
        let o = Command::new("dump.erofs")
            .arg(format!("--path={p}"))
            .arg(&img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let big = layout("/data/m1000000");
    if compression == Compression::None {
        assert!(!big.contains("Layout: 1"), "{big}");
    } else {
        assert!(size < 1_400_000 + 300_000, "image of {size} bytes");
        assert!(big.contains("Layout: 1 "), "dump.erofs says: {big}");
    }
    let mode = |p: &str| fs::symlink_metadata(ex.join(p)).unwrap().mode();
    assert_eq!(mode("bin/tool") & 0o7777, 0o4755);
    assert_eq!(mode("bin/sgid") & 0o7777, 0o2711);
    assert_eq!(mode("sticky") & 0o7777, 0o1777);
    assert_eq!(mode("noperm") & 0o7777, 0o000);
    let dump = Command::new("dump.erofs")
        .arg("--path=/owned")
        .arg(&img)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("Uid: 70000   Gid: 80000"),
        "dump.erofs says:\n{dump}"
    );
    assert_eq!(
        fs::metadata(ex.join("owned")).unwrap().mtime(),
        1_700_000_000
    );
    assert_eq!(fs::read(ex.join(&long_name)).unwrap(), b"long");
    assert_eq!(fs::read(ex.join("ünïcödé name")).unwrap(), b"utf8");
    assert_eq!(
        fs::read_link(ex.join("rel")).unwrap(),
        Path::new("data/f100")
    );
    assert_eq!(
        fs::read_link(ex.join("abs")).unwrap(),
        Path::new("/data/f1")
    );
    assert_eq!(
        fs::read_link(ex.join("dangling")).unwrap(),
        Path::new("/no/such/file")
    );
    assert_eq!(
        fs::read_link(ex.join("longlink")).unwrap(),
        Path::new(&long_target)
    );
    // fsck.erofs 1.5 extracts hardlinks as copies; dump.erofs shows the inodes.
    let inode = |p: &str| {
        let out = Command::new("dump.erofs")
            .arg(format!("--path={p}"))
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let nid = text
            .split("NID: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned);
        let links = text
            .split("Links: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned);
        (
            nid.unwrap_or_else(|| panic!("no NID for {p}: {text}")),
            links.unwrap(),
        )
    };
    assert_eq!(
        inode("/data/hard"),
        inode("/data/f4097"),
        "hardlink is not one inode"
    );
    assert_eq!(inode("/data/hard").1, "2");
    assert_eq!(inode("/bin/tool-link"), inode("/bin/tool"));
    assert_eq!(inode("/bin/tool").1, "2");
    assert!(
        fs::read(ex.join("data/hard")).unwrap() == pattern(4097, 5),
        "hardlink content"
    );
    let null = fs::symlink_metadata(ex.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc_makedev(1, 3));
    let vdb = fs::symlink_metadata(ex.join("dev/vdb")).unwrap();
    assert!(vdb.file_type().is_block_device());
    assert_eq!(vdb.rdev(), libc_makedev(254, 16));
    assert!(fs::symlink_metadata(ex.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(!ex.join("gone").exists());
    let many: BTreeMap<String, String> = fs::read_dir(ex.join("many"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    assert_eq!(many.len(), 700);
    assert_eq!(many["entry-number-00042"], "42");
}

fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff)
}

#[test]
fn same_layers_give_the_same_image_bytes() {
    let l = Layer::new()
        .file("b", 0o644, b"2")
        .file("a", 0o644, b"1")
        .dir("d/", 0o755)
        .bytes();
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = (dir.path().join("x"), dir.path().join("y"));
    write_image(std::slice::from_ref(&l), &x);
    write_image(&[l], &y);
    assert_eq!(fs::read(x).unwrap(), fs::read(y).unwrap());
}

/// Digest stability: a pinned input gives a pinned image, on any machine and
/// run. If this changes, the on-disk output changed: that must be deliberate
/// (it changes every artifact digest), so update the pin in the same commit.
#[test]
fn a_pinned_fixture_gives_a_pinned_image_digest() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pinned.erofs");
    for (c, pin) in [(Compression::None, PINNED), (Compression::Lz4, PINNED_LZ4)] {
        pinned_image(&img, c);
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            fs::read(&img).unwrap(),
        ));
        assert_eq!(
            digest, pin,
            "the EROFS writer's output changed for a pinned input ({c:?})"
        );
    }
}

const PINNED: &str = "733ddf23d4bbf6522c1a09faa1747ade5e487d3ad5b9ddf51d7b241b60e66781";
const PINNED_LZ4: &str = "8d0fdf557ca20c109f9102565fc452d56be8cef080571896c971c41c2e065e20";

/// The pinned fixture's image.
fn pinned_image(out: &Path, c: Compression) {
    let l0 = Layer::new()
        .dir("etc/", 0o755)
        .file("etc/hostname", 0o644, b"pinned\n")
        .file("bin/tool", 0o4755, &pattern(5000, 3))
        .link(EntryType::Symlink, "bin/sh", "tool")
        .link(EntryType::Link, "bin/tool2", "bin/tool")
        .special(EntryType::Char, "dev/null", 1, 3)
        .owned_file("home/u/big", 100_000, 100_000, &pattern(70_000, 9))
        .bytes();
    let l1 = Layer::new()
        .file("etc/.wh.hostname", 0o644, b"")
        .file("etc/motd", 0o600, b"hi\n")
        .bytes();
    write_image_as(&[l0, l1], out, c);
}

/// A readable dump of the pinned image, made by Debian's `dump.erofs` (the
/// superblock, then every inode by path), compared with the checked-in
/// snapshot `tests/snapshots/pinned.dump`: when the writer's output changes,
/// the diff shows how. `HYPER_UPDATE_SNAPSHOTS=1` rewrites the snapshot.
#[test]
fn the_pinned_image_dump_matches_its_snapshot() {
    dump_matches(Compression::None, "pinned.dump");
    dump_matches(Compression::Lz4, "pinned-lz4.dump");
}

fn dump_matches(c: Compression, snapshot: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pinned.erofs");
    pinned_image(&img, c);
    let dump = |args: &[&str]| {
        let o = Command::new("dump.erofs")
            .args(args)
            .arg(&img)
            .output()
            .expect("dump.erofs (apt-get install erofs-utils)");
        assert!(
            o.status.success(),
            "dump.erofs {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let mut text = String::from("# dump.erofs -s\n");
    text.push_str(&dump(&["-s"]));
    let paths = [
        "/",
        "/bin",
        "/bin/sh",
        "/bin/tool",
        "/bin/tool2",
        "/dev",
        "/dev/null",
        "/etc",
        "/etc/motd",
        "/home",
        "/home/u",
        "/home/u/big",
    ];
    for p in paths {
        text.push_str(&format!("\n# dump.erofs --path={p}\n"));
        text.push_str(&dump(&[&format!("--path={p}")]));
    }
    for p in ["/", "/bin", "/etc"] {
        text.push_str(&format!("\n# dump.erofs --ls --path={p}\n"));
        text.push_str(&dump(&["--ls", &format!("--path={p}")]));
    }
    let snap = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(snapshot);
    if std::env::var_os("HYPER_UPDATE_SNAPSHOTS").is_some() {
        fs::create_dir_all(snap.parent().unwrap()).unwrap();
        fs::write(&snap, &text).unwrap();
    }
    let want =
        fs::read_to_string(&snap).expect("the snapshot (HYPER_UPDATE_SNAPSHOTS=1 writes it)");
    assert!(
        text == want,
        "the dump differs from {}:\n{}",
        snap.display(),
        text.lines()
            .zip(want.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("- {b}\n+ {a}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A 1 GiB file of zeros with a little data costs neither 1 GiB of image nor
/// of spool: whole zero blocks stay holes (chunk-based EROFS), and fsck.erofs
/// reads back the exact bytes.
#[test]
fn a_mostly_empty_gigabyte_file_stays_small() {
    const SIZE: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("layer.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(SIZE);
        // Data at the start, in the middle and in the last (partial) block; zeros elsewhere.
        let data = std::io::Read::chain(
            std::io::Read::chain(&b"head"[..], std::io::repeat(0).take(SIZE / 2 - 4)),
            std::io::Read::chain(&b"middle"[..], std::io::repeat(0).take(SIZE / 2 - 6 - 3)),
        );
        let data = std::io::Read::chain(data, &b"end"[..]);
        b.append_data(&mut h, "big.img", data).unwrap();
        b.into_inner().unwrap();
    }
    // Compressed, the zero chunks are found sparse and kept as holes too.
    // Holes are whole blocks uncompressed, whole 128 KiB chunks compressed.
    let blocks = (1u64 << 30) / 4096;
    for (c, holes) in [
        (Compression::None, blocks - 3),
        (Compression::Lz4, blocks - 3 * 32),
    ] {
        let img = dir.path().join("sparse.erofs");
        sparse_stays_small(&tree_of(&tar_path, c), &img, holes);
    }
}

fn tree_of(tar_path: &Path, c: Compression) -> (Tree, Spool) {
    let mut tree = Tree::new();
    let mut spool = Spool::with_compression(c).unwrap();
    layer::apply(&mut tree, &mut spool, 0, fs::File::open(tar_path).unwrap()).unwrap();
    (tree, spool)
}

fn sparse_stays_small((tree, spool): &(Tree, Spool), img: &Path, holes: u64) {
    let size = erofs::write(tree, spool, &mut fs::File::create(img).unwrap()).unwrap();
    assert!(size < 2 << 20, "a sparse GiB cost {size} bytes of image");
    // fsck.erofs checks the image; erofs-utils 1.5 cannot extract holes, so the
    // bytes are checked by the kernel in the QEMU tier (qemu::sparse_files…).
    let out = Command::new(fsck()).arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = Command::new("dump.erofs")
        .arg("--path=/big.img")
        .arg(img)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("Size: 1073741824") && dump.contains("Layout: 4"),
        "{dump}"
    );
    // Our own reading of the spool gives the exact bytes back.
    let node = tree.lookup(&[b"big.img"]).unwrap();
    let hyperbuild::tree::Kind::File(c) = tree.nodes[node].kind else {
        panic!("not a file")
    };
    assert_eq!(spool.hole_count(&c), holes);
}
