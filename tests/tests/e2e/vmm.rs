//! The VMM tier: tiny test guests built from `tests/guests/` boot on
//! hyperboot's own KVM VMM. They run on any KVM, nested PVM included; without
//! /dev/kvm each test says loudly that it was skipped.

use hyper_tests::*;

fn kvm_or_skip(test: &str) -> bool {
    if kvm_usable() {
        return true;
    }
    skip(test, "no usable /dev/kvm on this host");
    false
}

fn guest(name: &str, defines: &[&str]) -> std::path::PathBuf {
    guest_artifact(&build_guest(name, defines), &pattern_rootfs(64 * 1024))
}

#[test]
fn console_output_and_exit_code() {
    if !kvm_or_skip("vmm::console_output_and_exit_code") {
        return;
    }
    let r = boot_kvm(&guest("hello", &[]), &[]);
    assert_eq!(r.code, Some(42), "{r:?}");
    assert_eq!(r.stdout, "hello from a test guest\n");
}

#[test]
fn the_exit_port_alone_gives_the_exit_code() {
    if !kvm_or_skip("vmm::the_exit_port_alone_gives_the_exit_code") {
        return;
    }
    let r = boot_kvm(&guest("exitport", &[]), &[]);
    assert_eq!(r.code, Some(7), "{r:?}");
}

#[test]
fn a_spinning_guest_is_stopped_by_the_timeout() {
    if !kvm_or_skip("vmm::a_spinning_guest_is_stopped_by_the_timeout") {
        return;
    }
    let started = std::time::Instant::now();
    let r = boot_kvm(&guest("spin", &[]), &["--timeout", "1"]);
    assert_eq!(r.code, Some(124), "{r:?}");
    assert!(r.stderr.contains("--timeout"), "{r:?}");
    assert!(started.elapsed().as_secs() < 10);
}

#[test]
fn virtio_blk_serves_the_rootfs_read_only() {
    if !kvm_or_skip("vmm::virtio_blk_serves_the_rootfs_read_only") {
        return;
    }
    let r = boot_kvm(&guest("virtio", &["MODE=0"]), &[]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("reads verified, write refused"), "{r:?}");
}

#[test]
fn hostile_virtio_guests_fail_their_requests_not_the_vmm() {
    if !kvm_or_skip("vmm::hostile_virtio_guests_fail_their_requests_not_the_vmm") {
        return;
    }
    let names = ["queue outside memory", "data outside memory", "descriptor loop", "absurd lengths", "unknown registers", "avail index jump", "read-only status"];
    for (i, name) in names.iter().enumerate() {
        let mode = i + 1;
        let r = boot_kvm(&guest("virtio", &[&format!("MODE={mode}")]), &["--timeout", "20"]);
        assert_eq!(r.code, Some(0), "mode {mode} ({name}): {r:?}");
        assert!(r.stdout.contains(&format!("still serves after mode {mode}")), "mode {mode} ({name}): {r:?}");
    }
}
