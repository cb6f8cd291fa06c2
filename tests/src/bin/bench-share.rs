//! bench-share: `-v` volume throughput, the KVM VMM's 9p server next to
//! QEMU's, from the same runs.
//!
//! `bench-share ARTIFACT [RUNS]` boots the artifact on the QEMU backend (the
//! only place guest user space runs on every host) with one `-v` share
//! served by QEMU's own 9p server over virtio, and one directory served by
//! hyperboot's server over TCP, mounted by the same guest kernel client. The
//! guest writes then reads 64 MiB on each with busybox `dd` (256 KiB blocks,
//! `cache=none`: every byte crosses the protocol), timed by the guest's
//! /proc/uptime.
//! The transports differ (virtio against loopback TCP through QEMU's user
//! network), so the ratio bounds our server's cost rather than isolating it;
//! the host-side figure (messages served in process against plain `pread`)
//! isolates it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use hyper_vmm::p9::Server;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let artifact = PathBuf::from(args.get(1).expect("usage: bench-share ARTIFACT [RUNS]"));
    let runs: usize = args.get(2).map_or(3, |s| s.parse().expect("RUNS"));
    in_process(runs);
    in_guest(&artifact, runs);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The server's own cost: 256 KiB Treads of a 256 MiB file (page cache warm)
/// against `pread` of the same blocks, and walk+getattr+clunk against
/// `stat`.
fn in_process(runs: usize) {
    const SIZE: usize = 256 << 20;
    const BLOCK: u32 = 256 * 1024 - 11;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("big"), vec![0x5au8; SIZE]).expect("write");
    let mut server = Server::new(dir.path(), true, 64).expect("server");
    let call = |s: &mut Server, kind: u8, body: &[u8]| -> Vec<u8> {
        let mut m = ((7 + body.len()) as u32).to_le_bytes().to_vec();
        m.push(kind);
        m.extend_from_slice(&[1, 0]);
        m.extend_from_slice(body);
        let r = s.handle(&m, 1 << 20);
        assert_eq!(r[4], kind + 1, "request {kind} failed");
        r
    };
    call(
        &mut server,
        100,
        &[&(1u32 << 20).to_le_bytes()[..], b"\x08\x009P2000.L"].concat(),
    );
    call(
        &mut server,
        104,
        &[0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    call(&mut server, 110, b"\0\0\0\0\x01\0\0\0\x01\0\x03\0big");
    call(&mut server, 12, &[1, 0, 0, 0, 0, 0, 0, 0]);
    let file = std::fs::File::open(dir.path().join("big")).expect("open");
    let (mut ours, mut peer, mut meta, mut meta_peer) = (vec![], vec![], vec![], vec![]);
    let mut buf = vec![0u8; BLOCK as usize];
    for _ in 0..runs {
        let t = Instant::now();
        let mut at = 0u64;
        while at < SIZE as u64 {
            let body = [
                &1u32.to_le_bytes()[..],
                &at.to_le_bytes(),
                &BLOCK.to_le_bytes(),
            ]
            .concat();
            let r = call(&mut server, 116, &body);
            at += u64::from(u32::from_le_bytes(r[7..11].try_into().expect("4")));
        }
        ours.push(SIZE as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut at = 0u64;
        while at < SIZE as u64 {
            use std::os::unix::fs::FileExt;
            at += file.read_at(&mut buf, at).expect("pread") as u64;
        }
        peer.push(SIZE as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
        const N: u32 = 20_000;
        let t = Instant::now();
        for _ in 0..N {
            call(&mut server, 110, b"\0\0\0\0\x02\0\0\0\x01\0\x03\0big");
            call(&mut server, 24, &[2, 0, 0, 0, 0xff, 7, 0, 0, 0, 0, 0, 0]);
            call(&mut server, 120, &[2, 0, 0, 0]);
        }
        meta.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(N));
        let t = Instant::now();
        for _ in 0..N {
            std::fs::symlink_metadata(dir.path().join("big")).expect("stat");
        }
        meta_peer.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(N));
    }
    let (o, p) = (median(&mut ours), median(&mut peer));
    let (m, mp) = (median(&mut meta), median(&mut meta_peer));
    println!("bench-share: {runs} runs each");
    println!(
        "in process, 256 KiB Tread (page cache)  {o:9.0} MiB/s   pread {p:9.0} MiB/s   ratio {:.2}",
        o / p
    );
    println!("in process, Twalk+Tgetattr+Tclunk       {m:9.2} us       stat  {mp:9.2} us      ratio {:.2}", m / mp);
}

/// MiB/s from a guest line "T0 T1" of /proc/uptime readings around 64 MiB.
fn rate(line: &str) -> Option<f64> {
    let mut t = line.split_whitespace().map(|w| w.parse::<f64>());
    let (Some(Ok(t0)), Some(Ok(t1)), None) = (t.next(), t.next(), t.next()) else {
        return None;
    };
    Some(64.0 / (t1 - t0).max(0.01))
}

fn in_guest(artifact: &Path, runs: usize) {
    let hyperboot = std::env::var("HYPERBOOT").unwrap_or_else(|_| "hyperboot".into());
    let (qemu_dir, ours_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = hyper_tests::serve_9p_over_tcp(ours_dir.path(), false);
    let opts = "trans=tcp,version=9p2000.L,msize=262144,cache=none";
    let script = format!(
        "mkdir -p /o && mount -t 9p -o {opts},port={port} 10.0.2.2 /o || exit 9; \
         for d in /q /o; do \
           t0=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero of=$d/f bs=256k count=256 conv=fsync 2>/dev/null; \
           t1=$(cut -d' ' -f1 /proc/uptime); dd if=$d/f of=/dev/null bs=256k 2>/dev/null; \
           t2=$(cut -d' ' -f1 /proc/uptime); echo $t0 $t1; echo $t1 $t2; rm $d/f; \
         done"
    );
    let mut figures: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        let out = Command::new(&hyperboot)
            .args(["--backend", "qemu", "--timeout", "300", "-v"])
            .arg(format!("{}:/q", qemu_dir.path().display()))
            .arg(artifact)
            .args(["--", "sh", "-c", &script])
            .output()
            .expect("run hyperboot");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let rates: Vec<f64> = stdout.lines().filter_map(rate).collect();
        assert!(
            out.status.success() && rates.len() == 4,
            "the guest's dd runs failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (v, r) in figures.iter_mut().zip(rates) {
            v.push(r);
        }
    }
    let [qw, qr, ow, or] = figures.map(|mut v| median(&mut v));
    println!("guest (QEMU, TCG), 64 MiB dd through the project's kernel 9p client:");
    println!("  QEMU's 9p server, virtio        write {qw:7.1} MiB/s   read {qr:7.1} MiB/s");
    println!("  hyperboot's 9p server, TCP      write {ow:7.1} MiB/s   read {or:7.1} MiB/s");
    println!(
        "  ratio ours/QEMU                 write {:7.2}        read {:7.2}",
        ow / qw,
        or / qr
    );
}
