//! The slow tier: the project's kernel, with an artifact's initrd and rootfs,
//! booted by hyperboot's own KVM VMM. On hardware KVM the app runs to the
//! end; on nested PVM KVM (where a stock kernel's user space cannot make
//! system calls) the test checks the Linux boot protocol up to the kernel
//! handing over to init, on the console. Takes about a minute under PVM.

use hyper_tests::*;

#[test]
fn the_kernel_boots_on_our_vmm_to_init() {
    if !kvm_usable() {
        skip(
            "slow::the_kernel_boots_on_our_vmm_to_init",
            "no usable /dev/kvm on this host",
        );
        return;
    }
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &[
            "--console",
            "--verbose",
            "--timeout",
            "400",
            "--",
            "echo",
            "slow-tier-ok",
        ],
    );
    // The kernel's virtio-console driver did the multiport handshake with
    // the VMM's device: both output ports and the control port are ready
    // before init runs.
    assert!(
        r.stderr.contains("the guest readied 3 console ports"),
        "{}",
        r.stderr
    );
    let console = &r.stdout;
    assert!(
        console.contains("Linux version 6.12"),
        "no kernel banner: {r:?}"
    );
    assert!(
        console.contains("virtio_blk virtio0: [vda]"),
        "the rootfs disk was not found: {}",
        tail(console)
    );
    assert!(
        console.contains("Unpacking initramfs"),
        "no initrd: {}",
        tail(console)
    );
    assert!(
        console.contains("Run /init as init process"),
        "init was not started: {}",
        tail(console)
    );
    if hardware_kvm() {
        assert_eq!(r.code, Some(0), "{}", tail(console));
        assert!(console.contains("slow-tier-ok\n"));
    } else {
        // PVM: init's first system call faults; hyperboot must still end with a clear report.
        assert_eq!(r.code, Some(122), "{r:?}");
        assert!(
            r.stderr.contains("without reporting an exit status"),
            "{}",
            r.stderr
        );
        eprintln!("slow tier: nested PVM KVM, checked the boot up to init only (user space cannot run here)");
    }
}

/// `--cpus 2` and `--net user` on the KVM VMM: the MP table and CPUID
/// describe two processors, the kernel wakes the second with INIT/SIPI on its
/// own thread, its virtio-net driver sets the card up, and the boot goes on
/// to init as with one.
#[test]
fn the_kernel_brings_up_a_second_vcpu_on_our_vmm() {
    if !kvm_usable() {
        skip(
            "slow::the_kernel_brings_up_a_second_vcpu_on_our_vmm",
            "no usable /dev/kvm on this host",
        );
        return;
    }
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &[
            "--cpus",
            "2",
            "--net",
            "user",
            "--verbose",
            "--console",
            "--timeout",
            "400",
            "--",
            "sh",
            "-c",
            // One marked write: hyperinit's --verbose lines share the
            // console and can cut a bare "2" line apart.
            "echo cpus=$(grep -c ^processor /proc/cpuinfo)",
        ],
    );
    let console = &r.stdout;
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "the second vCPU did not come up: {}",
        tail(console)
    );
    // The kernel's virtio-net driver accepted the VMM's card (on passt).
    assert!(
        r.stderr.contains("its driver set the network card up"),
        "{}",
        r.stderr
    );
    assert!(
        !console.contains("APIC ID mismatch"),
        "CPUID and the APIC disagree: {}",
        tail(console)
    );
    assert!(
        console.contains("Run /init as init process"),
        "init was not started: {}",
        tail(console)
    );
    if hardware_kvm() {
        assert_eq!(r.code, Some(0), "{}", tail(console));
        assert!(console.contains("cpus=2"), "{}", tail(console));
    } else {
        assert_eq!(r.code, Some(122), "{r:?}");
    }
}

/// `-v` on the KVM VMM, read by the real kernel's 9p client: the kernel
/// mounts the share itself as its root (`root=vol0 rootfstype=9p`, the
/// initramfs passed over with `rdinit=`) and execs `/probe` from it. That
/// file is no program, so the kernel refuses it with ENOEXEC (-8), which it
/// can only know after reading its first bytes through the VMM's virtio-9p
/// device and 9p server. Needs no guest user space, so it runs under PVM.
#[test]
fn the_kernel_mounts_a_shared_directory_and_reads_from_it() {
    if !kvm_usable() {
        skip(
            "slow::the_kernel_mounts_a_shared_directory_and_reads_from_it",
            "no usable /dev/kvm on this host",
        );
        return;
    }
    let share = tempfile::tempdir_in(scratch()).unwrap();
    std::fs::write(share.path().join("probe"), b"this is not a program\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(share.path().join("probe"), mode).unwrap();
    let out = hyperboot()
        .env(
            "HYPER_KERNEL_ARGS",
            "rdinit=/no-such-init root=vol0 rootfstype=9p \
             rootflags=trans=virtio,version=9p2000.L,msize=262144 init=/probe",
        )
        .args([
            "--backend",
            "kvm",
            "--console",
            "--verbose",
            "--timeout",
            "400",
        ])
        .arg("-v")
        .arg(format!("{}:/data", share.path().display()))
        .arg(busybox_artifact())
        .args(["--", "true"])
        .output()
        .expect("run hyperboot");
    let r = Run::from(out);
    let console = &r.stdout;
    assert!(
        console.contains("VFS: Mounted root (9p filesystem)"),
        "the kernel did not mount the share: {}\nstderr: {}",
        tail(console),
        tail(&r.stderr)
    );
    assert!(
        console.contains("Requested init /probe failed (error -8)"),
        "the kernel did not read /probe through the share: {}",
        tail(console)
    );
    // Its requests were answered, and none was malformed.
    assert!(
        r.stderr.contains(", 0 malformed refused") && !r.stderr.contains("vol0: 0 9p"),
        "{}",
        r.stderr
    );
    // The host's file is as it was (the kernel mounts its root read-only).
    assert_eq!(
        std::fs::read(share.path().join("probe")).unwrap(),
        b"this is not a program\n"
    );
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(3000)..]
}
