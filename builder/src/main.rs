//! `hyperbuild`: image in, sealed `.hvm` out.
//!
//! Exit codes: 0 success, 1 bad input (image, layer, kernel, init, artifact),
//! 2 internal failure (I/O on the output, a bug).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hyperbuild::build::{self, BuildOptions, InputError};

#[derive(Parser, Debug)]
#[command(name = "hyperbuild", version, about = "Build an OCI image into a sealed .hvm microVM artifact")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// Image reference: oci:PATH[:TAG]
    reference: Option<String>,
    /// Output artifact path
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Guest kernel (uncompressed vmlinux with a PVH entry) [default: $HYPER_KERNEL, then the installed one]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest init (static hyperinit) [default: $HYPER_INIT, then the installed one]
    #[arg(long)]
    init: Option<PathBuf>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
    /// No progress messages on stderr
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Verify an artifact and print its manifest and sections
    Inspect {
        artifact: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hyperbuild: error: {}", chain(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

fn chain(err: &anyhow::Error) -> String {
    err.chain().map(|e| e.to_string()).collect::<Vec<_>>().join(": ")
}

fn exit_code(err: &anyhow::Error) -> u8 {
    let input = err.chain().any(|e| {
        e.is::<InputError>() || e.is::<hvm::ReadError>() || e.is::<hyperbuild::oci::OciError>() || e.is::<UsageError>()
    });
    if input { 1 } else { 2 }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// The default location of an installed component: `$VAR`, else
/// `$XDG_DATA_HOME/hyper/NAME` (`~/.local/share/hyper/NAME`).
fn installed(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share"));
    data.join("hyper").join(name)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Inspect { artifact, json }) = cli.command {
        let out = hyperbuild::inspect::inspect(&artifact, json)?;
        std::io::stdout().write_all(out.as_bytes())?;
        return Ok(());
    }
    let b = cli.build;
    let reference = b.reference.ok_or_else(|| UsageError("missing image reference (hyperbuild oci:PATH[:TAG] -o app.hvm)".into()))?;
    let output = b.output.ok_or_else(|| UsageError("missing -o OUTPUT".into()))?;
    let opts = BuildOptions {
        reference,
        output,
        kernel: b.kernel.unwrap_or_else(|| installed("HYPER_KERNEL", "vmlinux")),
        init: b.init.unwrap_or_else(|| installed("HYPER_INIT", "hyperinit")),
    };
    for (what, p) in [("kernel", &opts.kernel), ("init", &opts.init)] {
        if !p.exists() {
            return Err(UsageError(format!(
                "no {what} at {}: run scripts/setup, or pass --{what}",
                p.display()
            ))
            .into());
        }
    }
    if !b.quiet {
        eprintln!("hyperbuild: building {} -> {}", opts.reference, opts.output.display());
    }
    let report = build::build(&opts)?;
    if b.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        if !b.quiet {
            eprintln!("hyperbuild: wrote {} ({} bytes, rootfs {} bytes)", report.path.display(), report.size, report.rootfs_size);
        }
        println!("{}", report.digest);
    }
    Ok(())
}
