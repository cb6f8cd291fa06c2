//! The app tier on the KVM backend: every app-level scenario of the qemu,
//! net and objstore tiers (`scenarios/`), the same bodies, run on hyperboot's
//! own VMM — booted cold, and again restored from a snapshot (`restored::`).
//! Needs KVM with real semantics: hardware, or the nested host that
//! `scripts/test nested` boots (scripts/nested-run); elsewhere each test says
//! loudly that it was skipped.

mod app {
    app_scenarios!(hyper_tests::Backend::Kvm);
}

mod detached {
    detached_scenarios!(hyper_tests::Backend::Kvm);
}

mod net {
    net_scenarios!(hyper_tests::Backend::Kvm);
}

mod objstore {
    objstore_scenarios!(hyper_tests::Backend::Kvm);
}

/// The same scenarios, each boot restored from a snapshot of the artifact
/// with the boot's options (made first when missing; see
/// `tests/src/bin/hyperboot-restored.rs`).
mod restored {
    mod app {
        app_scenarios!(hyper_tests::Backend::KvmRestored);
    }

    mod detached {
        detached_scenarios!(hyper_tests::Backend::KvmRestored);
    }

    mod net {
        net_scenarios!(hyper_tests::Backend::KvmRestored);
    }

    mod objstore {
        objstore_scenarios!(hyper_tests::Backend::KvmRestored);
    }
}

/// What snapshots themselves promise: one snapshot however many first
/// boots race, a damaged or foreign one refused with a notice and a cold
/// boot, `--snapshot off|refresh|require`, `prepare` and `cache ls|prune`,
/// fresh randomness and the host's clock in every restored guest. Each test
/// has a snapshot cache of its own (`HYPER_SNAPSHOT_CACHE`).
mod snapshots {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    use hyper_tests::*;

    use crate::scenarios::assert_run;

    fn cache() -> tempfile::TempDir {
        tempfile::tempdir_in(scratch()).unwrap()
    }

    /// `hyperboot` with the test's own snapshot cache.
    fn hb(cache: &Path) -> Command {
        let mut c = hyperboot();
        c.env("HYPER_SNAPSHOT_CACHE", cache).stdin(Stdio::null());
        c
    }

    /// `hyperboot --backend kvm FLAGS --stats F ARTIFACT -- CMD`: the run
    /// and what its stats say of snapshots (`made`, `restored`, `none`).
    fn boot(cache: &Path, flags: &[&str], cmd: &[&str]) -> (Run, String) {
        let stats = cache.join("stats.json");
        let _ = std::fs::remove_file(&stats);
        let out = hb(cache)
            .args(["--backend", "kvm", "--timeout", "120"])
            .args(flags)
            .arg("--stats")
            .arg(&stats)
            .arg(busybox_artifact())
            .arg("--")
            .args(cmd)
            .output()
            .unwrap();
        let r = Run::from(out);
        let how = snapshot_of(&stats);
        (r, how)
    }

    /// A boot's stats (`--stats`), if it wrote them.
    fn stats_of(stats: &Path) -> Option<serde_json::Value> {
        std::fs::read_to_string(stats)
            .ok()
            .and_then(|t| serde_json::from_str(t.trim()).ok())
    }

    /// What a boot's stats say of snapshots; `missing` without stats.
    fn snapshot_of(stats: &Path) -> String {
        stats_of(stats)
            .and_then(|s| s["snapshot"].as_str().map(str::to_string))
            .unwrap_or_else(|| "missing".into())
    }

    /// The cache's files ending in `suffix`.
    fn files(cache: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        v.sort();
        v
    }

    fn one_snapshot(cache: &Path) -> PathBuf {
        let s = files(cache, ".snap");
        assert_eq!(s.len(), 1, "one snapshot in the cache: {s:?}");
        assert!(files(cache, ".tmp").is_empty(), "a temporary file was left");
        s[0].clone()
    }

    fn prepare(cache: &Path, flags: &[&str]) -> PathBuf {
        let out = hb(cache)
            .arg("prepare")
            .args(flags)
            .arg(busybox_artifact())
            .output()
            .unwrap();
        let r = Run::from(out);
        assert_eq!(r.code, Some(0), "{r:?}");
        let path = PathBuf::from(r.stdout.trim());
        assert!(path.is_file(), "prepare prints the snapshot's path: {r:?}");
        path
    }

    #[test]
    fn racing_first_boots_make_one_snapshot_and_later_boots_restore_it() {
        if !Backend::Kvm.available("kvm_app::snapshots::racing_first_boots_make_one_snapshot") {
            return;
        }
        let c = cache();
        let stats: Vec<PathBuf> = (0..2)
            .map(|i| c.path().join(format!("s{i}.json")))
            .collect();
        let children: Vec<_> = stats
            .iter()
            .map(|s| {
                hb(c.path())
                    .args(["--backend", "kvm", "--timeout", "120", "--stats"])
                    .arg(s)
                    .arg(busybox_artifact())
                    .args(["--", "sh", "-c", "echo raced; exit 5"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut made = 0;
        for (child, s) in children.into_iter().zip(&stats) {
            let r = Run::from(child.wait_with_output().unwrap());
            assert_run(&r, 5, "raced\n");
            match snapshot_of(s).as_str() {
                "made" => made += 1,
                "none" => {}
                other => panic!("a first boot was {other}: {r:?}"),
            }
        }
        assert_eq!(
            made, 1,
            "exactly one of the racing boots makes the snapshot"
        );
        let snap = one_snapshot(c.path());
        for code in [0, 9] {
            let (r, how) = boot(
                c.path(),
                &[],
                &["sh", "-c", &format!("echo again; exit {code}")],
            );
            assert_run(&r, code, "again\n");
            assert_eq!(how, "restored", "{r:?}");
        }
        assert_eq!(
            prepare(c.path(), &[]),
            snap,
            "prepare finds the snapshot made"
        );
        let ls = Run::from(hb(c.path()).args(["cache", "ls"]).output().unwrap());
        let key = snap.file_stem().unwrap().to_string_lossy().to_string();
        assert!(ls.code == Some(0) && ls.stdout.contains(&key), "{ls:?}");
        // Options that change the machine make a snapshot of their own.
        let (r, how) = boot(c.path(), &["--memory", "192"], &["true"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "made"), "{r:?}");
        assert_eq!(files(c.path(), ".snap").len(), 2);
        let pruned = Run::from(
            hb(c.path())
                .args(["cache", "prune", "--all"])
                .output()
                .unwrap(),
        );
        assert_eq!(pruned.code, Some(0), "{pruned:?}");
        assert!(files(c.path(), ".snap").is_empty(), "{pruned:?}");
    }

    type Spoil<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;

    #[test]
    fn damaged_truncated_or_foreign_snapshots_are_refused_and_the_boot_is_cold() {
        if !Backend::Kvm.available("kvm_app::snapshots::damaged_truncated_or_foreign_snapshots") {
            return;
        }
        let c = cache();
        let snap = prepare(c.path(), &[]);
        let other = prepare(c.path(), &["--memory", "192"]);
        let pristine = std::fs::read(&snap).unwrap();
        let damage: [(&str, Spoil<'_>); 3] = [
            // One bit of guest memory, past the header and the state.
            (
                "tampered",
                Box::new(|b: &mut Vec<u8>| {
                    let at = b.len() - 4096 * 8;
                    b[at] ^= 1;
                }),
            ),
            (
                "truncated",
                Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
            ),
            // A sound snapshot of the same artifact with other options.
            (
                "foreign",
                Box::new(|b: &mut Vec<u8>| *b = std::fs::read(&other).unwrap()),
            ),
        ];
        for (what, spoil) in &damage {
            let mut bytes = pristine.clone();
            spoil(&mut bytes);
            let _ = std::fs::remove_file(&snap);
            std::fs::write(&snap, &bytes).unwrap();
            let (r, how) = boot(c.path(), &[], &["sh", "-c", "echo cold; exit 4"]);
            assert_run(&r, 4, "cold\n");
            assert_ne!(how, "restored", "{what} snapshot restored: {r:?}");
            let notices: Vec<_> = r
                .stderr
                .lines()
                .filter(|l| l.contains("snapshot"))
                .collect();
            assert_eq!(notices.len(), 1, "{what}: one notice: {r:?}");
            let required = Run::from(
                hb(c.path())
                    .args([
                        "--backend",
                        "kvm",
                        "--timeout",
                        "120",
                        "--snapshot",
                        "require",
                    ])
                    .arg(busybox_artifact())
                    .args(["--", "true"])
                    .output()
                    .unwrap(),
            );
            // The cold boot replaced it with a sound one, or left none.
            if std::fs::read(&snap).map(|b| b == bytes).unwrap_or(false) {
                assert_eq!(
                    required.code,
                    Some(125),
                    "{what} restored when required: {required:?}"
                );
            }
        }
        // A sound snapshot is back after the cold boots.
        let (r, how) = boot(c.path(), &[], &["true"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "restored"), "{r:?}");
    }

    #[test]
    fn snapshot_off_refresh_and_require() {
        if !Backend::Kvm.available("kvm_app::snapshots::snapshot_off_refresh_and_require") {
            return;
        }
        let c = cache();
        let (r, how) = boot(c.path(), &["--snapshot", "require"], &["true"]);
        assert_eq!(r.code, Some(125), "{r:?}");
        assert!(r.stderr.contains("hyperboot prepare"), "{r:?}");
        assert_ne!(how, "restored", "{r:?}");
        let (r, how) = boot(c.path(), &["--snapshot", "off"], &["true"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "none"), "{r:?}");
        assert!(
            files(c.path(), ".snap").is_empty(),
            "--snapshot off made one"
        );
        let (r, how) = boot(c.path(), &[], &["true"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "made"), "{r:?}");
        let snap = one_snapshot(c.path());
        let before = std::fs::metadata(&snap).unwrap();
        let (r, how) = boot(c.path(), &["--snapshot", "refresh"], &["true"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "made"), "{r:?}");
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            std::fs::metadata(one_snapshot(c.path())).unwrap().ino(),
            before.ino(),
            "refresh makes a new snapshot"
        );
        let (r, how) = boot(c.path(), &["--snapshot", "require"], &["echo", "restored"]);
        assert_run(&r, 0, "restored\n");
        assert_eq!(how, "restored");
        // The QEMU backend boots cold; requiring a snapshot there is refused.
        let r = Run::from(
            hb(c.path())
                .args(["--backend", "qemu", "--snapshot", "require"])
                .arg(busybox_artifact())
                .args(["--", "true"])
                .output()
                .unwrap(),
        );
        assert_eq!(r.code, Some(125), "{r:?}");
        assert!(r.stderr.contains("QEMU"), "{r:?}");
    }

    /// A restored guest ends the VM as a cold one does: its exit code comes
    /// through, through the exit port (not the reset hyperinit falls back
    /// to, which restored guests in the nested test host took while the VMM
    /// restored their task register as a busy TSS), and its kernel does not
    /// panic on the way.
    #[test]
    fn a_restored_guest_stops_cleanly_with_its_exit_code() {
        if !Backend::Kvm.available("kvm_app::snapshots::a_restored_guest_stops_cleanly") {
            return;
        }
        let c = cache();
        let bye = ["sh", "-c", "echo bye; exit 3"];
        let (r, how) = boot(c.path(), &["--console", "--snapshot", "refresh"], &bye);
        assert_eq!((r.code, how.as_str()), (Some(3), "made"), "{r:?}");
        let (r, how) = boot(c.path(), &["--console", "--snapshot", "require"], &bye);
        assert_eq!((r.code, how.as_str()), (Some(3), "restored"), "{r:?}");
        assert!(r.stdout.contains("bye"), "{r:?}");
        let stats = stats_of(&c.path().join("stats.json")).unwrap();
        assert_eq!(stats["exits"]["io"]["exit_port"], 1, "{stats}");
        for bad in ["Kernel panic", "Attempted to kill init"] {
            assert!(
                !r.stdout.contains(bad) && !r.stderr.contains(bad),
                "{bad}: {r:?}"
            );
        }
    }

    /// `hyper.warm`: the boot that makes the snapshot reads the image's own
    /// program (Cmd `sh`, found on the PATH) before the snapshot point, so a
    /// restored run of it reads (almost) nothing of the rootfs, where a cold
    /// run reads the program block by block.
    #[test]
    fn the_images_program_is_read_ahead_into_the_snapshot() {
        if !Backend::Kvm.available("kvm_app::snapshots::the_images_program_is_read_ahead") {
            return;
        }
        let c = cache();
        let blk_reads = |flags: &[&str]| -> (Run, String, u64) {
            let mut all = vec!["--verbose"];
            all.extend_from_slice(flags);
            let (r, how) = boot(c.path(), &all, &["echo", "ran"]);
            let stats: serde_json::Value = serde_json::from_str(
                std::fs::read_to_string(c.path().join("stats.json"))
                    .unwrap()
                    .trim(),
            )
            .unwrap();
            let n = stats["interrupts"]["virtio-blk"]
                .as_u64()
                .unwrap_or(u64::MAX);
            (r, how, n)
        };
        let (r, how, cold) = blk_reads(&["--snapshot", "off"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "none"), "{r:?}");
        // hyperinit's --verbose lines are on the console (stdout here).
        assert!(
            !r.stdout.contains("ahead"),
            "only a snapshot's boot reads ahead: {r:?}"
        );
        let (r, how, _) = blk_reads(&["--snapshot", "refresh"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "made"), "{r:?}");
        assert!(
            r.stdout.contains("hyperinit: read /bin/sh ahead (")
                && r.stdout.contains("bytes) for the snapshot"),
            "{r:?}"
        );
        // And the files every run reads, whatever its program.
        assert!(
            r.stdout.contains("hyperinit: read /etc/passwd ahead (")
                && r.stdout.contains("hyperinit: read /etc/group ahead ("),
            "{r:?}"
        );
        let (r, how, restored) = blk_reads(&["--snapshot", "require"]);
        assert_eq!((r.code, how.as_str()), (Some(0), "restored"), "{r:?}");
        assert!(r.stdout.contains("ran"), "{r:?}");
        assert!(
            restored * 3 < cold,
            "a restored run reads its program from the snapshot: {restored} virtio-blk interrupts, {cold} cold"
        );
    }

    /// hyper-update prepares the new artifact while the app's VM still
    /// runs and holds its published ports: the prepare touches none of them,
    /// and the restart with the same options restores its snapshot.
    #[test]
    fn prepare_beside_the_running_vm_that_holds_its_ports() {
        if !Backend::Kvm.available("kvm_app::snapshots::prepare_beside_the_running_vm") {
            return;
        }
        let c = cache();
        // The running VM's relay holds the port.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let publish = format!("127.0.0.1:{}:80", held.local_addr().unwrap().port());
        let (r, _) = boot(c.path(), &["-p", &publish, "--snapshot", "off"], &["true"]);
        assert_eq!(r.code, Some(125), "a boot needs its port: {r:?}");
        assert!(
            r.stderr.contains(&publish[..publish.rfind(':').unwrap()]),
            "{r:?}"
        );
        prepare(c.path(), &["-p", &publish]);
        drop(held);
        let (r, how) = boot(
            c.path(),
            &["-p", &publish, "--snapshot", "require"],
            &["sh", "-c", "echo up on $(hostname -i)"],
        );
        assert_run(&r, 0, "up on 10.0.2.15\n");
        assert_eq!(how, "restored", "{r:?}");
    }

    #[test]
    fn restored_guests_get_fresh_randomness_and_the_hosts_clock() {
        if !Backend::Kvm.available("kvm_app::snapshots::restored_guests_get_fresh_randomness") {
            return;
        }
        let c = cache();
        prepare(c.path(), &[]);
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (r, how) = boot(
                c.path(),
                &[],
                &[
                    "sh",
                    "-c",
                    "date +%s; head -c 16 /dev/urandom | od -An -tx1",
                ],
            );
            assert_eq!((r.code, how.as_str()), (Some(0), "restored"), "{r:?}");
            let mut lines = r.stdout.lines();
            let guest: u64 = lines.next().unwrap().trim().parse().unwrap();
            let host = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(
                host.abs_diff(guest) <= 30,
                "guest clock {guest}, host {host}"
            );
            seen.push(lines.collect::<String>());
        }
        assert_ne!(seen[0], seen[1], "two restores drew the same random bytes");
    }

    #[test]
    fn ten_restored_vms_of_one_artifact_run_at_once() {
        if !Backend::Kvm
            .available("kvm_app::snapshots::ten_restored_vms_of_one_artifact_run_at_once")
        {
            return;
        }
        let c = cache();
        prepare(c.path(), &[]);
        let stats: Vec<PathBuf> = (0..10)
            .map(|i| c.path().join(format!("s{i}.json")))
            .collect();
        let children: Vec<_> = stats
            .iter()
            .enumerate()
            .map(|(i, s)| {
                hb(c.path())
                    .args([
                        "--backend",
                        "kvm",
                        "--timeout",
                        "300",
                        "--snapshot",
                        "require",
                    ])
                    .arg("--stats")
                    .arg(s)
                    .args(["-e", &format!("VM={i}")])
                    .arg(busybox_artifact())
                    .args(["--", "sh", "-c", "echo vm $VM; exit $VM"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (i, (child, s)) in children.into_iter().zip(&stats).enumerate() {
            let r = Run::from(child.wait_with_output().unwrap());
            assert_run(&r, i as i32, &format!("vm {i}\n"));
            assert_eq!(snapshot_of(s), "restored", "{r:?}");
        }
    }
}
