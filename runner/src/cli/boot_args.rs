//! The boot command line (`hyperboot ARTIFACT [OPTIONS] [-- CMD ARGS...]`),
//! parsed by clap from a table.
//!
//! Every start of a VM parses it, restored ones included, so its cost is
//! part of the time to the app's first output. clap's derive turns each of
//! three dozen options into its own straight-line builder code: tens of
//! kilobytes run once, which an emulated host (the nested tier's, under
//! TCG) pays for by translating every byte of it, tens of milliseconds. Here
//! one loop builds the options from [`OPTIONS`], and the values are converted
//! from clap's matches by the small functions below; clap still does the
//! parsing, the errors and the help.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::PossibleValue;
use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches, Command, ValueEnum};

use crate::backend::{AccelChoice, Backend};

/// What `hyperboot ARTIFACT …` was asked.
#[derive(Debug, Clone)]
pub(super) struct Cli {
    pub artifact: String,
    pub args: Vec<String>,
    pub backend: Backend,
    pub accel: AccelChoice,
    pub entrypoint: Option<String>,
    pub env: Vec<String>,
    pub env_file: Vec<PathBuf>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub read_only: bool,
    pub tmpfs: Vec<String>,
    pub memory: u64,
    pub volume: Vec<String>,
    pub upper: Option<PathBuf>,
    pub interactive: bool,
    pub tty: bool,
    pub cpus: u8,
    pub timeout: Option<Duration>,
    pub stop_timeout: Duration,
    pub verbose: bool,
    pub quiet: bool,
    pub console: bool,
    pub publish: Vec<String>,
    pub publish_all: bool,
    pub net: Option<crate::net::NetMode>,
    pub dns: Vec<String>,
    pub detach: bool,
    pub name: Option<String>,
    pub remove: bool,
    pub restart: crate::vms::Restart,
    pub allowed_signers: Option<PathBuf>,
    pub stats: Option<PathBuf>,
    pub snapshot: crate::snapshots::Mode,
}

/// How an option takes values.
#[derive(Clone, Copy)]
enum Takes {
    Flag,
    /// One value.
    One,
    /// Repeatable.
    Many,
    /// One of these values.
    Choice(fn() -> Vec<PossibleValue>),
}

/// One option: its long name is its id.
struct Opt {
    long: &'static str,
    short: Option<char>,
    takes: Takes,
    value_name: Option<&'static str>,
    default: Option<&'static str>,
    help: &'static str,
}

const fn opt(long: &'static str, short: Option<char>, takes: Takes, help: &'static str) -> Opt {
    Opt {
        long,
        short,
        takes,
        value_name: None,
        default: None,
        help,
    }
}

const fn with_default(o: Opt, default: &'static str) -> Opt {
    Opt {
        default: Some(default),
        ..o
    }
}

const fn named(o: Opt, value_name: &'static str) -> Opt {
    Opt {
        value_name: Some(value_name),
        ..o
    }
}

fn choices<E: ValueEnum>() -> Vec<PossibleValue> {
    E::value_variants()
        .iter()
        .filter_map(ValueEnum::to_possible_value)
        .collect()
}

use Takes::{Choice, Flag, Many, One};

/// The options, in the order `--help` shows them.
const OPTIONS: &[Opt] = &[
    with_default(
        named(opt("backend", None, Choice(choices::<Backend>), "Which VMM runs the guest"), "BACKEND"),
        "auto",
    ),
    with_default(
        named(opt(
            "accel",
            None,
            Choice(choices::<AccelChoice>),
            "QEMU accelerator (auto: KVM, except nested PVM KVM or no KVM, then TCG)",
        ), "ACCEL"),
        "auto",
    ),
    named(opt("entrypoint", None, One, "Override the image's Entrypoint ('' clears it)"), "ENTRYPOINT"),
    named(opt(
        "env",
        Some('e'),
        Many,
        "Set an environment variable (KEY=VALUE, or KEY to pass the host's value)",
    ), "ENV"),
    named(opt(
        "env-file",
        None,
        Many,
        "Read environment variables from a file (applied before -e)",
    ), "ENV_FILE"),
    named(opt("workdir", Some('w'), One, "Working directory inside the guest"), "WORKDIR"),
    named(opt("user", Some('u'), One, "User as name, uid, name:group or uid:gid"), "USER"),
    named(opt(
        "hostname",
        None,
        One,
        "Guest hostname [default: the first 12 hex digits of the artifact digest]",
    ), "HOSTNAME"),
    opt(
        "read-only",
        None,
        Flag,
        "Keep the image's root read-only: the app cannot write to it",
    ),
    named(opt(
        "tmpfs",
        None,
        Many,
        "Mount a tmpfs at PATH in the guest (PATH[:OPTIONS], as docker run --tmpfs)",
    ), "TMPFS"),
    with_default(
        named(opt(
            "memory",
            Some('m'),
            One,
            "Guest memory (e.g. 128M, 1G; a plain number is MiB)",
        ), "MEMORY"),
        "128M",
    ),
    named(opt(
        "volume",
        Some('v'),
        Many,
        "Share a host directory: /HOSTDIR:/GUESTDIR[:ro|rw] (virtio-9p; up to 8 on the KVM backend)",
    ), "VOLUME"),
    named(
        opt(
            "upper",
            None,
            One,
            "Keep the root's writes in DIR across runs: an overlayfs upper layer in DIR/fs, its work directory DIR/work (containerd's layout)",
        ),
        "DIR",
    ),
    opt(
        "interactive",
        Some('i'),
        Flag,
        "Keep stdin open: the app reads hyperboot's stdin (as docker run -i)",
    ),
    opt(
        "tty",
        Some('t'),
        Flag,
        "Give the app a pseudo-terminal (as docker run -t; stderr joins stdout)",
    ),
    with_default(
        named(opt("cpus", None, One, "vCPUs for the guest (at most the host's CPUs)"), "CPUS"),
        "1",
    ),
    named(opt(
        "timeout",
        None,
        One,
        "Stop the VM after this many seconds (exit code 124)",
    ), "TIMEOUT"),
    with_default(
        named(opt(
            "stop-timeout",
            None,
            One,
            "On SIGTERM/SIGINT the app gets the image's StopSignal, then SIGKILL after this many seconds",
        ), "STOP_TIMEOUT"),
        "10",
    ),
    opt(
        "verbose",
        None,
        Flag,
        "Show the kernel log, hyperinit's steps and hyperboot's own (-v is --volume, as in docker run)",
    ),
    opt(
        "quiet",
        Some('q'),
        Flag,
        "Only warnings and errors from hyperboot (no notices, no published ports)",
    ),
    opt("console", None, Flag, "Show the kernel log"),
    named(opt(
        "publish",
        Some('p'),
        Many,
        "Publish a guest port: [HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|/udp]",
    ), "PUBLISH"),
    opt(
        "publish-all",
        Some('P'),
        Flag,
        "Publish every port the image exposes on a free host port",
    ),
    named(opt(
        "net",
        None,
        One,
        "Network: user (QEMU user-mode, no root; default on the QEMU backend), tap[:NAME] (needs CAP_NET_ADMIN), redirect[:IFACE] (the guest takes over IFACE of hyperboot's network namespace, e.g. a pod's veth, by tc redirects; CAP_NET_ADMIN), none",
    ), "NET"),
    named(opt("dns", None, Many, "Name server for the guest's /etc/resolv.conf"), "DNS"),
    opt(
        "detach",
        Some('d'),
        Flag,
        "Run in the background: print the VM's ID and leave it running (hyperboot ps, logs, stop, kill, wait, rm)",
    ),
    named(opt("name", None, One, "A name for the detached VM (unique per user)"), "NAME"),
    opt("rm", None, Flag, "Remove the detached VM's record when it ends"),
    with_default(
        named(opt(
            "restart",
            None,
            One,
            "Restart the detached VM: no, on-failure[:N], always",
        ), "RESTART"),
        "no",
    ),
    named(opt(
        "allowed-signers",
        None,
        One,
        "Boot only an artifact signed by a key in this OpenSSH allowed_signers file (default: as ~/.config/hyper/policy.toml requires)",
    ), "ALLOWED_SIGNERS"),
    named(
        opt(
            "stats",
            None,
            One,
            "Write the boot's timeline, exits and memory as one JSON line to FILE (appended; -: stderr)",
        ),
        "FILE|-",
    ),
    with_default(
        named(opt(
            "snapshot",
            None,
            Choice(choices::<crate::snapshots::Mode>),
            "Start from a snapshot of the booted artifact (KVM backend): auto (restore one, or make one on this boot), off, refresh (make a new one), require (restore one or fail)",
        ), "SNAPSHOT"),
        "auto",
    ),
];

/// The boot command, built from [`OPTIONS`].
pub(super) fn command() -> Command {
    let mut cmd = Command::new("hyperboot")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Boot a sealed .hvm artifact as a microVM")
        .after_help("Detached VMs: hyperboot ps|logs|stop|kill|wait|rm (each with --help)")
        .arg(
            Arg::new("artifact")
                .required(true)
                .value_name("ARTIFACT")
                .help("The artifact to boot: a path, or a URL (s3://BUCKET/KEY.hvm, gs://, az://, https://, file://, docker://REGISTRY/REPO:TAG) fetched into the local cache first"),
        )
        .arg(
            Arg::new("args")
                .last(true)
                .num_args(0..)
                .action(ArgAction::Append)
                .value_name("ARGS")
                .help("Replace the image's Cmd (as in `docker run IMAGE CMD ARGS`)"),
        );
    for o in OPTIONS {
        let mut a = Arg::new(o.long).long(o.long).help(o.help);
        if let Some(s) = o.short {
            a = a.short(s);
        }
        a = match o.takes {
            Flag => a.action(ArgAction::SetTrue),
            One => a.action(ArgAction::Set),
            Many => a.action(ArgAction::Append),
            Choice(values) => a
                .action(ArgAction::Set)
                .value_parser(clap::builder::PossibleValuesParser::new(values())),
        };
        if let Some(name) = o.value_name {
            a = a.value_name(name);
        }
        if let Some(d) = o.default {
            a = a.default_value(d);
        }
        cmd = cmd.arg(a);
    }
    cmd.mut_arg("verbose", |a| a.conflicts_with("quiet"))
        .mut_arg("detach", |a| a.conflicts_with_all(["interactive", "tty"]))
        .mut_arg("name", |a| a.requires("detach"))
        .mut_arg("rm", |a| a.requires("detach"))
        .mut_arg("restart", |a| a.requires("detach"))
}

impl Cli {
    /// Parses hyperboot's own command line.
    pub fn try_parse() -> Result<Cli, clap::Error> {
        Self::try_parse_from(std::env::args_os())
    }

    /// Parses `args` (the first is the program's name).
    pub fn try_parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut cmd = command();
        let m = cmd.try_get_matches_from_mut(args)?;
        Values {
            m: &m,
            cmd: &mut cmd,
        }
        .cli()
    }
}

/// clap's matches, turned into a [`Cli`].
struct Values<'a> {
    m: &'a ArgMatches,
    cmd: &'a mut Command,
}

impl Values<'_> {
    fn one(&self, id: &str) -> Option<String> {
        self.m.get_one::<String>(id).cloned()
    }

    fn many(&self, id: &str) -> Vec<String> {
        self.m
            .get_many::<String>(id)
            .map(|v| v.cloned().collect())
            .unwrap_or_default()
    }

    fn flag(&self, id: &str) -> bool {
        self.m.get_flag(id)
    }

    /// The value of `--id`, converted by `f`; an error as clap words one.
    fn parsed<T, E: std::fmt::Display>(
        &mut self,
        id: &str,
        f: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Option<T>, clap::Error> {
        let Some(v) = self.one(id) else {
            return Ok(None);
        };
        f(&v).map(Some).map_err(|e| {
            self.cmd.error(
                ErrorKind::ValueValidation,
                format!("invalid value '{v}' for '--{id}': {e}"),
            )
        })
    }

    /// `parsed`, for an option with a default (always present).
    fn required<T, E: std::fmt::Display>(
        &mut self,
        id: &str,
        f: impl Fn(&str) -> Result<T, E>,
    ) -> Result<T, clap::Error> {
        self.parsed(id, f)?.ok_or_else(|| {
            self.cmd
                .error(ErrorKind::MissingRequiredArgument, format!("--{id}"))
        })
    }

    fn cli(mut self) -> Result<Cli, clap::Error> {
        let choice = |s: &str| -> Result<_, String> { Ok(s.to_string()) };
        let backend = self.required("backend", choice)?;
        let accel = self.required("accel", choice)?;
        let snapshot = self.required("snapshot", choice)?;
        Ok(Cli {
            artifact: self.one("artifact").unwrap_or_default(),
            args: self.many("args"),
            backend: Backend::from_str(&backend, false).unwrap_or(Backend::Auto),
            accel: AccelChoice::from_str(&accel, false).unwrap_or(AccelChoice::Auto),
            entrypoint: self.one("entrypoint"),
            env: self.many("env"),
            env_file: self
                .many("env-file")
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            workdir: self.one("workdir"),
            user: self.one("user"),
            hostname: self.one("hostname"),
            read_only: self.flag("read-only"),
            tmpfs: self.many("tmpfs"),
            memory: self.required("memory", parse_memory)?,
            volume: self.many("volume"),
            upper: self.one("upper").map(PathBuf::from),
            interactive: self.flag("interactive"),
            tty: self.flag("tty"),
            cpus: self.required("cpus", parse_cpus)?,
            timeout: self.parsed("timeout", parse_seconds)?,
            stop_timeout: self.required("stop-timeout", parse_seconds_or_zero)?,
            verbose: self.flag("verbose"),
            quiet: self.flag("quiet"),
            console: self.flag("console"),
            publish: self.many("publish"),
            publish_all: self.flag("publish-all"),
            net: self.parsed("net", str::parse::<crate::net::NetMode>)?,
            dns: self.many("dns"),
            detach: self.flag("detach"),
            name: self.one("name"),
            remove: self.flag("rm"),
            restart: self.required("restart", str::parse::<crate::vms::Restart>)?,
            allowed_signers: self.one("allowed-signers").map(PathBuf::from),
            stats: self.one("stats").map(PathBuf::from),
            snapshot: crate::snapshots::Mode::from_str(&snapshot, false).unwrap_or_default(),
        })
    }
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err("expected a number of vCPUs from 1 to 64".into()),
    }
}

pub(super) fn parse_memory(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'm' => 1,
                'g' => 1024,
                _ => return Err(format!("unknown unit in {s:?} (use M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mib = n.checked_mul(mult).ok_or("size too large")?;
    if mib < 32 {
        return Err(format!(
            "{mib} MiB is too little memory for a guest (at least 32M)"
        ));
    }
    Ok(mib)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let s = s.trim_end_matches('s');
    let v: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s:?}"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err("the timeout must be positive".into());
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_seconds_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim_end_matches('s') == "0" {
        return Ok(Duration::ZERO);
    }
    parse_seconds(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hyperboot").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = parse(&["app.hvm"]).unwrap();
        assert_eq!(c.artifact, "app.hvm");
        assert!(c.args.is_empty() && c.env.is_empty() && c.net.is_none());
        assert_eq!((c.backend, c.accel), (Backend::Auto, AccelChoice::Auto));
        assert_eq!((c.memory, c.cpus), (128, 1));
        assert_eq!(c.stop_timeout, Duration::from_secs(10));
        assert_eq!(c.timeout, None);
        assert_eq!(c.restart, crate::vms::Restart::No);
        assert_eq!(c.snapshot, crate::snapshots::Mode::Auto);
        assert!(!c.interactive && !c.tty && !c.detach && !c.remove && !c.read_only);
    }

    #[test]
    fn options_as_docker_run_takes_them() {
        let c = parse(&[
            "-it",
            "-e",
            "A=1",
            "--env=B",
            "-eC",
            "-m",
            "1G",
            "--cpus",
            "2",
            "-p",
            "8080:80",
            "-P",
            "-v",
            "/a:/b:ro",
            "-u",
            "app",
            "-w",
            "/srv",
            "--entrypoint",
            "",
            "--net",
            "tap:t0",
            "--backend",
            "kvm",
            "--snapshot=off",
            "--timeout",
            "1.5s",
            "--stop-timeout",
            "0",
            "--read-only",
            "--tmpfs",
            "/run",
            "--dns",
            "1.1.1.1",
            "--stats",
            "-",
            "--upper",
            "/u",
            "app.hvm",
            "--",
            "sh",
            "-c",
            "id",
        ])
        .unwrap();
        assert!(c.interactive && c.tty && c.publish_all && c.read_only);
        assert_eq!(c.env, ["A=1", "B", "C"]);
        assert_eq!((c.memory, c.cpus), (1024, 2));
        assert_eq!(c.publish, ["8080:80"]);
        assert_eq!(c.volume, ["/a:/b:ro"]);
        assert_eq!(
            (c.user.as_deref(), c.workdir.as_deref()),
            (Some("app"), Some("/srv"))
        );
        assert_eq!(c.entrypoint.as_deref(), Some(""));
        assert_eq!(c.net, Some(crate::net::NetMode::Tap(Some("t0".into()))));
        assert_eq!(c.backend, Backend::Kvm);
        assert_eq!(c.snapshot, crate::snapshots::Mode::Off);
        assert_eq!(c.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(c.stop_timeout, Duration::ZERO);
        assert_eq!(c.tmpfs, ["/run"]);
        assert_eq!(c.dns, ["1.1.1.1"]);
        assert_eq!(c.stats, Some(PathBuf::from("-")));
        assert_eq!(c.upper, Some(PathBuf::from("/u")));
        assert_eq!(c.artifact, "app.hvm");
        assert_eq!(c.args, ["sh", "-c", "id"]);
    }

    #[test]
    fn detached_runs() {
        let c = parse(&[
            "-d",
            "--name",
            "web",
            "--rm",
            "--restart",
            "on-failure:3",
            "a.hvm",
        ])
        .unwrap();
        assert!(c.detach && c.remove);
        assert_eq!(c.name.as_deref(), Some("web"));
        assert_eq!(c.restart, crate::vms::Restart::OnFailure(Some(3)));
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        for (args, kind) in [
            (&["--memory", "16M", "a"][..], ErrorKind::ValueValidation),
            (&["-m", "12X", "a"], ErrorKind::ValueValidation),
            (&["--cpus", "0", "a"], ErrorKind::ValueValidation),
            (&["--cpus", "65", "a"], ErrorKind::ValueValidation),
            (&["--timeout", "0", "a"], ErrorKind::ValueValidation),
            (&["--net", "bogus", "a"], ErrorKind::ValueValidation),
            (
                &["--restart", "sometimes", "-d", "a"],
                ErrorKind::ValueValidation,
            ),
            (&["--backend", "xen", "a"], ErrorKind::InvalidValue),
            (&["--snapshot", "maybe", "a"], ErrorKind::InvalidValue),
            (&["--verbose", "-q", "a"], ErrorKind::ArgumentConflict),
            (&["-d", "-i", "a"], ErrorKind::ArgumentConflict),
            (&["--name", "x", "a"], ErrorKind::MissingRequiredArgument),
            (&["--rm", "a"], ErrorKind::MissingRequiredArgument),
            (&["--bogus", "a"], ErrorKind::UnknownArgument),
            (&["a", "cmd"], ErrorKind::UnknownArgument),
            (&[], ErrorKind::MissingRequiredArgument),
        ] {
            let e = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"));
            assert_eq!(e.kind(), kind, "{args:?}: {e}");
            assert!(e.use_stderr(), "{args:?}");
        }
    }

    #[test]
    fn help_and_version_are_not_errors() {
        for a in ["--help", "-h", "--version", "-V"] {
            let e = parse(&[a]).err().unwrap();
            assert!(!e.use_stderr(), "{a}");
        }
        let help = command().render_help().to_string();
        for o in OPTIONS {
            assert!(
                help.contains(&format!("--{}", o.long)),
                "--{} in the help",
                o.long
            );
        }
        assert!(
            help.contains("[possible values: auto, kvm, qemu]"),
            "{help}"
        );
    }
}
