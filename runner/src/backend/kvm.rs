//! The KVM backend: the artifact booted by hyperboot's own VMM (`hyper-vmm`)
//! — the kernel loaded straight from the artifact, the rootfs served from it
//! as virtio-blk, the app's streams on virtio-console ports, passt or a tap
//! behind virtio-net, a 9p server per `-v`. The VM's threads each run under
//! their seccomp filter; once the VM runs, hyperboot's own thread (the
//! supervisor) does too.

use std::io::Write;

use hvm::SectionKind;
use hyper_contract::{GuestMessage, HostMessage};
use hyper_vmm::devices::virtio_net;
use hyper_vmm::seccomp::Profile;
use hyper_vmm::{Controller, End, Vm, VmConfig};

use crate::exit::Outcome;
use crate::net::{passt, Link, Plan};
use crate::stop::GracefulStop;
use crate::supervise::{self, AppStream, Event, VmControl};

use crate::BootError;

impl VmControl for Controller {
    fn send(&self, m: HostMessage) {
        Controller::send(self, m);
    }

    fn end(&self) {
        Controller::end(self);
    }
}

/// Why a `-v` directory cannot be shared.
#[derive(Debug, thiserror::Error)]
#[error("-v {path}: cannot share it")]
pub struct ShareError {
    path: String,
    #[source]
    source: std::io::Error,
}

/// `-v` and `--upper` on the KVM backend: a 9p server per host directory,
/// under the tag hyperinit expects. Every fid a guest holds costs host
/// descriptors, so the open-file limit is raised to its hard limit and
/// split between them.
fn share_servers(
    shares: &[crate::spec::Share],
) -> Result<Vec<(String, hyper_vmm::p9::Server)>, ShareError> {
    if shares.is_empty() {
        return Ok(Vec::new());
    }
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    let open_files = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
    // A fid holds up to two descriptors (its O_PATH one and an open file).
    let per_share = (open_files.saturating_sub(256) as usize / (2 * shares.len())).min(65_536);
    shares
        .iter()
        .map(|b| {
            let server =
                hyper_vmm::p9::Server::new(&b.host, b.read_only, per_share).map_err(|source| {
                    ShareError {
                        path: b.host.display().to_string(),
                        source,
                    }
                })?;
            Ok((b.tag.clone(), server))
        })
        .collect()
}

/// The kernel command line on the KVM backend. An init of contract 3 or
/// later talks on the `hyper.control` console port, so the UARTs are only
/// there for the kernel's console: a quiet boot has none at all (the 8250
/// driver probing its ports costs dozens of exits), `--console` and
/// `--verbose` get COM1. Older inits keep COM2 for their control channel.
pub fn cmdline(base: &str, opts: &crate::BootOptions, pvm: bool, contract: u32) -> String {
    let quiet = !opts.verbose && !opts.console;
    let extra = match (contract >= 3, quiet) {
        (true, true) => "8250.nr_uarts=0 hyper.control=port",
        (true, false) => "8250.nr_uarts=1 hyper.control=port",
        (false, _) => "8250.nr_uarts=2",
    };
    let base = if contract >= 3 && quiet {
        // No console device: the kernel would look for ttyS0 in vain.
        base.split_whitespace()
            .filter(|w| !w.starts_with("console="))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        base.to_string()
    };
    super::kernel_cmdline(&base, opts.verbose, opts.console, pvm, extra)
}

/// `hyper.warm=PROGRAM` for a boot that reaches the snapshot point: the
/// image's own program (its entrypoint's first word, else its command's),
/// which hyperinit reads into the page cache before the snapshot. From the
/// image alone, never from a run's options, so one snapshot serves every
/// run. `None` when the image names none, or a word the kernel command line
/// cannot carry (spaces, control characters, quotes, over 255 bytes).
pub fn warm_arg(config: &hvm::ImageConfig) -> Option<String> {
    let first = |v: &Option<Vec<String>>| v.as_ref().and_then(|v| v.first().cloned());
    let program = first(&config.entrypoint)
        .filter(|p| !p.is_empty())
        .or_else(|| first(&config.cmd))?;
    let fits = !program.is_empty()
        && program.len() <= 255
        && program
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
    fits.then(|| format!("{}{program}", hyper_contract::WARM_ARG))
}

/// The console ports the guest gets, in order (a snapshot's device set).
pub fn console_ports(stdin: bool, control: bool) -> Vec<&'static str> {
    let mut ports = vec!["hyper.stdout", "hyper.stderr"];
    if stdin {
        ports.push("hyper.stdin");
    }
    if control {
        ports.push(hyper_contract::CONTROL_PORT);
    }
    ports
}

/// Boots on the KVM VMM and supervises it to the end; `control_port`: the
/// artifact's init speaks contract 3 (the control channel on a console
/// port); `pvm`: nested PVM KVM, which cannot emulate a guest kernel's
/// writes to read-only memory (the register pages are left out there).
#[allow(clippy::too_many_arguments)]
pub fn boot(
    b: super::Boot<'_>,
    net: Option<Plan>,
    mut run: crate::Run,
    control_port: bool,
    pvm: bool,
    snapshot: crate::snapshots::Choice,
    start: Option<hyper_contract::RunConfig>,
) -> Result<Outcome, BootError> {
    let super::Boot {
        artifact,
        archive: run_archive,
        stop_signal,
        cmdline,
        opts,
        contract,
    } = b;
    // The network: passt (user mode) or the tap, and hyperboot's relays for -p.
    let mut published = None;
    let net_backend = match net {
        Some(p) => {
            crate::net::relay::forward_tcp(&p.ports, |m| p.upstream(m))?;
            let backend = match &p.link {
                Link::User => virtio_net::Backend::Passt(passt::start(&p)?),
                Link::Tap { fd, .. } => {
                    virtio_net::Backend::Tap(std::fs::File::from(fd.try_clone()?))
                }
            };
            published = Some(p);
            Some(backend)
        }
        None => None,
    };
    let guest_mac = published.as_ref().map_or(crate::net::GUEST_MAC, |p| p.mac);
    tracing::debug!("KVM backend, kernel command line: {cmdline}");
    use crate::snapshots::Choice;
    let (restore, plan, snapshot_path) = match snapshot {
        Choice::Restore(f, h, s, path) => (Some((f, h, *s)), None, Some(path)),
        Choice::Make(p) => (None, Some(p), None),
        Choice::Cold | Choice::ColdWaiting | Choice::Ready(_) => (None, None, None),
    };
    // The machine's configuration, built again should a restore fail.
    let make = |restore, plan| -> Result<VmConfig, BootError> {
        let k = artifact.section(SectionKind::Kernel);
        let i = artifact.section(SectionKind::Initrd);
        let r = artifact.section(SectionKind::Rootfs);
        let ended = std::sync::Mutex::new(run.tx.clone());
        let gone = supervise::ReaderGone::new(run.tx.clone(), contract);
        Ok(VmConfig {
            kernel: hyper_vmm::loader::SectionReader::new(
                artifact.file().try_clone()?,
                k.offset,
                k.length,
            ),
            initrd: hyper_vmm::loader::Initrd {
                sealed: Some((artifact.file().try_clone()?, i.offset, i.length)),
                tail: run_archive.to_vec(),
            },
            rootfs: Some((artifact.file().try_clone()?, r.offset, r.length)),
            cmdline: cmdline.clone(),
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            console: Box::new(std::io::LineWriter::new(std::io::stdout())),
            streams: vec![
                (
                    "hyper.stdout",
                    Box::new(AppStream::new(std::io::stdout(), 1, gone.clone())),
                ),
                (
                    "hyper.stderr",
                    Box::new(AppStream::new(std::io::stderr(), 2, gone)),
                ),
            ],
            stdin: opts
                .interactive
                .then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
            net: match &net_backend {
                Some(b) => Some((guest_mac, b.try_clone()?)),
                None => None,
            },
            shares: share_servers(&crate::spec::shares(&opts.binds, opts.upper.as_deref()))?,
            seccomp: true,
            control_port,
            register_pages: !pvm,
            on_end: Some(Box::new(move || {
                let _ = ended
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Event::Ended);
            })),
            start: start.clone().map(crate::snapshots::start_message),
            snapshot: plan,
            restore,
        })
    };
    let mut restored = restore.is_some();
    let making = plan.is_some();
    let vm = match Vm::create(make(restore, plan)?) {
        Ok(vm) => vm,
        Err(e @ (hyper_vmm::VmmError::Restore(_) | hyper_vmm::VmmError::RestoreDevices(_)))
            if restored =>
        {
            tracing::info!(
                "the snapshot cannot be restored ({}); it is removed and this boot is cold",
                crate::error_chain(&e)
            );
            if let Some(p) = &snapshot_path {
                let _ = std::fs::remove_file(p);
            }
            restored = false;
            Vm::create(make(None, None)?)?
        }
        Err(e) => return Err(e.into()),
    };
    crate::stats::set(
        "snapshot",
        serde_json::json!(match (restored, making) {
            (true, _) => "restored",
            (false, true) => "made",
            (false, false) => "none",
        }),
    );
    // `-t`: keys go to the app's terminal raw (Ctrl-C included), as with QEMU.
    let raw = crate::terminal::RawMode::new(opts.tty);
    let running = vm.start()?;
    let controller = running.controller();
    run.started(published.as_ref());
    // Opened now: from here on hyperboot's own thread only supervises.
    let mut proc_files = crate::stats::enabled()
        .then(crate::stats::ProcFiles::open)
        .flatten();
    Profile::Supervisor
        .install()
        .map_err(hyper_vmm::VmmError::from)?;
    let ending = supervise::supervise(
        &run.rx,
        &controller,
        GracefulStop::new(stop_signal, opts.stop_timeout),
        opts.timeout,
        opts.tty,
    );
    let outcome = running.wait();
    drop(raw);
    let _ = std::io::stdout().flush();
    if let Some(spawn) = std::env::var("HYPER_SPAWN_NS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        eprintln!(
            "hyperboot-timing: exec_to_first_run_us={} exits={}",
            outcome.first_run_ns.saturating_sub(spawn) / 1000,
            outcome.exits
        );
    }
    tracing::debug!(
        "the VM stopped ({:?}) after {} exits; the guest readied {} console ports{}{}",
        outcome.end,
        outcome.exits,
        outcome.console_ports,
        match outcome.net {
            Some(n) if n.ready => format!(
                "; its driver set the network card up ({} frames sent, {} received, {} dropped)",
                n.sent, n.received, n.dropped
            ),
            Some(_) => "; its driver did not set the network card up".to_string(),
            None => String::new(),
        },
        outcome
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| format!(
                "; vol{i}: {} 9p requests answered, {} malformed refused",
                s.served, s.refused
            ))
            .collect::<String>()
    );
    if let Some(files) = proc_files.as_mut() {
        record_stats(&outcome, files, restored);
    }
    if ending == crate::exit::Ending::Timeout {
        eprintln!("hyperboot: {}", where_it_stood(&outcome, restored));
    }
    // Without a report, a byte the guest wrote to the exit port is its exit
    // code (what a guest without hyperinit has to say).
    let report = GuestMessage::find_report(&outcome.status).or(match outcome.end {
        End::ExitPort(v) => Some(GuestMessage::Exit(i32::from(v))),
        _ => None,
    });
    let why = match (&report, &outcome.end) {
        (None, End::Guest(fault)) => Some(fault.to_string()),
        _ => None,
    };
    Ok(Outcome {
        ending,
        report,
        why,
    })
}

/// How far a VM that ran out of `--timeout` had come: what hyperinit had
/// said, whether the run had begun and hyperinit taken its start, whether the
/// app had written anything — for whoever has to find out why.
fn where_it_stood(o: &hyper_vmm::Outcome, restored: bool) -> String {
    let said: Vec<&str> = o
        .status
        .split(|b| *b == b'\n')
        .filter_map(|l| std::str::from_utf8(l).ok()?.split_whitespace().next())
        .collect();
    let interrupts: Vec<String> = o
        .stats
        .interrupts
        .iter()
        .map(|(device, n)| format!("{device} {n}"))
        .collect();
    format!(
        "at the timeout, this {} VM's init had said: {}; the run {}; {} bytes on the \
         control port waited for it; the app's output {}; {} exits; interrupts: {}",
        if restored { "restored" } else { "cold" },
        if said.is_empty() {
            "nothing".to_string()
        } else {
            said.join(", ")
        },
        if o.started {
            "had begun"
        } else {
            "had not begun"
        },
        o.control_waiting,
        if o.stats.timeline.first_output == 0 {
            "had not come"
        } else {
            "had come"
        },
        o.exits,
        interrupts.join(", ")
    )
}

/// What the VMM measured, into `--stats`.
fn record_stats(o: &hyper_vmm::Outcome, files: &mut crate::stats::ProcFiles, restored: bool) {
    use crate::stats::{set, us};
    use serde_json::json;
    let t = &o.stats.timeline;
    for (k, v) in [
        ("vm_created", t.vm_created),
        ("memory_ready", t.memory_ready),
        ("kernel_ready", t.kernel_ready),
        ("first_kvm_run", t.first_run),
        ("first_guest_exit", t.first_exit),
        ("app_first_output", t.first_output),
        ("app_exited", t.ended),
    ] {
        set(k, us(v));
    }
    // A restored guest started and mounted its root in the run that made
    // the snapshot: only its app's exec is this run's.
    crate::stats::guest_timings(&o.status, t.timings, (!restored).then_some(t.first_run));
    let e = &o.stats.exits;
    let mmio: serde_json::Map<String, serde_json::Value> =
        e.mmio.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    set(
        "exits",
        json!({
            "total": e.total,
            "io": {"com1": e.com1, "com2": e.com2, "exit_port": e.exit_port, "other": e.other_io},
            "mmio": mmio,
            "mmio_unmapped": e.mmio_unmapped,
            "hlt": e.hlt,
            "other": e.other,
        }),
    );
    let irqs: serde_json::Map<String, serde_json::Value> = o
        .stats
        .interrupts
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    set("interrupts", json!(irqs));
    // Not exits: what the guest did without one.
    set(
        "without_exits",
        json!({"queued_writes": e.queued_writes, "notifications": e.notifications}),
    );
    set(
        "peak_rss_kib",
        json!(crate::stats::peak_rss_kib(Some(&mut *files))),
    );
    if let Some(k) = crate::stats::vmm_rss_kib(files, o.stats.guest_memory) {
        set("vmm_rss_kib", json!(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(entrypoint: Option<&[&str]>, cmd: Option<&[&str]>) -> hvm::ImageConfig {
        let v = |a: Option<&[&str]>| a.map(|a| a.iter().map(|s| s.to_string()).collect());
        hvm::ImageConfig {
            entrypoint: v(entrypoint),
            cmd: v(cmd),
            ..Default::default()
        }
    }

    #[test]
    fn the_warmed_program_is_the_images_own() {
        let arg = |e, c| warm_arg(&config(e, c));
        assert_eq!(
            arg(Some(&["/docker-entrypoint.sh", "x"]), Some(&["nginx"])),
            Some("hyper.warm=/docker-entrypoint.sh".into())
        );
        assert_eq!(
            arg(None, Some(&["sh", "-c", "x"])),
            Some("hyper.warm=sh".into())
        );
        assert_eq!(
            arg(Some(&[""]), Some(&["sh"])),
            Some("hyper.warm=sh".into())
        );
        assert_eq!(arg(None, None), None);
        // Words the command line cannot carry are left out.
        assert_eq!(arg(Some(&["/my app"]), None), None);
        assert_eq!(arg(Some(&["/app\"x"]), None), None);
        assert_eq!(arg(Some(&[&"a".repeat(300)]), None), None);
    }
}
