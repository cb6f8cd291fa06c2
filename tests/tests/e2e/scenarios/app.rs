//! The app-level scenarios: a busybox image becomes an artifact that boots
//! and runs its app; each body is written once and run on both backends
//! (`qemu::app::NAME` in the qemu tier, `kvm_app::app::NAME` in the nested tier).

use std::fs;

use hyper_tests::*;

use super::{assert_run, layout_with_layer, oci_layout_of};

/// Every scenario of this file, as a test on `$backend`.
macro_rules! app_scenarios {
    ($backend:expr) => {
        scenarios!($backend; app:
            echo_reaches_stdout_byte_exact,
            exit_codes_pass_through,
            stdout_and_stderr_are_separate_binary_safe_and_complete,
            image_config_is_what_the_app_sees,
            command_line_overrides_the_image_config,
            user_from_the_image_config,
            writes_vanish_when_the_vm_ends,
            upper_keeps_the_roots_writes_in_overlayfs_form,
            layers_are_flattened_with_whiteouts,
            a_guest_that_never_stops_is_ended_by_the_timeout,
            sigterm_ends_the_vm,
            docker_generated_files_and_limits,
            read_only_root_and_tmpfs_mounts,
            sparse_files_read_back_exactly_in_the_guest,
            compressed_files_read_back_exactly_in_the_guest,
            env_file_then_e_flags_as_in_docker,
            the_guest_clock_is_the_hosts,
            the_guests_timers_keep_the_hosts_time,
            sigterm_delivers_the_stop_signal_to_the_app,
            an_app_ignoring_the_stop_signal_is_killed_after_the_stop_timeout,
            a_signal_to_the_process_group_reaches_the_app_once,
            a_second_stop_signal_ends_the_vm_at_once,
            a_stopped_and_continued_hyperboot_carries_on,
            the_apps_writes_fail_once_nobody_reads_its_output,
            a_killed_hyperboot_leaves_no_helper_behind,
            stats_describe_the_boot,
            file_capabilities_from_pax_xattrs_work_in_the_guest,
            volumes_share_host_directories_and_persist,
            image_volumes_get_a_fresh_writable_copy,
            cpus_and_memory_are_what_the_guest_gets,
            interactive_stdin_reaches_the_app_and_ends_with_eof,
            tty_gives_the_app_a_terminal_and_ctrl_c_reaches_it,
            xattrs_and_acls_read_back_through_the_guest_kernel,
        );
    };
}

pub fn echo_reaches_stdout_byte_exact(b: Backend) {
    let r = b.boot(busybox_artifact(), &["--", "echo", "hello from the guest"]);
    assert_run(&r, 0, "hello from the guest\n");
}

pub fn exit_codes_pass_through(b: Backend) {
    let r = b.boot(busybox_artifact(), &["--", "sh", "-c", "echo bye; exit 7"]);
    assert_run(&r, 7, "bye\n");
    let r = b.boot(busybox_artifact(), &["--", "sh", "-c", "kill -9 $$"]);
    assert_run(&r, 137, "");
    let r = b.boot(busybox_artifact(), &["--", "no-such-command"]);
    assert_eq!(r.code, Some(127), "{r:?}");
    assert!(r.stderr.contains("executable file not found"), "{r:?}");
    assert_eq!(r.stdout, "", "the error goes to stderr, as with docker run");
}

pub fn stdout_and_stderr_are_separate_binary_safe_and_complete(b: Backend) {
    // 8 MiB of random bytes on stdout, their digest on stderr; a slow reader
    // on hyperboot's stdout must not cost a byte.
    let out = b.hyperboot()
        .args(["--timeout", "120", "-m", "256M"])
        .arg(busybox_artifact())
        .args([
            "--",
            "sh",
            "-c",
            "head -c 8388608 /dev/urandom > /tmp/r; cat /tmp/r; sha256sum /tmp/r | cut -d' ' -f1 >&2; printf 'no newline' >&2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read stdout slowly at first: the pipe fills and everything backs up.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let o = out.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(o.stdout.len(), 8 << 20);
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{digest}\nno newline")),
        "stderr: {err}"
    );
}

pub fn image_config_is_what_the_app_sees(b: Backend) {
    let r = b.boot(
        busybox_artifact(),
        &[
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; id -u; echo $HOME; echo $PATH",
        ],
    );
    assert_run(
        &r,
        0,
        "hello\n/srv/app\n0\n/root\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    );
}

pub fn command_line_overrides_the_image_config(b: Backend) {
    let r = b.boot(
        busybox_artifact(),
        &[
            "-e",
            "GREETING=bye",
            "-e",
            "EXTRA=1",
            "-w",
            "/tmp",
            "-u",
            "app",
            "--hostname",
            "box",
            "--",
            "sh",
            "-c",
            "echo $GREETING $EXTRA; pwd; id; hostname; echo $HOME",
        ],
    );
    assert_run(
        &r,
        0,
        "bye 1\n/tmp\nuid=1000(app) gid=1000(app) groups=50(staff),1000(app)\nbox\n/home/app\n",
    );
    let r = b.boot(busybox_artifact(), &["-u", "1234:4321", "--", "id"]);
    assert_run(&r, 0, "uid=1234 gid=4321 groups=4321\n");
    let r = b.boot(
        busybox_artifact(),
        &["--entrypoint", "/bin/echo", "--", "a", "b"],
    );
    assert_run(&r, 0, "a b\n");
}

pub fn user_from_the_image_config(b: Backend) {
    let layout = scratch().join("user-layout");
    make_image(&layout, "v1", "app");
    let art = scratch().join("user.hvm");
    let o = build(&layout, &art);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = b.boot(
        &art,
        &[
            "--",
            "sh",
            "-c",
            "id -un; echo $HOME; touch /srv/app/x 2>/dev/null || echo cannot-write",
        ],
    );
    assert_run(&r, 0, "app\n/home/app\ncannot-write\n");
    let r = b.boot(&art, &["-u", "ghost", "--", "true"]);
    assert_eq!(r.code, Some(123), "{r:?}");
    assert!(r.stderr.contains("unable to find user ghost"), "{r:?}");
}

pub fn writes_vanish_when_the_vm_ends(b: Backend) {
    let a = busybox_artifact();
    let r = b.boot(
        a,
        &[
            "--",
            "sh",
            "-c",
            "echo data > /etc/written && cat /etc/written && rm /bin/ls && echo removed",
        ],
    );
    assert_run(&r, 0, "data\nremoved\n");
    let r = b.boot(
        a,
        &[
            "--",
            "sh",
            "-c",
            "test -e /etc/written && echo present || echo absent; test -e /bin/ls && echo ls-back",
        ],
    );
    assert_run(&r, 0, "absent\nls-back\n");
}

/// `--upper DIR`: the root's writes land in DIR/fs as overlayfs keeps an
/// upper layer (files, a whiteout for a removed file, an opaque directory),
/// which containerd's snapshotter reads; the next run with DIR sees them,
/// a run without it sees the image.
pub fn upper_keeps_the_roots_writes_in_overlayfs_form(b: Backend) {
    // On a disk: tmpfs before Linux 6.6 (the nested host's) keeps no user.*
    // attributes, which hyperboot refuses.
    let dir = tempfile::tempdir_in(disk_scratch()).unwrap();
    let upper = dir.path().join("c1");
    let flag = upper.display().to_string();
    let script = "echo data > /etc/written && rm /bin/ls && rm -r /home && mkdir /home \
        && echo mine > /home/only && echo done";
    let r = b.boot(
        busybox_artifact(),
        &["--upper", &flag, "--", "sh", "-c", script],
    );
    assert_run(&r, 0, "done\n");
    let fs_ = upper.join("fs");
    assert_eq!(
        fs::read_to_string(fs_.join("etc/written")).unwrap(),
        "data\n"
    );
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = fs::symlink_metadata(fs_.join("bin/ls")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "a removed file is a 0:0 whiteout: {wh:?}"
    );
    let mut v = [0u8; 8];
    let home =
        std::ffi::CString::new(fs_.join("home").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: two NUL-terminated strings and a buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            home.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    assert_eq!(
        (n, v[0]),
        (1, b'y'),
        "a directory made over a removed one is opaque"
    );
    assert!(upper.join("work").is_dir());
    let check = "cat /etc/written 2>/dev/null || echo no-file; test -e /bin/ls || echo ls-gone; echo /home/*";
    let r = b.boot(
        busybox_artifact(),
        &["--upper", &flag, "--", "sh", "-c", check],
    );
    assert_run(&r, 0, "data\nls-gone\n/home/only\n");
    // Without it, the image as it was.
    let r = b.boot(busybox_artifact(), &["--", "sh", "-c", check]);
    assert_run(&r, 0, "no-file\n/home/app\n");
    // Not a directory: one clear error, nothing booted.
    let file = dir.path().join("file");
    fs::write(&file, "x").unwrap();
    let r = b.boot(
        busybox_artifact(),
        &["--upper", &file.display().to_string(), "--", "true"],
    );
    assert_eq!(r.code, Some(125), "{r:?}");
    assert!(r.stderr.contains("--upper"), "{r:?}");
}

pub fn layers_are_flattened_with_whiteouts(b: Backend) {
    let r = b.boot(
        busybox_artifact(),
        &[
            "--",
            "sh",
            "-c",
            "cat /etc/motd; ls -A /opt; stat -c %a /tmp",
        ],
    );
    assert_run(&r, 0, "layer two\n1777\n");
}

pub fn a_guest_that_never_stops_is_ended_by_the_timeout(b: Backend) {
    let out = b
        .hyperboot()
        .args(["--timeout", "8"])
        .arg(busybox_artifact())
        .args(["--", "sleep", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout"));
}

/// SIGTERM to hyperboot stops the app through the graceful path: the app
/// gets the signal and its status (143) is hyperboot's, well before the stop
/// timeout would have killed it.
pub fn sigterm_ends_the_vm(b: Backend) {
    let (code, out, secs) = stop_app(b, &["--stop-timeout", "60"], "echo ready; exec sleep 1000");
    assert_eq!((code, out.as_str()), (Some(143), "ready\n"));
    assert!(
        secs < 50.0,
        "the stop took {secs} s: the app did not get the signal"
    );
}

pub fn docker_generated_files_and_limits(b: Backend) {
    let r = b.boot(
        busybox_artifact(),
        &[
            "--net",
            "user",
            "--hostname",
            "box",
            "--",
            "sh",
            "-c",
            "cat /etc/hostname; grep -c 'localhost' /etc/hosts; grep box /etc/hosts; ulimit -n",
        ],
    );
    // As Docker: the hostname resolves to the guest's address on its network
    // (user mode: the QEMU backend's default; the KVM backend's with -p)…
    assert_run(&r, 0, "box\n2\n10.0.2.15\tbox\n1048576\n");
    // …and to 127.0.1.1 without one.
    let r = b.boot(
        busybox_artifact(),
        &[
            "--net",
            "none",
            "--hostname",
            "box",
            "--",
            "grep",
            "box",
            "/etc/hosts",
        ],
    );
    assert_run(&r, 0, "127.0.1.1\tbox\n");
}

pub fn read_only_root_and_tmpfs_mounts(b: Backend) {
    let r = b.boot(
        busybox_artifact(),
        &["--read-only", "--tmpfs", "/scratch", "--tmpfs", "/cache:size=1m", "--", "sh", "-c",
          "touch /etc/new 2>/dev/null || echo root-is-read-only; echo x > /scratch/f && cat /scratch/f; grep -c ' /cache tmpfs .*size=1024k' /proc/mounts; cat /etc/hostname >/dev/null && echo hostname-present"],
    );
    assert_run(&r, 0, "root-is-read-only\nx\n1\nhostname-present\n");
    let r = b.boot(
        busybox_artifact(),
        &["--tmpfs", "relative/path", "--", "true"],
    );
    assert_eq!(r.code, Some(123), "{r:?}");
    assert!(r.stderr.contains("--tmpfs relative/path"), "{}", r.stderr);
}

pub fn sparse_files_read_back_exactly_in_the_guest(b: Backend) {
    use sha2::{Digest, Sha256};
    const SIZE: usize = 64 << 20;
    let mut data = vec![0u8; SIZE];
    data[..4].copy_from_slice(b"head");
    data[SIZE / 2..SIZE / 2 + 6].copy_from_slice(b"middle");
    data[SIZE - 3..].copy_from_slice(b"end");
    let mut tb = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(SIZE as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tb.append_data(&mut h, "big.img", &data[..]).unwrap();
    let layout = layout_with_layer("sparse-layout", &tb.into_inner().unwrap());
    let art = scratch().join("sparse.hvm");
    let o = build(&layout, &art);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rootfs = hvm::Artifact::open(&art)
        .unwrap()
        .section(hvm::SectionKind::Rootfs)
        .length;
    assert!(
        rootfs < 8 << 20,
        "64 MiB of mostly zeros cost {rootfs} bytes of rootfs"
    );
    let r = b.boot(&art, &["--", "sh", "-c", "stat -c %s /big.img; head -c 4 /big.img; echo; dd if=/big.img bs=1 skip=33554432 count=6 2>/dev/null; echo; tail -c 3 /big.img; echo; sha256sum /big.img | cut -c1-64"]);
    let want = format!(
        "{SIZE}\nhead\nmiddle\nend\n{}\n",
        hex::encode(Sha256::digest(&data))
    );
    assert_run(&r, 0, &want);
}

/// Compressed contents (LZ4, hyperbuild's default, and Zstandard, which
/// Debian's fsck.erofs cannot read) read back exactly by the guest kernel:
/// extents that compressed, chunks kept plain, chunks of zeros, partial last
/// chunks, and reads that start inside an extent.
pub fn compressed_files_read_back_exactly_in_the_guest(b: Backend) {
    compressed_read_back(b, "lz4");
    compressed_read_back(b, "zstd");
}

fn compressed_read_back(b: Backend, compression: &str) {
    use sha2::{Digest, Sha256};
    const CHUNK: usize = 128 << 10;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let text = |n: usize| -> Vec<u8> {
        let words: [&[u8]; 5] = [b"layer ", b"image ", b"kernel ", b"extent\n", b"boot "];
        let mut out = Vec::with_capacity(n + 8);
        let mut i = 3usize;
        while out.len() < n {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            out.extend_from_slice(words[(i >> 16) % words.len()]);
        }
        out.truncate(n);
        out
    };
    let mut mixed = Vec::new();
    for i in 0..9 {
        match i % 3 {
            0 => mixed.extend(text(CHUNK)),
            1 => mixed.extend(noise(CHUNK)),
            _ => mixed.extend(vec![0u8; CHUNK]),
        }
    }
    mixed.extend(text(5000));
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("text", text(3 << 20)),
        ("noise", noise(300_000)),
        ("mixed", mixed),
        ("small", text(5000)),
        ("edge", text(CHUNK)),
    ];
    let mut tb = tar::Builder::new(Vec::new());
    for (name, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        tb.append_data(&mut h, format!("z/{name}"), &data[..])
            .unwrap();
    }
    let layout = layout_with_layer("compressed-layout", &tb.into_inner().unwrap());
    let with = |c: &str| {
        let art = scratch().join(format!("compressed-{c}.hvm"));
        let o = build_with(&layout, &art, &["--compress", c]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        art
    };
    let (art, plain) = (with(compression), with("none"));
    let rootfs = |a: &std::path::Path| {
        hvm::Artifact::open(a)
            .unwrap()
            .section(hvm::SectionKind::Rootfs)
            .length
    };
    let (packed, unpacked) = (rootfs(&art), rootfs(&plain));
    assert!(
        packed * 10 < unpacked * 7,
        "{compression} rootfs {packed} bytes against {unpacked} uncompressed"
    );
    // Whole files, then 4 KiB reads starting in the middle of extents.
    let script = "cd /z && sha256sum text noise mixed small edge | cut -c1-64 && \
        for at in 1 37 65 300; do dd if=mixed bs=4096 skip=$at count=1 2>/dev/null | sha256sum | cut -c1-64; done";
    let r = b.boot(&art, &["--", "sh", "-c", script]);
    let mut want = String::new();
    for (_, data) in &files {
        want.push_str(&format!("{}\n", hex::encode(Sha256::digest(data))));
    }
    let mixed = &files[2].1;
    for at in [1usize, 37, 65, 300] {
        let part = &mixed[(at * 4096).min(mixed.len())..((at + 1) * 4096).min(mixed.len())];
        want.push_str(&format!("{}\n", hex::encode(Sha256::digest(part))));
    }
    assert_run(&r, 0, &want);
}

pub fn env_file_then_e_flags_as_in_docker(b: Backend) {
    let f = scratch().join("app.env");
    fs::write(
        &f,
        "# settings\nA=from-file\nB=from-file\n\nGREETING=file\n",
    )
    .unwrap();
    let r = b.boot(
        busybox_artifact(),
        &[
            "--env-file",
            f.to_str().unwrap(),
            "-e",
            "B=from-flag",
            "--",
            "sh",
            "-c",
            "echo $A $B $GREETING",
        ],
    );
    assert_run(&r, 0, "from-file from-flag file\n");
    let r = b.boot(
        busybox_artifact(),
        &["--env-file", "/no/such/file", "--", "true"],
    );
    assert_eq!(r.code, Some(125));
    assert!(
        r.stderr.contains("--env-file /no/such/file"),
        "{}",
        r.stderr
    );
}

pub fn the_guest_clock_is_the_hosts(b: Backend) {
    let r = b.boot(busybox_artifact(), &["--", "date", "+%s"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let guest: i64 = r
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a time: {r:?}"));
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (host - guest).abs() < 300,
        "guest clock {guest}, host {host}"
    );
}

/// A `sleep 2` in the guest wakes after two seconds of its clock, and those
/// are two seconds of the host's: a timer that never fires (a lost local
/// APIC timer or TSC deadline after a restore) ends in the timeout, and a
/// guest clock running fast or slow (a wrong TSC frequency) disagrees with
/// the host's clock between the arrivals of the two lines the guest prints.
pub fn the_guests_timers_keep_the_hosts_time(b: Backend) {
    use std::io::BufRead;

    let mut child = b
        .hyperboot()
        .args(["--timeout", "120"])
        .arg(busybox_artifact())
        .args([
            "--",
            "sh",
            "-c",
            "cut -d' ' -f1 /proc/uptime; sleep 2; cut -d' ' -f1 /proc/uptime",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Each line with the host's time of its arrival.
    let lines: Vec<(String, std::time::Instant)> =
        std::io::BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map(|l| (l.unwrap(), std::time::Instant::now()))
            .collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}, printed {lines:?}");
    let [(before, t0), (after, t1)] = &lines[..] else {
        panic!("two uptimes expected, got {lines:?}");
    };
    let uptime = |s: &str| -> f64 { s.parse().unwrap_or_else(|_| panic!("not an uptime: {s:?}")) };
    let slept = uptime(after) - uptime(before);
    let host = t1.duration_since(*t0).as_secs_f64();
    assert!(
        (2.0..10.0).contains(&slept),
        "sleep 2 took {slept:.3} s of the guest's clock"
    );
    // The host's interval also holds each line's way out (milliseconds here,
    // more under emulation), so it may be longer, but not much shorter.
    assert!(
        host > 0.8 * slept && host < slept + 3.0,
        "the guest's clock saw {slept:.3} s pass between two lines, the host's {host:.3} s"
    );
}

/// Where a test's signal goes: hyperboot's pid, or its whole process group
/// (as a terminal's Ctrl-C, `timeout`, or systemd's control-group kill do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    Pid,
    Group,
}

/// Starts hyperboot on `app` in a process group of its own, waits for the
/// app's first line, then sends `signals` a second apart; returns (exit
/// code, whole stdout, seconds from the first signal to the exit).
fn signal_app(
    b: Backend,
    extra: &[&str],
    app: &str,
    signals: &[(To, i32)],
) -> (Option<i32>, String, f64) {
    use std::io::{BufRead, Read};
    use std::os::unix::process::CommandExt;
    let mut child = b
        .hyperboot()
        .args(["--timeout", "120"])
        .args(extra)
        .arg(busybox_artifact())
        .args(["--", "sh", "-c", app])
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let t = std::time::Instant::now();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let signals = signals.to_vec();
    let sender = std::thread::spawn(move || {
        for (i, (to, sig)) in signals.into_iter().enumerate() {
            if i > 0 && rx.recv_timeout(std::time::Duration::from_secs(1)).is_ok() {
                return; // hyperboot has exited
            }
            let target = if to == To::Group { -pid } else { pid };
            // SAFETY: kill() takes no pointers.
            unsafe { libc::kill(target, sig) };
        }
    });
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let code = child.wait().unwrap().code();
    let secs = t.elapsed().as_secs_f64();
    drop(tx);
    sender.join().unwrap();
    (code, first + &rest, secs)
}

/// SIGTERM to hyperboot's pid, as `docker stop` sends.
fn stop_app(b: Backend, extra: &[&str], app: &str) -> (Option<i32>, String, f64) {
    signal_app(b, extra, app, &[(To::Pid, libc::SIGTERM)])
}

/// A terminal's Ctrl-C (SIGINT to the whole foreground group) reaches the
/// app exactly once, as its stop signal (SIGTERM here), through hyperboot's
/// graceful stop: the VM's helpers (QEMU, passt) are in groups of their own
/// and do not die of it.
pub fn a_signal_to_the_process_group_reaches_the_app_once(b: Backend) {
    let app = "n=0; trap 'n=$((n+1)); echo got-term-$n' TERM; echo ready; \
               while [ $n -eq 0 ]; do sleep 0.1; done; sleep 2; echo bye; exit 5";
    let (code, out, _) = signal_app(b, &["--net", "user"], app, &[(To::Group, libc::SIGINT)]);
    assert_eq!((code, out.as_str()), (Some(5), "ready\ngot-term-1\nbye\n"));
}

/// A second SIGTERM while the app takes its time to stop ends the VM at
/// once (128 + 15), long before the stop timeout.
pub fn a_second_stop_signal_ends_the_vm_at_once(b: Backend) {
    let app = "trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done";
    for to in [To::Pid, To::Group] {
        let (code, out, secs) = signal_app(
            b,
            &["--stop-timeout", "60"],
            app,
            &[(to, libc::SIGTERM), (to, libc::SIGTERM)],
        );
        assert_eq!(
            (code, out.as_str()),
            (Some(143), "ready\ngot-term\n"),
            "{to:?}"
        );
        assert!(secs < 30.0, "{to:?}: ended after {secs} s");
    }
}

/// Ctrl-Z then `fg` (SIGTSTP and SIGCONT to the foreground group), and
/// SIGSTOP then SIGCONT to hyperboot alone (a debugger, `kill -STOP`): the
/// VM pauses and goes on, and the app ends as it would have. Each of
/// hyperboot's threads sleeping with a timeout is resumed by the kernel
/// through `restart_syscall`, which its seccomp filters must allow.
pub fn a_stopped_and_continued_hyperboot_carries_on(b: Backend) {
    let (code, out, _) = signal_app(
        b,
        &[],
        "echo ready; sleep 6; echo done",
        &[
            (To::Group, libc::SIGTSTP),
            (To::Group, libc::SIGCONT),
            (To::Pid, libc::SIGSTOP),
            (To::Pid, libc::SIGCONT),
        ],
    );
    assert_eq!((code, out.as_str()), (Some(0), "ready\ndone\n"));
}

/// `hyperboot … | head -1`: once the reader of hyperboot's stdout has gone,
/// the app's own writes fail as in a shell pipeline: `yes` dies of SIGPIPE
/// (141), and an app that ignores SIGPIPE gets EPIPE and goes on (busybox
/// `yes` then stops with an error). Before, the VM ran on, its output
/// dropped, until something killed it.
pub fn the_apps_writes_fail_once_nobody_reads_its_output(b: Backend) {
    use std::io::{BufRead, Read};
    let run = |app: &str| {
        let mut child = b
            .hyperboot()
            .args(["--timeout", "120"])
            .arg(busybox_artifact())
            .args(["--", "sh", "-c", app])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        drop(out); // as `head -1` exits
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (first, child.wait().unwrap().code(), err)
    };
    let (first, code, err) = run("yes");
    assert_eq!((first.as_str(), code), ("y\n", Some(141)), "{err}");
    let (first, code, err) = run("trap '' PIPE; yes; echo \"yes ended $?\" >&2");
    assert_eq!((first.as_str(), code), ("y\n", Some(0)), "{err}");
    assert!(
        err.contains("Broken pipe") && err.contains("yes ended 1"),
        "{err}"
    );
}

/// Killing hyperboot outright (SIGKILL, no chance to clean up) leaves none of
/// its helper processes behind: QEMU, passt die with it.
pub fn a_killed_hyperboot_leaves_no_helper_behind(b: Backend) {
    use std::io::BufRead;
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let mut child = b
        .hyperboot()
        .env("TMPDIR", tmp.path())
        .args(["--timeout", "120", "-p"])
        .arg(format!("127.0.0.1:{port}:8080"))
        .arg(busybox_artifact())
        .args(["--", "sh", "-c", "echo ready; sleep 1000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "ready\n");
    let pid = child.id();
    let helpers = children_of(pid);
    let want = match b {
        Backend::Qemu => "qemu-system",
        Backend::Kvm | Backend::KvmRestored => "passt",
    };
    assert!(
        helpers.iter().any(|(_, name)| name.starts_with(want)),
        "no {want} among {helpers:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while helpers
        .iter()
        .any(|(p, _)| std::path::Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "helpers outlived hyperboot: {helpers:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(
        left.is_empty(),
        "temporary files outlived hyperboot: {left:?}"
    );
}

/// The processes whose parent is `pid`: (pid, command name).
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
        else {
            continue;
        };
        if rest.split(' ').nth(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid) {
            out.push((p, comm.to_string()));
        }
    }
    out
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false)
}

pub fn sigterm_delivers_the_stop_signal_to_the_app(b: Backend) {
    let (code, out, _) = stop_app(
        b,
        &[],
        "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.1; done",
    );
    assert_eq!((code, out.as_str()), (Some(3), "ready\ngot-term\n"));
}

pub fn an_app_ignoring_the_stop_signal_is_killed_after_the_stop_timeout(b: Backend) {
    let (code, out, secs) = stop_app(
        b,
        &["--stop-timeout", "2"],
        "trap '' TERM; echo ready; while true; do sleep 0.1; done",
    );
    assert_eq!((code, out.as_str()), (Some(137), "ready\n"));
    assert!((1.5..15.0).contains(&secs), "stopped after {secs} s");
}

/// security.capability xattrs reach the image and the guest kernel honours
/// them: a busybox copy granted CAP_NET_BIND_SERVICE binds port 80 as an
/// unprivileged user; the plain one cannot.
pub fn file_capabilities_from_pax_xattrs_work_in_the_guest(b: Backend) {
    // VFS_CAP_REVISION_2 | EFFECTIVE, permitted = CAP_NET_BIND_SERVICE (10).
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let bb = fs::read("/bin/busybox").expect("busybox-static");
    let mut tb = tar::Builder::new(Vec::new());
    tb.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(bb.len() as u64);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tb.append_data(&mut h, "bin/busybox-cap", &bb[..]).unwrap();
    let layout = layout_with_layer("cap-layout", &tb.into_inner().unwrap());
    let art = scratch().join("cap.hvm");
    let o = build(&layout, &art);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = "/bin/busybox-cap nc -l -p 80 & sleep 1; cat /proc/net/tcp /proc/net/tcp6 | grep -c ':0050 [0-9A-F]*:0000 0A '; \
                  busybox nc -l -p 81 2>&1 | head -c 40; echo";
    let r = b.boot(&art, &["-u", "app", "--", "sh", "-c", script]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"1"),
        "the capable copy did not listen on :80: {r:?}"
    );
    assert!(
        r.stdout.contains("Permission denied"),
        "the plain busybox could bind :81 as app: {r:?}"
    );
}

/// `-v`: what the app sees and does in a read-write and a read-only share
/// lands in (or stays out of) the host directories and outlives the VM:
/// renames, symlinks, 4 MiB intact; a missing host directory is created.
pub fn volumes_share_host_directories_and_persist(b: Backend) {
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    fs::write(rw.path().join("in"), "from the host\n").unwrap();
    fs::write(ro.path().join("f"), "read me\n").unwrap();
    let rw_flag = format!("{}:/data", rw.path().display());
    let ro_flag = format!("{}:/config:ro", ro.path().display());
    let script = "cat /data/in /config/f; echo written > /data/out; \
        echo x > /config/g 2>/dev/null || echo ro-refused; \
        mkdir -p /data/d/e && echo deep > /data/d/e/f && mv /data/d /data/moved && ls /data/moved/e; \
        ln -s moved/e/f /data/link && cat /data/link; \
        dd if=/dev/urandom of=/data/big bs=64k count=64 2>/dev/null; \
        sha256sum /data/big | cut -c1-64 > /data/big.sum; rm /data/in; ls /data";
    let r = b.boot(
        busybox_artifact(),
        &[
            "-v",
            &rw_flag,
            "-v",
            &ro_flag,
            "--read-only",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert_run(
        &r,
        0,
        "from the host\nread me\nro-refused\nf\ndeep\nbig\nbig.sum\nlink\nmoved\nout\n",
    );
    let host = |p: &str| rw.path().join(p);
    assert_eq!(fs::read_to_string(host("out")).unwrap(), "written\n");
    assert_eq!(fs::read_to_string(host("moved/e/f")).unwrap(), "deep\n");
    assert_eq!(
        fs::read_link(host("link")).unwrap(),
        std::path::Path::new("moved/e/f")
    );
    assert!(!ro.path().join("g").exists() && !host("in").exists());
    use sha2::Digest;
    let big = fs::read(host("big")).unwrap();
    assert_eq!(big.len(), 4 << 20);
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&big)),
        fs::read_to_string(host("big.sum")).unwrap().trim(),
        "4 MiB written by the guest arrive intact"
    );
    // The data outlives the VM: the next one sees it.
    let r = b.boot(
        busybox_artifact(),
        &["-v", &rw_flag, "--", "cat", "/data/out"],
    );
    assert_run(&r, 0, "written\n");
    // A missing host directory is created, as by docker run.
    let fresh = rw.path().join("new/dir");
    let r = b.boot(
        busybox_artifact(),
        &[
            "-v",
            &format!("{}:/n", fresh.display()),
            "--",
            "touch",
            "/n/made",
        ],
    );
    assert_run(&r, 0, "");
    assert!(fresh.join("made").exists());
    for (bad, want) in [
        ("data:/data", "named volumes"),
        ("/tmp:relative", "absolute"),
    ] {
        let r = b.boot(busybox_artifact(), &["-v", bad, "--", "true"]);
        assert_eq!(r.code, Some(125), "{r:?}");
        assert!(r.stderr.contains(want), "{r:?}");
    }
}

pub fn image_volumes_get_a_fresh_writable_copy(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("var/lib/app")).unwrap();
    fs::write(root.join("var/lib/app/seed"), "seeded by the image\n").unwrap();
    let layout = dir.path().join("layout");
    let out = std::process::Command::new(repo().join("scripts/make-test-image"))
        .arg(&layout)
        .env("EXTRA_ROOT", &root)
        .env(
            "IMAGE_CONFIG",
            r#"{"Env":["PATH=/usr/bin:/bin"],"Cmd":["sh"],"Volumes":{"/var/lib/app":{}}}"#,
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let artifact = dir.path().join("vol.hvm");
    let o = build(&layout, &artifact);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Writable even with --read-only, and filled with the image's content.
    let r = b.boot(
        &artifact,
        &["--read-only", "--", "sh", "-c",
          "cat /var/lib/app/seed; echo w > /var/lib/app/new && echo writable; touch /etc/x 2>/dev/null || echo root-read-only"],
    );
    assert_run(&r, 0, "seeded by the image\nwritable\nroot-read-only\n");
}

pub fn cpus_and_memory_are_what_the_guest_gets(b: Backend) {
    // Two vCPUs on a loaded 2-core host at TCG speed (the nested tier) can
    // take minutes to boot: the bound is for a hang, not for speed.
    let r = b.boot(
        busybox_artifact(),
        &[
            "--timeout",
            "400",
            "--cpus",
            "2",
            "-m",
            "200M",
            "--",
            "sh",
            "-c",
            "nproc; grep MemTotal /proc/meminfo",
        ],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("2"));
    let kb: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((150_000..=204_800).contains(&kb), "MemTotal {kb} kB");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 64 {
        let r = b.boot(busybox_artifact(), &["--cpus", "64", "--", "true"]);
        assert_eq!(r.code, Some(125), "{r:?}");
        assert!(r.stderr.contains("this host has"), "{r:?}");
    }
    let r = b.boot(busybox_artifact(), &["-m", "100000G", "--", "true"]);
    assert_eq!(r.code, Some(125), "{r:?}");
    assert!(r.stderr.contains("MiB"), "{r:?}");
}

pub fn interactive_stdin_reaches_the_app_and_ends_with_eof(b: Backend) {
    use std::io::Write;
    let mut child = b
        .hyperboot()
        .args(["--timeout", "120", "-i"])
        .arg(busybox_artifact())
        .args(["--", "sh", "-c", "wc -l; cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"one\ntwo\nthree\n").unwrap();
    drop(stdin); // end of file: wc must finish and see 3 lines
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "3");
    // 3 MiB, more than the VMM holds for a guest that has not read yet,
    // arrive whole.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let mut child = b
        .hyperboot()
        .args(["--timeout", "120", "-i"])
        .arg(busybox_artifact())
        .args(["--", "sh", "-c", "sha256sum | cut -c1-64"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = std::thread::spawn(move || stdin.write_all(&data).map(|_| data));
    let o = child.wait_with_output().unwrap();
    let data = feed.join().unwrap().unwrap();
    use sha2::Digest;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        hex::encode(sha2::Sha256::digest(&data))
    );
    // Without -i the app's stdin is empty, as with docker run.
    let r = b.boot(busybox_artifact(), &["--", "sh", "-c", "wc -c"]);
    assert_run(&r, 0, "0\n");
}

/// A pseudo-terminal of `rows` x `cols` for hyperboot: (master, slave).
fn pty(rows: u16, cols: u16) -> (fs::File, fs::File) {
    use std::os::fd::FromRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors; the winsize pointer is live.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors are new and ours.
    unsafe { (fs::File::from_raw_fd(m), fs::File::from_raw_fd(s)) }
}

pub fn tty_gives_the_app_a_terminal_and_ctrl_c_reaches_it(b: Backend) {
    use std::io::{Read, Write};
    let (mut master, slave) = pty(33, 101);
    let mut child = b.hyperboot()
        .args(["--timeout", "120", "-it"])
        .arg(busybox_artifact())
        .args([
            "--",
            "sh",
            "-c",
            "tty; stty size; trap 'echo got-int; exit 9' INT; echo ready; read line; echo \"typed: $line\"; while :; do sleep 0.1; done",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    // Reads the terminal until `want` shows up.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |want: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !seen.contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("never saw {want:?}; saw {seen:?}"),
            }
        }
        seen.clone()
    };
    let out = wait_for("ready");
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert!(out.contains("33 101"), "the host terminal's size: {out:?}");
    master.write_all(b"hello there\r").unwrap();
    wait_for("typed: hello there");
    master.write_all(&[3]).unwrap(); // Ctrl-C: a byte for the app's terminal
    wait_for("got-int");
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(9),
        "the app's own exit code, not hyperboot's SIGINT"
    );
}

/// A static helper for the guest: prints every extended attribute of each
/// path as `path name=hex`, in the kernel's listing order.
const GETX_C: &str = r#"
#include <stdio.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {
    static char names[65536];
    static unsigned char value[65536];
    for (int i = 1; i < argc; i++) {
        ssize_t n = llistxattr(argv[i], names, sizeof names);
        if (n < 0) { perror(argv[i]); return 1; }
        for (char *p = names; p < names + n; p += strlen(p) + 1) {
            ssize_t v = lgetxattr(argv[i], p, value, sizeof value);
            if (v < 0) { perror(p); return 1; }
            printf("%s %s=", argv[i], p);
            for (ssize_t k = 0; k < v; k++) printf("%02x", value[k]);
            printf("\n");
        }
    }
    return 0;
}
"#;

/// The POSIX ACL xattr format: version 2, then (tag, perm, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

pub fn xattrs_and_acls_read_back_through_the_guest_kernel(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("getx.c");
    fs::write(&src, format!("#include <string.h>\n{GETX_C}")).unwrap();
    let getx = dir.path().join("getx");
    let o = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&getx)
        .arg(&src)
        .output()
        .expect("gcc (build-essential)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // user.* (text and binary), trusted.*, an access and a default ACL, a file
    // capability: each as a PAX SCHILY.xattr record, as docker save writes them.
    let access = acl(&[
        (0x01, 6, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ]);
    let default = acl(&[
        (0x01, 7, u32::MAX),
        (0x04, 5, u32::MAX),
        (0x20, 5, u32::MAX),
    ]);
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes()); // v2, effective
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes()); // CAP_NET_BIND_SERVICE
    type Attrs = Vec<(&'static str, Vec<u8>)>;
    let files: Vec<(&str, Attrs)> = vec![
        (
            "x/plain",
            vec![
                ("user.comment", b"hello".to_vec()),
                ("user.bin", vec![0, 0xff, 7]),
            ],
        ),
        ("x/trusted", vec![("trusted.note", b"root only".to_vec())]),
        ("x/acl", vec![("system.posix_acl_access", access.clone())]),
        ("x/cap", vec![("security.capability", cap.clone())]),
    ];
    let mut tar = tar::Builder::new(Vec::new());
    let header = |t: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(t);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    let bin = fs::read(&getx).unwrap();
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, bin.len() as u64),
        "getx",
        &bin[..],
    )
    .unwrap();
    tar.append_pax_extensions([("SCHILY.xattr.system.posix_acl_default", &default[..])])
        .unwrap();
    tar.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        "x/",
        std::io::empty(),
    )
    .unwrap();
    for (path, attrs) in &files {
        let recs: Vec<(String, &[u8])> = attrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), &v[..]))
            .collect();
        tar.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        tar.append_data(
            &mut header(tar::EntryType::Regular, 0o644, 1),
            path,
            &b"x"[..],
        )
        .unwrap();
    }
    let layer = tar.into_inner().unwrap();
    let layout = dir.path().join("layout");
    oci_layout_of(&layout, &layer, r#"{"Cmd":["/getx"]}"#);
    let artifact = dir.path().join("xattrs.hvm");
    let o = build(&layout, &artifact);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let r = b.boot(
        &artifact,
        &[
            "--net",
            "none",
            "--",
            "/getx",
            "/x",
            "/x/plain",
            "/x/trusted",
            "/x/acl",
            "/x/cap",
        ],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let mut got: Vec<&str> = r.stdout.lines().collect();
    got.sort();
    let hexs = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut want = vec![format!("/x system.posix_acl_default={}", hexs(&default))];
    for (path, attrs) in &files {
        for (k, v) in attrs {
            want.push(format!("/{path} {k}={}", hexs(v)));
        }
    }
    want.sort();
    assert_eq!(got, want, "what the guest kernel reads back");
}

/// `--stats FILE`: one JSON line per boot, its milestones in order, the
/// guest's own from hyperinit (contract 2), exits and memory on the KVM VMM:
/// a quiet cold boot makes at most 50 exits; a restored one has of the
/// guest's milestones only the app's exec (the rest happened before the
/// snapshot) and says it was restored.
pub fn stats_describe_the_boot(b: Backend) {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("stats.json");
    let f = file.to_str().unwrap();
    for _ in 0..2 {
        let r = b.boot(
            busybox_artifact(),
            &["--stats", f, "--", "echo", "measured"],
        );
        assert_run(&r, 0, "measured\n");
    }
    let text = fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one line per boot: {text}");
    let s = &lines[1];
    assert_eq!(
        (s["backend"].as_str(), s["exit_code"].as_u64()),
        (Some(b.name()), Some(0))
    );
    let at = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {s}"));
    let order = match b {
        Backend::Kvm => vec![
            "artifact_verified",
            "vm_created",
            "memory_ready",
            "kernel_ready",
            "first_kvm_run",
            "first_guest_exit",
            "hyperinit_started",
            "root_mounted",
            "app_exec",
            "app_first_output",
            "app_exited",
            "vm_torn_down",
        ],
        Backend::KvmRestored => vec![
            "artifact_verified",
            "vm_created",
            "memory_ready",
            "kernel_ready",
            "first_kvm_run",
            "app_exec",
            "app_first_output",
            "app_exited",
            "vm_torn_down",
        ],
        Backend::Qemu => vec![
            "artifact_verified",
            "guest_started",
            "hyperinit_started",
            "root_mounted",
            "app_exec",
            "app_first_output",
            "app_exited",
            "vm_torn_down",
        ],
    };
    // The guest's milestones are placed by the instant hyperinit's line
    // about them reached the host, so they read late by that line's way
    // (the guest writes it, a host thread is woken for it): a guest instant
    // before a host one gets that much margin; every other pair is strict.
    const LINE_WAY_US: u64 = 100_000;
    let guest = |k: &str| matches!(k, "hyperinit_started" | "root_mounted" | "app_exec");
    for w in order.windows(2) {
        let margin = if guest(w[0]) && !guest(w[1]) {
            LINE_WAY_US
        } else {
            0
        };
        assert!(
            at(w[0]) <= at(w[1]) + margin,
            "{} after {}: {s}",
            w[0],
            w[1]
        );
    }
    assert!(at("peak_rss_kib") > 0);
    match b {
        Backend::Kvm => {
            let exits = s["exits"]["total"].as_u64().unwrap();
            assert!(exits > 0 && exits <= 50, "a quiet boot's exits: {s}");
            assert!(
                s["exits"]["mmio"]["virtio-blk"].as_u64().unwrap() > 0,
                "{s}"
            );
            assert!(at("vmm_rss_kib") > 0);
            assert_eq!(s["snapshot"], "none", "{s}");
        }
        Backend::KvmRestored => {
            assert_eq!(s["snapshot"], "restored", "{s}");
            assert!(s["hyperinit_started"].is_null(), "{s}");
            assert!(at("vmm_rss_kib") > 0);
        }
        Backend::Qemu => {}
    }
}
