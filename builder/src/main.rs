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
#[command(
    name = "hyperbuild",
    version,
    about = "Build an OCI image into a sealed .hvm microVM artifact"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// Image: a registry reference as for `docker pull` (nginx:latest,
    /// ghcr.io/org/app@sha256:…, 127.0.0.1:5000/app:tag), oci:PATH[:TAG] or
    /// docker-archive:PATH[:REF]
    reference: Option<String>,
    /// Output: a path, a URL (s3://BUCKET/KEY.hvm, gs://, az://, file:///PATH)
    /// streamed to object storage, or an OCI registry (docker://REGISTRY/REPO:TAG)
    #[arg(short, long)]
    output: Option<String>,
    /// For a URL output: replace a different artifact already under the key
    /// (artifacts are immutable by default)
    #[arg(long)]
    replace: bool,
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
    /// Platform to pick from a multi-platform image (os/arch[/variant])
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// When to ask the registry what a tag points to: always (every build;
    /// cached blobs are reused), missing (only when not cached), never
    #[arg(long, value_enum, default_value = "always")]
    pull: hyperbuild::registry::PullPolicy,
    /// A registry (host[:port]) reached over plain HTTP (loopback ones always are)
    #[arg(long = "insecure-registry")]
    insecure_registry: Vec<String>,
    /// Registry user name (the password is read from stdin with --password-stdin)
    #[arg(long, requires = "password_stdin")]
    username: Option<String>,
    /// Read the registry password from stdin
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// How the rootfs stores file contents: lz4hc (smallest), lz4 (fastest
    /// compressed build) or none; the guest kernel decompresses on read
    #[arg(long, default_value = "lz4")]
    compress: hyperbuild::spool::Compression,
    /// Read every layer afresh, and keep none for later builds (by default a
    /// layer read once is reused, so a rebuild reads only changed layers)
    #[arg(long)]
    no_cache: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Verify an artifact and print its manifest and sections
    Inspect {
        artifact: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Upload a built artifact to object storage (s3://, gs://, az://, file://)
    /// or an OCI registry (docker://REGISTRY/REPO:TAG), or copy one within a
    /// bucket (push s3://b/app/c1.hvm s3://b/app/current.hvm --replace)
    Push {
        artifact: String,
        url: String,
        /// Replace a different artifact already under the key or tag
        #[arg(long)]
        replace: bool,
        /// Print the result as JSON on stdout
        #[arg(long)]
        json: bool,
        /// Registry user name (the password is read from stdin with --password-stdin)
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password from stdin
        #[arg(long, requires = "username")]
        password_stdin: bool,
    },
    /// Sign an artifact with an SSH key (ed25519 or ECDSA) in OpenSSH's format:
    /// PATH.sig beside a file, KEY.sig beside an object, a referrer in a registry
    Sign {
        /// The OpenSSH private key
        #[arg(long)]
        key: PathBuf,
        /// A path, an object-store URL or docker://REGISTRY/REPO:TAG
        artifact: String,
        /// Registry user name (the password is read from stdin with --password-stdin)
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password from stdin
        #[arg(long, requires = "username")]
        password_stdin: bool,
    },
    /// The blob cache shared by builds (`$XDG_CACHE_HOME/hyper`)
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// List cached blobs
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove blobs and read layers no cached reference needs (--all: everything)
    Prune {
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    // A usage error is bad input (exit 1, as documented; clap's own is 2,
    // which hyperbuild keeps for internal failures); help and version exit 0.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hyperbuild: error: {}", chain(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

fn chain(err: &anyhow::Error) -> String {
    err.chain()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn exit_code(err: &anyhow::Error) -> u8 {
    let input = err.chain().any(|e| {
        e.is::<InputError>()
            || e.is::<hvm::ReadError>()
            || e.is::<hyperbuild::oci::OciError>()
            || e.is::<UsageError>()
            || e.is::<BadArtifact>()
            || e.is::<hyper_remote::signature::SignError>()
            || e.is::<hyperbuild::registry::RegistryError>()
            || e.downcast_ref::<hyper_remote::RemoteError>()
                .or_else(|| {
                    e.downcast_ref::<std::io::Error>()
                        .and_then(|io| io.get_ref())
                        .and_then(|inner| inner.downcast_ref())
                })
                .is_some_and(remote_input_error)
    });
    if input {
        1
    } else {
        2
    }
}

/// Remote errors the user can fix (a bad URL or key, an existing artifact)
/// rather than a failed transfer.
fn remote_input_error(e: &hyper_remote::RemoteError) -> bool {
    use hyper_remote::RemoteError as R;
    !matches!(e, R::Store { .. } | R::Io { .. })
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn parse_platform(s: &str) -> Result<hyperbuild::oci::PlatformSpec, UsageError> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] => Ok(hyperbuild::oci::PlatformSpec {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: None,
        }),
        [os, arch, v] => Ok(hyperbuild::oci::PlatformSpec {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: Some(v.to_string()),
        }),
        _ => Err(UsageError(format!(
            "--platform {s:?}: expected os/arch[/variant], e.g. linux/amd64"
        ))),
    }
}

fn cache_command(cmd: CacheCommand) -> anyhow::Result<()> {
    use hyperbuild::cache::Cache;
    let cache = Cache::open(Cache::default_root())?;
    match cmd {
        CacheCommand::Ls { json } => {
            let blobs = cache.list()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({ "root": cache.root(), "blobs": blobs })
                    )?
                );
            } else {
                for b in &blobs {
                    println!("{} {:>12}", b.digest, b.size);
                }
                eprintln!(
                    "{} blobs, {} bytes in {}",
                    blobs.len(),
                    blobs.iter().map(|b| b.size).sum::<u64>(),
                    cache.root().display()
                );
            }
        }
        CacheCommand::Prune { all } => {
            let mut keep = std::collections::BTreeSet::new();
            if !all {
                for m in cache.referenced_manifests() {
                    hyperbuild::registry::reachable(&cache, &m, &mut keep);
                }
            }
            let (n, bytes) = cache.prune(&keep)?;
            let (ln, lbytes) = hyperbuild::layer_cache::LayerCache::prune(cache.root(), &keep);
            eprintln!("removed {n} blobs, {bytes} bytes; {ln} read layers, {lbytes} bytes");
        }
    }
    Ok(())
}

/// `--username` with the password from stdin.
fn read_credentials(username: Option<String>) -> anyhow::Result<Option<(String, String)>> {
    Ok(match username {
        Some(u) => {
            let mut pw = String::new();
            std::io::stdin().read_line(&mut pw)?;
            Some((u, pw.trim_end_matches(['\n', '\r']).to_string()))
        }
        None => None,
    })
}

fn report_push(p: &hyper_remote::oci::Pushed, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(p)?);
    } else {
        match p.outcome {
            "unchanged" => eprintln!("hyperbuild: {} already holds this artifact", p.url),
            _ => eprintln!(
                "hyperbuild: pushed {} ({} bytes; manifest {})",
                p.url, p.size, p.manifest
            ),
        }
        println!("{}", p.digest);
    }
    Ok(())
}

/// `hyperbuild sign --key KEY ARTIFACT|URL`: the signature of the artifact's
/// header goes beside it.
fn sign(
    key: &std::path::Path,
    target: &str,
    creds: Option<(String, String)>,
) -> anyhow::Result<()> {
    use hyper_remote::{oci, signature};
    let (header, digest, placed) = if target.starts_with("docker://") {
        let r = oci::Reference::parse(target)?;
        let reg = oci::Registry::connect(&r, creds)?;
        let m = oci::resolve(&reg)?;
        let header = reg.blob_range(&m.file_digest, 0, hvm::HEADER_LEN as u64)?;
        let (manifest, _) =
            reg.manifest(&m.digest)?
                .ok_or_else(|| hyper_remote::RemoteError::NotFound {
                    url: target.to_string(),
                })?;
        check_header(target, &header, &m.artifact_digest)?;
        let sig = signature::sign(key, &header)?;
        let d = oci::push_signature(&reg, &m, manifest.len() as u64, sig.as_bytes())?;
        (
            header,
            m.artifact_digest,
            format!(
                "{target} (referrer {d}, tag {})",
                oci::signature_tag(&m.digest)
            ),
        )
    } else if hyper_remote::is_url(target) {
        let header = hyper_remote::read_object(target)?
            .filter(|b| b.len() >= hvm::HEADER_LEN)
            .ok_or_else(|| hyper_remote::RemoteError::NotFound {
                url: target.to_string(),
            })?;
        let header = header[..hvm::HEADER_LEN].to_vec();
        let digest = oci::sha256(&header);
        hvm::Header::parse(&header).map_err(|e| BadArtifact(target.to_string(), e.to_string()))?;
        let sig = signature::sign(key, &header)?;
        let at = format!("{target}.sig");
        hyper_remote::write_object(&at, sig.as_bytes())?;
        (header, digest, at)
    } else {
        let path = std::path::Path::new(target);
        let a = hvm::Artifact::open(path)?;
        let mut header = vec![0u8; hvm::HEADER_LEN];
        std::os::unix::fs::FileExt::read_exact_at(a.file(), &mut header, 0)?;
        let sig = signature::sign(key, &header)?;
        let at = format!("{target}.sig");
        hyper_remote::write_object(
            &format!("file://{}", std::path::absolute(&at)?.display()),
            sig.as_bytes(),
        )?;
        (header, hvm::digest_string(&a.digest()), at)
    };
    debug_assert_eq!(header.len(), hvm::HEADER_LEN);
    eprintln!("hyperbuild: signed {digest}: {placed}");
    println!("{digest}");
    Ok(())
}

/// A header fetched for signing must be the one the manifest names.
fn check_header(target: &str, header: &[u8], digest: &str) -> anyhow::Result<()> {
    hvm::Header::parse(header).map_err(|e| BadArtifact(target.to_string(), e.to_string()))?;
    let sealed = hyper_remote::oci::sha256(header);
    if sealed != digest {
        return Err(BadArtifact(
            target.to_string(),
            format!("its header seals {sealed}, its manifest names {digest}"),
        )
        .into());
    }
    Ok(())
}

/// An artifact that is not one, or not the one its store names (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0} is not a usable artifact: {1}")]
struct BadArtifact(String, String);

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Inspect { artifact, json }) => {
            let out = hyperbuild::inspect::inspect(&artifact, json)?;
            std::io::stdout().write_all(out.as_bytes())?;
            return Ok(());
        }
        Some(Command::Cache(c)) => return cache_command(c),
        Some(Command::Sign {
            key,
            artifact,
            username,
            ..
        }) => return sign(&key, &artifact, read_credentials(username)?),
        Some(Command::Push {
            artifact,
            url,
            replace,
            json,
            username,
            ..
        }) => {
            if url.starts_with("docker://") {
                if hyper_remote::is_url(&artifact) {
                    return Err(UsageError(
                        "push to a registry takes a local artifact file".into(),
                    )
                    .into());
                }
                let creds = read_credentials(username)?;
                let p = hyper_remote::oci::push(
                    std::path::Path::new(&artifact),
                    &url,
                    creds,
                    replace,
                    true,
                )?;
                report_push(&p, json)?;
                return Ok(());
            }
            if !hyper_remote::is_url(&url) {
                return Err(UsageError(format!(
                    "{url:?} is not a URL (s3://BUCKET/KEY.hvm, gs://, az://, file:///PATH)"
                ))
                .into());
            }
            let target = hyper_remote::Target::open(&url)?;
            let p = if hyper_remote::is_url(&artifact) {
                hyper_remote::publish::copy(&artifact, target, replace)?
            } else {
                hyper_remote::publish::push(std::path::Path::new(&artifact), target, replace)?
            };
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                if p.outcome == hyper_remote::publish::Outcome::AlreadyPresent {
                    eprintln!("hyperbuild: {} already holds this artifact", p.url);
                } else {
                    eprintln!("hyperbuild: pushed {} ({} bytes)", p.url, p.size);
                }
                println!("{}", p.digest);
            }
            return Ok(());
        }
        None => {}
    }
    let b = cli.build;
    let reference = b.reference.ok_or_else(|| {
        UsageError("missing image reference (hyperbuild oci:PATH[:TAG] -o app.hvm)".into())
    })?;
    let output = b
        .output
        .ok_or_else(|| UsageError("missing -o OUTPUT".into()))?;
    let credentials = read_credentials(b.username)?;
    let push_creds = credentials.clone();
    let pull = hyperbuild::registry::PullOptions {
        platform: parse_platform(&b.platform)?,
        policy: b.pull,
        insecure: b.insecure_registry,
        credentials,
        quiet: b.quiet,
    };
    // A registry output: built into the cache, then pushed.
    let registry = output.starts_with("docker://").then(|| output.clone());
    let staged = match &registry {
        Some(_) => {
            let dir = hyperbuild::cache::Cache::default_root().join("staging");
            std::fs::create_dir_all(&dir)?;
            Some(
                tempfile::Builder::new()
                    .suffix(".hvm")
                    .tempfile_in(&dir)?
                    .into_temp_path(),
            )
        }
        None => None,
    };
    let output = match &staged {
        Some(t) => t.to_string_lossy().into_owned(),
        None => output,
    };
    let opts = BuildOptions {
        reference,
        output: build::Output::parse(&output, b.replace),
        pull,
        cache_dir: hyperbuild::cache::Cache::default_root(),
        compression: b.compress,
        reuse_layers: !b.no_cache,
        kernel: b
            .kernel
            .unwrap_or_else(|| hyperbuild::installed("HYPER_KERNEL", "vmlinux")),
        init: b
            .init
            .unwrap_or_else(|| hyperbuild::installed("HYPER_INIT", "hyperinit")),
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
        eprintln!("hyperbuild: building {} -> {}", opts.reference, opts.output);
    }
    let report = build::build(&opts)?;
    if let (Some(url), Some(staged)) = (registry, staged) {
        let p = hyper_remote::oci::push(&staged, &url, push_creds, b.replace, !b.quiet)?;
        if b.json {
            let mut v = serde_json::to_value(&report)?;
            v["output"] = url.clone().into();
            v["manifest"] = p.manifest.clone().into();
            v["outcome"] = p.outcome.into();
            println!("{v}");
        } else {
            if !b.quiet {
                eprintln!(
                    "hyperbuild: {} {url} ({} bytes; manifest {})",
                    if p.outcome == "unchanged" {
                        "already at"
                    } else {
                        "pushed"
                    },
                    p.size,
                    p.manifest
                );
            }
            println!("{}", report.digest);
        }
        return Ok(());
    }
    if b.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        if !b.quiet {
            if report.outcome == Some(hyper_remote::publish::Outcome::AlreadyPresent) {
                eprintln!(
                    "hyperbuild: {} already holds this artifact; nothing uploaded",
                    report.output
                );
            } else {
                eprintln!(
                    "hyperbuild: wrote {} ({} bytes, rootfs {} bytes; {} of {} layers reused)",
                    report.output,
                    report.size,
                    report.rootfs_size,
                    report.layers_reused,
                    report.layers
                );
            }
        }
        println!("{}", report.digest);
    }
    Ok(())
}
