//! Writes real artifacts to disk and reads them back, flipping bytes and cutting
//! the file to prove the reader refuses every tampered or truncated copy.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use hvm::*;

fn manifest() -> Manifest {
    Manifest {
        image: ImageInfo {
            reference: "oci:test".into(),
            digest: "sha256:abc".into(),
            index_digest: None,
            platform: Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            },
        },
        config: ImageConfig::default(),
        kernel: KernelInfo {
            version: "6.12".into(),
            cmdline: String::new(),
        },
        rootfs: RootfsInfo {
            fs_type: "erofs".into(),
            size: 5000,
        },
        builder: BuilderInfo {
            name: "test".into(),
            version: "0".into(),
        },
        init: None,
    }
}

fn write(path: &std::path::Path) -> [u8; 32] {
    let mut w = ArtifactWriter::create(path).unwrap();
    w.section_bytes(
        SectionKind::Manifest,
        FLAG_REQUIRED,
        &manifest().to_canonical_json(),
    )
    .unwrap();
    w.section_bytes(SectionKind::Kernel, FLAG_REQUIRED, b"kernel bytes")
        .unwrap();
    w.section_bytes(SectionKind::Initrd, FLAG_REQUIRED, b"initrd")
        .unwrap();
    w.section_bytes(SectionKind::Rootfs, FLAG_REQUIRED, &vec![7u8; 5000])
        .unwrap();
    w.finish().unwrap()
}

#[test]
fn written_artifact_reads_back_verified_and_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.hvm");
    let digest = write(&path);
    let a = Artifact::open(&path).unwrap();
    assert_eq!(a.digest(), digest);
    assert_eq!(a.manifest(), &manifest());
    assert_eq!(
        a.read_section(SectionKind::Kernel).unwrap(),
        b"kernel bytes"
    );
    for s in &a.header().sections {
        assert_eq!(s.offset % BLOCK_SIZE, 0);
    }
    assert_eq!(fs::metadata(&path).unwrap().len() % BLOCK_SIZE, 0);
    // Only the finished file is left in the directory.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn same_input_gives_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.hvm"), dir.path().join("b.hvm"));
    assert_eq!(write(&a), write(&b));
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
}

#[test]
fn every_flipped_byte_in_a_section_or_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.hvm");
    write(&path);
    let good = fs::read(&path).unwrap();
    let header = Header::parse(&good).unwrap();
    let copy = dir.path().join("copy.hvm");
    let mut positions = vec![0usize, 9, 17, 70, 100];
    for s in &header.sections {
        positions.extend([s.offset as usize, (s.offset + s.length - 1) as usize]);
    }
    for pos in positions {
        let mut bad = good.clone();
        bad[pos] ^= 0x20;
        let _ = fs::remove_file(&copy);
        fs::write(&copy, &bad).unwrap();
        let err = Artifact::open(&copy).expect_err(&format!("byte {pos} flipped was accepted"));
        let msg = err.to_string();
        assert!(msg.contains("copy.hvm"), "{msg}");
    }
}

#[test]
fn truncated_and_extended_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.hvm");
    write(&path);
    let good = fs::read(&path).unwrap();
    let copy = dir.path().join("copy.hvm");
    for len in [0, 10, 4096, good.len() - 1] {
        fs::write(&copy, &good[..len]).unwrap();
        assert!(
            Artifact::open(&copy).is_err(),
            "truncated to {len} accepted"
        );
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    fs::write(&copy, &longer).unwrap();
    let err = Artifact::open(&copy).unwrap_err().to_string();
    assert!(err.contains("truncated or has trailing bytes"), "{err}");
}

#[test]
fn failed_section_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.hvm");
    let mut w = ArtifactWriter::create(&path).unwrap();
    let r = w
        .section(SectionKind::Rootfs, FLAG_REQUIRED, |_| Err::<(), _>("boom"))
        .unwrap();
    assert_eq!(r, Err("boom"));
    drop(w);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn finished_artifact_is_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.hvm");
    write(&path);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o444
    );
}
