//! Harness for the end-to-end tests: finds (or builds) the kernel, hyperinit
//! and the two binaries, makes the busybox test image with
//! `scripts/make-test-image`, builds artifacts and runs `hyperboot`.
//!
//! Inputs come from the environment when set (`HYPER_KERNEL`, `HYPER_INIT`),
//! otherwise from the repository's scripts, so `cargo test -p hyper-tests`
//! works on its own after the README's set-up command.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn script_output(name: &str) -> PathBuf {
    let out = Command::new(repo().join("scripts").join(name))
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    assert!(out.status.success(), "scripts/{name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// The guest kernel: `$HYPER_KERNEL`, or the cached build (built if missing).
pub fn kernel() -> &'static Path {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| std::env::var_os("HYPER_KERNEL").map(PathBuf::from).unwrap_or_else(|| script_output("build-kernel")))
}

/// The static hyperinit: `$HYPER_INIT`, or built now.
pub fn init() -> &'static Path {
    static I: OnceLock<PathBuf> = OnceLock::new();
    I.get_or_init(|| std::env::var_os("HYPER_INIT").map(PathBuf::from).unwrap_or_else(|| script_output("build-init")))
}

fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet", "-p", "hyperbuild", "-p", "hyperboot"])
            .current_dir(repo())
            .status()
            .expect("cargo build");
        assert!(st.success(), "building hyperbuild and hyperboot failed");
    });
    // tests run from target/<profile>/deps/
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join(name)
}

pub fn hyperbuild() -> Command {
    Command::new(bin("hyperbuild"))
}

pub fn hyperboot() -> Command {
    let mut c = Command::new(bin("hyperboot"));
    // Never hang a test run: every boot has a generous bound.
    c.env_remove("HYPER_QEMU");
    c
}

/// A scratch directory that lives for the whole test binary.
pub fn scratch() -> &'static Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

/// Makes the busybox OCI layout (`scripts/make-test-image`) at `dir`.
pub fn make_image(dir: &Path, tag: &str, user: &str) {
    let out = Command::new(repo().join("scripts/make-test-image"))
        .arg(dir)
        .arg(tag)
        .arg(user)
        .output()
        .expect("run make-test-image");
    assert!(out.status.success(), "make-test-image failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Builds `oci:layout` into `out` with the test kernel and init.
pub fn build(layout: &Path, out: &Path) -> Output {
    hyperbuild()
        .arg(format!("oci:{}", layout.display()))
        .arg("-o")
        .arg(out)
        .arg("--kernel")
        .arg(kernel())
        .arg("--init")
        .arg(init())
        .arg("--quiet")
        .output()
        .expect("run hyperbuild")
}

/// The default busybox artifact (image config: Cmd sh, GREETING=hello,
/// WorkingDir /srv/app, root), built once.
pub fn busybox_artifact() -> &'static Path {
    static A: OnceLock<PathBuf> = OnceLock::new();
    A.get_or_init(|| {
        let layout = scratch().join("busybox-layout");
        make_image(&layout, "latest", "");
        let out = scratch().join("busybox.hvm");
        let o = build(&layout, &out);
        assert!(o.status.success(), "hyperbuild failed: {}", String::from_utf8_lossy(&o.stderr));
        out
    })
}

/// The result of one boot.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Boots `artifact` on the QEMU backend with `args` (hyperboot flags, then
/// `--` and the command), bounded by a timeout.
pub fn boot(artifact: &Path, args: &[&str]) -> Run {
    let out = hyperboot()
        .arg("--backend")
        .arg("qemu")
        .arg("--timeout")
        .arg("120")
        .args(args.iter().take_while(|a| **a != "--"))
        .arg(artifact)
        .args(args.iter().skip_while(|a| **a != "--"))
        .output()
        .expect("run hyperboot");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Records a skipped test loudly: on stderr and in `$HYPER_TEST_SKIP_LOG`,
/// which `scripts/test` counts.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("HYPER_TEST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}
