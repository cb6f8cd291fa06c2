//! `hyperboot --stats FILE|-`: one JSON object per boot (`-`: on stderr,
//! since stdout is the app's). Times are microseconds since hyperboot's
//! `main` (`null`: the backend cannot tell):
//!
//! | key | when |
//! | --- | --- |
//! | `artifact_verified` | the seal and sections checked |
//! | `vm_created`, `memory_ready`, `kernel_ready` | the VMM's steps (KVM) |
//! | `first_kvm_run`, `first_guest_exit` | the boot vCPU entered the guest, left it the first time (KVM) |
//! | `guest_started` | QEMU started (QEMU) |
//! | `hyperinit_started`, `root_mounted`, `app_exec` | hyperinit's milestones, from the guest's clock (contract 2), placed on the host's by the instant its `timings` line reached the host (late by that line's way, a few ms); a restored guest has only `app_exec` (it started and mounted its root in the run that made the snapshot) |
//! | `app_first_output` | the first byte of the app's stdout or stderr reached hyperboot |
//! | `app_exited` | the guest ended the VM after its report |
//! | `start_to_app_exec_us` | a duration: hyperinit took its run configuration at the snapshot point (contract 4), then exec'd the app this much later, by the guest's clock (restored guests too) |
//! | `vm_torn_down` | the VM is gone |
//!
//! Then `exits` (KVM: exits to the VMM process by kind: port I/O by port,
//! MMIO by device, halts), `without_exits` (KVM: register writes KVM queued
//! and queue notifications through eventfds, which cost no exit),
//! `interrupts` (KVM: by device), `peak_rss_kib`
//! (the whole process, guest pages it touched included) and `vmm_rss_kib`
//! (resident memory besides guest memory, when the VM ends).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

static START: AtomicU64 = AtomicU64::new(0);
static STATS: Mutex<Option<Map<String, Value>>> = Mutex::new(None);
/// Where the line goes, opened when collecting begins (the KVM backend's
/// seccomp filter forbids opening files later); None: stderr.
static OUT: Mutex<Option<std::fs::File>> = Mutex::new(None);

fn now() -> u64 {
    hyper_vmm::monotonic_ns()
}

/// hyperboot's start: `main` calls this first.
pub fn start() {
    START.store(now(), Ordering::SeqCst);
}

/// Begins collecting for a boot (`--stats` given), writing to `to`.
pub fn enable(to: &std::path::Path) -> std::io::Result<()> {
    let out = if to.as_os_str() == "-" {
        None
    } else {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(to)?,
        )
    };
    *OUT.lock().unwrap_or_else(|e| e.into_inner()) = out;
    let mut m = Map::new();
    for k in [
        "artifact_verified",
        "vm_created",
        "memory_ready",
        "kernel_ready",
        "first_kvm_run",
        "first_guest_exit",
        "guest_started",
        "hyperinit_started",
        "root_mounted",
        "app_exec",
        "app_first_output",
        "app_exited",
        "vm_torn_down",
    ] {
        m.insert(k.into(), Value::Null);
    }
    *STATS.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
    Ok(())
}

pub fn enabled() -> bool {
    STATS.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// Microseconds since `main` of monotonic time `ns` (0: unknown).
pub fn us(ns: u64) -> Value {
    let start = START.load(Ordering::SeqCst);
    if ns == 0 || start == 0 {
        return Value::Null;
    }
    json!(ns.saturating_sub(start) / 1000)
}

/// Sets `at` to now unless it is set.
pub fn first(at: &AtomicU64) {
    let _ = at.compare_exchange(0, now(), Ordering::SeqCst, Ordering::SeqCst);
}

/// Records `key` as `value`.
pub fn set(key: &str, value: Value) {
    if let Some(m) = STATS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        m.insert(key.into(), value);
    }
}

/// Records milestone `key` as now.
pub fn mark(key: &str) {
    set(key, us(now()));
}

/// hyperinit's milestones (contract 2), placed on the host's clock: its
/// `timings` line says when it was written (`now`, guest µs) and reached
/// the host at `received_ns`, so a milestone `g` happened at `received_ns -
/// (now - g)` — late by no more than the line's way to the host. An older
/// init sends no `now`: its milestones are counted from `guest_start_ns`
/// instead, and read early (the guest's clock starts during its kernel's
/// boot). A restored guest (`guest_start_ns` None) started and mounted its
/// root in another run: only its app's exec is placed. When the run
/// configuration came as a Start, also `start_to_app_exec_us`.
pub fn guest_timings(status: &[u8], received_ns: u64, guest_start_ns: Option<u64>) {
    let found = status
        .split_inclusive(|b| *b == b'\n')
        .filter_map(|l| hyper_contract::GuestMessage::decode(l).ok())
        .find_map(|m| match m {
            hyper_contract::GuestMessage::Timings {
                init,
                root,
                exec,
                start,
                now,
            } => Some(([init, root, exec], start, now)),
            _ => None,
        });
    let Some((t, start, now)) = found else {
        return;
    };
    if let Some(start) = start.filter(|s| *s <= t[2]) {
        set("start_to_app_exec_us", serde_json::json!(t[2] - start));
    }
    let keys = ["hyperinit_started", "root_mounted", "app_exec"];
    let restored = guest_start_ns.is_none();
    let placed = keys.into_iter().zip(t).skip(if restored { 2 } else { 0 });
    match now.filter(|_| received_ns != 0) {
        Some(now) => {
            for (key, guest_us) in placed {
                let before = now.saturating_sub(guest_us) * 1000;
                if guest_us <= now && before <= received_ns {
                    set(key, us(received_ns - before));
                }
            }
        }
        None => {
            if let Some(at) = guest_start_ns.filter(|ns| *ns != 0) {
                for (key, guest_us) in placed {
                    set(key, us(at + guest_us * 1000));
                }
            }
        }
    }
}

/// /proc/self/smaps and /proc/self/status, opened before a seccomp filter
/// forbids opening files, read again (from the start) after the VM.
#[derive(Debug)]
pub struct ProcFiles {
    smaps: std::fs::File,
    status: std::fs::File,
}

impl ProcFiles {
    pub fn open() -> Option<ProcFiles> {
        Some(ProcFiles {
            smaps: std::fs::File::open("/proc/self/smaps").ok()?,
            status: std::fs::File::open("/proc/self/status").ok()?,
        })
    }
}

/// The file from its start, by plain reads (no stat: the supervisor's
/// filter allows only read and lseek on it).
fn reread(f: &mut std::fs::File) -> Option<String> {
    use std::io::{Read, Seek};
    f.seek(std::io::SeekFrom::Start(0)).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Resident memory of the process (KiB) besides the mappings within
/// `guest` (guest RAM, or the snapshot's memory mapped in its place), from
/// /proc/self/smaps.
pub fn vmm_rss_kib(files: &mut ProcFiles, guest: (usize, usize)) -> Option<u64> {
    let smaps = reread(&mut files.smaps)?;
    let (mut total, mut in_guest, mut current_is_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(field) = first.strip_suffix(':') {
            if field == "Rss" {
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                total += kib;
                if current_is_guest {
                    in_guest += kib;
                }
            }
        } else {
            // A mapping's header: START-END PERMS ...
            let start = first
                .split('-')
                .next()
                .and_then(|a| usize::from_str_radix(a, 16).ok());
            current_is_guest =
                guest.1 != 0 && start.is_some_and(|a| a >= guest.0 && a < guest.0 + guest.1);
        }
    }
    Some(total - in_guest)
}

/// The process's peak resident memory (KiB).
pub fn peak_rss_kib(files: Option<&mut ProcFiles>) -> u64 {
    let status = match files {
        Some(f) => reread(&mut f.status).unwrap_or_default(),
        None => std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Writes what was collected, one JSON line.
pub fn write() -> std::io::Result<()> {
    use std::io::Write;
    let Some(mut m) = STATS.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return Ok(());
    };
    if !m.contains_key("peak_rss_kib") {
        m.insert("peak_rss_kib".into(), json!(peak_rss_kib(None)));
    }
    let line = format!("{}\n", Value::Object(m));
    match OUT.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(mut f) => f.write_all(line.as_bytes()),
        None => std::io::stderr().write_all(line.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_milestones_are_placed_on_the_host_clock() {
        start();
        enable(std::path::Path::new("-")).unwrap();
        let t0 = START.load(Ordering::SeqCst) + 5_000_000;
        // An init without the line's own time: counted from the guest's start.
        guest_timings(b"ready\ntimings 1000 2000 3500\nexit=0\n", 0, Some(t0));
        let m = STATS.lock().unwrap().clone().unwrap();
        assert_eq!(m["hyperinit_started"], json!(6000));
        assert_eq!(m["app_exec"], json!(8500));
        assert_eq!(m.get("start_to_app_exec_us"), None);
        assert_eq!(m["vm_created"], Value::Null);
        // With it: placed back from the instant the line arrived (the
        // guest's clock origin plays no part).
        STATS.lock().unwrap().as_mut().unwrap().clear();
        let got = START.load(Ordering::SeqCst) + 9_000_000;
        guest_timings(b"timings 1000 2000 3500 0 4000\nexit=0\n", got, Some(t0));
        let m = STATS.lock().unwrap().clone().unwrap();
        assert_eq!(m["hyperinit_started"], json!(6000));
        assert_eq!(m["root_mounted"], json!(7000));
        assert_eq!(m["app_exec"], json!(8500));
        assert_eq!(m.get("start_to_app_exec_us"), None);
        // Restored: the guest's clock is the snapshot's; only the app's exec
        // happened in this run, and the duration from the Start to it.
        STATS.lock().unwrap().as_mut().unwrap().clear();
        guest_timings(b"timings 10 20 900000 880000\nexit=0\n", got, None);
        let m = STATS.lock().unwrap().clone().unwrap();
        assert_eq!(m["start_to_app_exec_us"], json!(20000));
        assert_eq!(m.get("app_exec"), None, "no anchor from an older init");
        guest_timings(b"timings 10 20 900000 880000 900500\nexit=0\n", got, None);
        let m = STATS.lock().unwrap().clone().unwrap();
        assert_eq!(m["app_exec"], json!(8500));
        assert_eq!(m.get("hyperinit_started"), None);
        assert_eq!(m.get("root_mounted"), None);
        // A line that says it was written before its own milestones places
        // none of them.
        STATS.lock().unwrap().as_mut().unwrap().clear();
        guest_timings(b"timings 1000 2000 3500 0 10\nexit=0\n", got, Some(t0));
        let m = STATS.lock().unwrap().clone().unwrap();
        assert_eq!(m.get("app_exec"), None);
        let mut files = ProcFiles::open().unwrap();
        assert!(vmm_rss_kib(&mut files, (0, 0)).is_some_and(|k| k > 0));
        assert!(peak_rss_kib(Some(&mut files)) > 0);
    }
}
