//! hyperboot's command line: the arguments, the diagnostics (`tracing` on
//! stderr, `--verbose` and `-q`), and the one place where a result becomes an
//! exit code ([`crate::exit`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::exit::{self, Exit};
use crate::spec::Overrides;
use crate::{boot, error_chain, BootOptions};

mod boot_args;
use boot_args::Cli;

/// `hyperboot ps|logs|stop|kill|wait|rm`: detached VMs.
#[derive(Parser, Debug)]
#[command(name = "hyperboot", version, about = "Manage detached microVMs")]
struct VmsCli {
    #[command(subcommand)]
    command: VmsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum VmsCommand {
    /// List detached VMs (running ones; -a: all)
    Ps {
        #[arg(short, long)]
        all: bool,
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's output: stdout and stderr as the app wrote them
    Logs {
        /// Keep printing until the VM has exited
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines
        #[arg(long, short = 'n')]
        tail: Option<usize>,
        /// Prefix each line with the time it was written
        #[arg(short, long)]
        timestamps: bool,
        vm: String,
    },
    /// The image's StopSignal to the app, the VM ended after -t seconds
    Stop {
        #[arg(short = 't', long = "time", default_value = "10")]
        time: f64,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// A signal to the app (default KILL)
    Kill {
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Wait until the VMs have exited; print their exit codes
    Wait {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Remove exited VMs (-f: running ones too, ending them)
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        vms: Vec<String>,
    },
}

/// `hyperboot pull URL`: fetch into the cache without booting.
#[derive(Parser, Debug)]
#[command(
    name = "hyperboot pull",
    version,
    about = "Fetch an artifact into the local cache"
)]
struct PullCli {
    /// s3://, gs://, az://, https://, file:// or docker:// URL of an artifact
    url: String,
    /// Fetch only an artifact signed by a key in this OpenSSH allowed_signers
    /// file (default: as ~/.config/hyper/policy.toml requires)
    #[arg(long)]
    allowed_signers: Option<PathBuf>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
    /// No progress messages
    #[arg(short, long)]
    quiet: bool,
}

/// Fetches `url` into the cache (admitting only what `signers` signed),
/// reporting errors the hyperboot way.
fn fetch(
    url: &str,
    progress: bool,
    signers: Option<&hyper_remote::signature::AllowedSigners>,
) -> Result<hyper_remote::fetch::Fetched, ExitCode> {
    match hyper_remote::fetch::fetch_checked(url, &hvm::cache_home(), progress, signers) {
        Ok(f) => {
            if f.transferred > 0 {
                // Just verified in full: the boot need not hash it again.
                if let (Ok(m), Ok(d)) = (
                    std::fs::metadata(&f.path),
                    hex::decode(f.digest.trim_start_matches("sha256:")),
                ) {
                    if let Ok(d) = <[u8; 32]>::try_from(d.as_slice()) {
                        crate::verified::record(&d, &m);
                    }
                }
            }
            Ok(f)
        }
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            Err(ExitCode::from(exit::FAILED))
        }
    }
}

fn pull_main() -> ExitCode {
    let cli = match PullCli::try_parse_from(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    diagnostics(false, cli.quiet);
    let signers = match crate::trust::signers_for(&cli.url, cli.allowed_signers.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return ExitCode::from(exit::FAILED);
        }
    };
    let f = match fetch(&cli.url, !cli.quiet, signers.as_ref()) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if cli.json {
        println!("{}", serde_json::to_string(&f).unwrap_or_default());
    } else {
        if !cli.quiet {
            eprintln!("hyperboot: {} is {}", f.url, f.path.display());
        }
        println!("{}", f.digest);
    }
    ExitCode::SUCCESS
}

/// A usage error (exit 125, as every failure of hyperboot's own), or the
/// help and version text (exit 0).
fn usage(e: clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(if e.use_stderr() { exit::FAILED } else { 0 })
}

/// hyperboot's own messages on stderr, one line each (`hyperboot: …`):
/// notices by default, steps with `--verbose`, warnings and errors only
/// with `-q`.
fn diagnostics(verbose: bool, quiet: bool) {
    use tracing::level_filters::LevelFilter;
    let level = match (verbose, quiet) {
        (true, _) => LevelFilter::DEBUG,
        (_, true) => LevelFilter::WARN,
        _ => LevelFilter::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(Line)
        .try_init();
}

/// `hyperboot: message`, `hyperboot: warning: message`, `hyperboot: error: message`.
struct Line;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Line
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let kind = match *event.metadata().level() {
            tracing::Level::ERROR => "error: ",
            tracing::Level::WARN => "warning: ",
            _ => "",
        };
        write!(w, "hyperboot: {kind}")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// The boot options a command line asks for (reading `--env-file`s).
fn options(cli: Cli) -> Result<BootOptions, String> {
    let mut env = Vec::new();
    for f in &cli.env_file {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("--env-file {}: {e}", f.display()))?;
        env.extend(
            crate::spec::parse_env_file(&text)
                .map_err(|e| format!("--env-file {}: {e}", f.display()))?,
        );
    }
    env.extend(cli.env);
    let publish = cli
        .publish
        .iter()
        .map(|p| crate::net::parse_publish(p).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let binds = cli
        .volume
        .iter()
        .map(|v| crate::spec::parse_bind(v).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BootOptions {
        artifact: PathBuf::from(&cli.artifact),
        backend: cli.backend,
        accel: cli.accel,
        overrides: Overrides {
            entrypoint: cli.entrypoint,
            args: cli.args,
            env,
            workdir: cli.workdir,
            user: cli.user,
            hostname: cli.hostname,
            read_only: cli.read_only,
            tmpfs: cli.tmpfs,
        },
        memory_mib: cli.memory,
        cpus: cli.cpus,
        binds,
        upper: cli.upper,
        interactive: cli.interactive,
        tty: cli.tty,
        timeout: cli.timeout,
        stop_timeout: cli.stop_timeout,
        verbose: cli.verbose,
        console: cli.console,
        stats: cli.stats,
        snapshot: cli.snapshot,
        prepare: false,
        pinned: None,
        net: crate::net::NetOptions {
            mode: cli.net.unwrap_or_default(),
            publish,
            publish_all: cli.publish_all,
            dns: cli.dns,
        },
    })
}

/// `hyperboot ps|logs|stop|kill|wait|rm …`.
fn vms_main() -> ExitCode {
    use crate::vms::commands;
    let cli = match VmsCli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    diagnostics(false, false);
    let each = |vms: &[String], f: &dyn Fn(&str) -> Result<(), crate::vms::VmsError>| {
        let mut code = ExitCode::SUCCESS;
        for vm in vms {
            if let Err(e) = f(vm) {
                tracing::error!("{}", error_chain(&e));
                code = ExitCode::from(exit::FAILED);
            }
        }
        code
    };
    let result = match cli.command {
        VmsCommand::Ps { all, json } => commands::ps(all, json),
        VmsCommand::Logs {
            follow,
            tail,
            timestamps,
            vm,
        } => commands::logs(&vm, follow, tail, timestamps),
        VmsCommand::Stop { time, vms } => {
            return each(&vms, &|vm| commands::stop(vm, time.max(0.0)).map(|_| ()))
        }
        VmsCommand::Kill { signal, vms } => {
            let sig = match crate::spec::signal_number(&signal) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("-s {signal}: {e}");
                    return ExitCode::from(exit::FAILED);
                }
            };
            return each(&vms, &|vm| commands::kill(vm, sig));
        }
        VmsCommand::Wait { vms } => {
            let mut last = 0u8;
            for vm in &vms {
                match commands::wait(vm) {
                    Ok(Some(code)) => {
                        println!("{code}");
                        last = code;
                    }
                    Ok(None) => {
                        tracing::error!("{vm} ended without an exit code: its supervisor vanished");
                        last = exit::FAILED;
                    }
                    Err(e) => {
                        tracing::error!("{}", error_chain(&e));
                        last = exit::FAILED;
                    }
                }
            }
            return ExitCode::from(last);
        }
        VmsCommand::Rm { force, vms } => return each(&vms, &|vm| commands::rm(vm, force)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::from(exit::FAILED)
        }
    }
}

/// `hyperboot __supervise ID`: a detached VM's supervisor.
fn supervise_main(id: Option<String>) -> ExitCode {
    let Some(id) = id else {
        return ExitCode::from(exit::FAILED);
    };
    let code = crate::vms::supervisor::supervise(&id, |spec| {
        let argv = std::iter::once("hyperboot".to_string()).chain(spec.args.iter().cloned());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let mut opts = options(cli)?;
        opts.artifact = spec.artifact.clone();
        opts.pinned = Some(spec.digest.clone());
        Ok(opts)
    });
    ExitCode::from(code)
}

/// `hyperboot -d …`: starts the VM in the background and prints its ID.
/// `pinned`: the digest a signature was checked for; the VM's first run
/// refuses a file that no longer has it, as every later run does.
fn detach_main(cli: Cli, artifact: PathBuf, pinned: Option<String>) -> ExitCode {
    let digest = match pinned.map_or_else(
        || hvm::Artifact::open(&artifact).map(|a| hvm::digest_string(&a.digest())),
        Ok,
    ) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return ExitCode::from(exit::FAILED);
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let d = crate::vms::supervisor::Detach {
        name: cli.name,
        remove: cli.remove,
        restart: cli.restart,
    };
    match crate::vms::supervisor::start(args, &artifact, digest, d) {
        Ok(id) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::from(exit::FAILED)
        }
    }
}

/// `hyperboot [pull|ps|logs|stop|kill|wait|rm] ...`: parses the command
/// line, runs, maps the result to the exit code.
pub fn main() -> ExitCode {
    crate::stats::start();
    hyper_vmm::phase("main");
    let first = std::env::args().nth(1);
    match first.as_deref() {
        Some("pull") => return pull_main(),
        Some("prepare") => return prepare_main(),
        Some("cache") => return cache_main(),
        Some("ps" | "logs" | "stop" | "kill" | "wait" | "rm") => return vms_main(),
        Some("__supervise") => return supervise_main(std::env::args().nth(2)),
        _ => {}
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    diagnostics(cli.verbose, cli.quiet);
    hyper_vmm::phase("command line parsed");
    let signers = match crate::trust::signers_for(&cli.artifact, cli.allowed_signers.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return ExitCode::from(exit::FAILED);
        }
    };
    // A signed local file is booted only as it was when checked.
    let mut pinned = None;
    let artifact = if hyper_remote::is_url(&cli.artifact) {
        match fetch(&cli.artifact, true, signers.as_ref()) {
            Ok(f) => f.path,
            Err(code) => return code,
        }
    } else {
        let path = PathBuf::from(&cli.artifact);
        if let Some(s) = &signers {
            match crate::trust::verify_file(&path, s) {
                Ok((who, digest)) => {
                    tracing::debug!("{}: {digest} signed by {who}", path.display());
                    pinned = Some(digest);
                }
                Err(e) => {
                    tracing::error!("{}", error_chain(&e));
                    return ExitCode::from(exit::FAILED);
                }
            }
        }
        path
    };
    let detach = cli.detach;
    let (name, remove, restart) = (cli.name.clone(), cli.remove, cli.restart);
    let mut opts = match options(cli.clone()) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    if detach {
        let mut cli = cli;
        (cli.name, cli.remove, cli.restart) = (name, remove, restart);
        return detach_main(cli, artifact, pinned);
    }
    opts.artifact = artifact;
    opts.pinned = pinned;
    let result = match boot(&opts) {
        Ok(exit) => exit,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            Exit::Failed
        }
    };
    if let Some(m) = result.message() {
        tracing::error!("{m}");
    }
    ExitCode::from(result.code())
}

/// How long `hyperboot prepare` waits for the snapshot point without
/// `--timeout` (a boot to it takes seconds even under emulation).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(180);

/// `hyperboot prepare ARTIFACT [OPTIONS]`: boots the artifact to the
/// snapshot point with these options and keeps the snapshot, so the next
/// boot with the same options restores it (for systemd's ExecStartPre and
/// the update timer). Prints the snapshot's path.
fn prepare_main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, a)| a)
        .collect();
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    diagnostics(cli.verbose, cli.quiet);
    if cli.detach {
        tracing::error!("hyperboot prepare takes no -d");
        return ExitCode::from(exit::FAILED);
    }
    let artifact = if hyper_remote::is_url(&cli.artifact) {
        match fetch(&cli.artifact, true, None) {
            Ok(f) => f.path,
            Err(code) => return code,
        }
    } else {
        PathBuf::from(&cli.artifact)
    };
    let mut opts = match options(cli) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    opts.artifact = artifact;
    opts.prepare = true;
    // A guest that never reaches the snapshot point must not hold a
    // deploy (or a unit's ExecStartPre) forever.
    opts.timeout = opts.timeout.or(Some(PREPARE_TIMEOUT));
    match crate::boot(&opts) {
        Ok(Exit::App(0)) => ExitCode::SUCCESS,
        Ok(e) => {
            if let Some(m) = e.message() {
                tracing::error!("{m}");
            }
            ExitCode::from(exit::FAILED)
        }
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::from(exit::FAILED)
        }
    }
}

/// `hyperboot cache ls|prune`: the artifacts fetched and the snapshots
/// made on this host.
fn cache_main() -> ExitCode {
    #[derive(Parser, Debug)]
    #[command(
        name = "hyperboot cache",
        about = "hyperboot's cache: fetched artifacts and snapshots"
    )]
    enum CacheCli {
        /// List fetched artifacts and snapshots, with their sizes
        Ls,
        /// Remove snapshots (those of artifacts no longer on this host, or
        /// all with --all) and, with --all, fetched artifacts
        Prune {
            #[arg(long)]
            all: bool,
        },
    }
    let args: Vec<String> = std::env::args()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, a)| a)
        .collect();
    let cli = match CacheCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    diagnostics(false, false);
    let result = match cli {
        CacheCli::Ls => crate::snapshots::list(),
        CacheCli::Prune { all } => crate::snapshots::prune(all),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(exit::FAILED)
        }
    }
}
