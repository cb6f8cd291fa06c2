//! The app tier on the KVM backend: the QEMU tier's app-level checks, run on
//! hyperboot's own VMM. Needs hardware KVM (vmx/svm); elsewhere every test
//! here says loudly that it was skipped.

use hyper_tests::*;

fn hardware_or_skip(test: &str) -> bool {
    if hardware_kvm() {
        return true;
    }
    skip(
        test,
        "needs hardware KVM (vmx/svm); this host has none or nested PVM KVM",
    );
    false
}

fn assert_run(r: &Run, code: i32, stdout: &str) {
    assert_eq!(r.code, Some(code), "{r:?}");
    assert_eq!(r.stdout, stdout, "{r:?}");
}

#[test]
fn echo_and_exit_codes() {
    if !hardware_or_skip("kvm_app::echo_and_exit_codes") {
        return;
    }
    assert_run(
        &boot_on(
            "kvm",
            busybox_artifact(),
            &["--", "echo", "hello from the guest"],
        ),
        0,
        "hello from the guest\n",
    );
    assert_run(
        &boot_on(
            "kvm",
            busybox_artifact(),
            &["--", "sh", "-c", "echo bye; exit 7"],
        ),
        7,
        "bye\n",
    );
    assert_run(
        &boot_on("kvm", busybox_artifact(), &["--", "sh", "-c", "kill -9 $$"]),
        137,
        "",
    );
}

#[test]
fn image_config_and_overrides() {
    if !hardware_or_skip("kvm_app::image_config_and_overrides") {
        return;
    }
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &["--", "sh", "-c", "echo $GREETING; pwd; id -u"],
    );
    assert_run(&r, 0, "hello\n/srv/app\n0\n");
    let r = boot_on(
        "kvm",
        busybox_artifact(),
        &[
            "-e",
            "GREETING=bye",
            "-w",
            "/tmp",
            "-u",
            "app",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; id -un",
        ],
    );
    assert_run(&r, 0, "bye\n/tmp\napp\n");
}

#[test]
fn writes_vanish_when_the_vm_ends() {
    if !hardware_or_skip("kvm_app::writes_vanish_when_the_vm_ends") {
        return;
    }
    let a = busybox_artifact();
    assert_run(
        &boot_on(
            "kvm",
            a,
            &[
                "--",
                "sh",
                "-c",
                "echo data > /etc/written && cat /etc/written",
            ],
        ),
        0,
        "data\n",
    );
    assert_run(
        &boot_on(
            "kvm",
            a,
            &[
                "--",
                "sh",
                "-c",
                "test -e /etc/written && echo present || echo absent",
            ],
        ),
        0,
        "absent\n",
    );
}
