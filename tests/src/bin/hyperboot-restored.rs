//! `hyperboot-restored ARGS...`: hyperboot as the nested tier's restored
//! scenarios run it. First `hyperboot prepare` with the same options (the
//! run's own `-d`, `--name`, `--rm`, `--restart` and command left out, its
//! stdin closed), which makes the snapshot of the artifact with those
//! options unless it exists; then this process becomes `hyperboot
//! --snapshot require ARGS...` (same pid, same process group), which must
//! restore it. So every boot of a scenario is a restore, whatever flags it
//! passes, and a boot that is not fails loudly.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hyperboot = std::env::current_exe()
        .expect("own path")
        .with_file_name("hyperboot");
    let mut prepare: Vec<String> = vec!["prepare".into()];
    let mut it = args.iter().take_while(|a| *a != "--");
    while let Some(a) = it.next() {
        match a.as_str() {
            "-d" | "--detach" | "--rm" => {}
            "--name" | "--restart" | "--stats" => {
                it.next();
            }
            s if s.starts_with("--name=")
                || s.starts_with("--restart=")
                || s.starts_with("--stats=") => {}
            _ => prepare.push(a.clone()),
        }
    }
    let out = Command::new(&hyperboot)
        .args(&prepare)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("run hyperboot prepare");
    // A prepare that fails for a reason the run itself also has (a bad
    // flag, an unbootable artifact) is left for the run to report.
    if !out.status.success() {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            eprintln!("hyperboot-restored: prepare: {line}");
        }
    }
    let err = Command::new(&hyperboot)
        .args(["--snapshot", "require"])
        .args(&args)
        .exec();
    eprintln!(
        "hyperboot-restored: cannot run {}: {err}",
        hyperboot.display()
    );
    std::process::exit(125);
}
