//! The OCI runtime spec (`config.json` in the bundle) as hyperboot's
//! command line: the process, the mounts, the hostname and the resource
//! limits. What a VM cannot honour is refused here, with the field named.

use serde_json::Value;

/// Mounts every OCI runtime gives a container; the guest kernel and
/// hyperinit provide their own.
const GUEST_PROVIDES: [&str; 8] = [
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
    "/run",
];

/// Files a container manager binds into a container (Kubernetes' CRI does):
/// the guest makes its own.
const GUEST_MAKES: [&str; 4] = [
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/termination-log",
];

/// Guest memory when the spec sets no limit, as hyperboot's default.
const DEFAULT_MEMORY_MIB: u64 = 128;
/// The smallest guest our kernel and hyperinit boot in comfortably.
const MIN_MEMORY_MIB: u64 = 64;

/// What the spec asks for, as hyperboot arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// hyperboot's options before the artifact (`--entrypoint`, `-e`, …).
    pub options: Vec<String>,
    /// The process arguments after the entrypoint (after `--`).
    pub args: Vec<String>,
    pub terminal: bool,
    /// The network namespace to join, if the spec names one.
    pub netns: Option<String>,
    /// Host paths skipped because the guest makes its own (for the log).
    pub skipped: Vec<String>,
    /// Name servers from the resolv.conf the spec binds (Kubernetes'), for
    /// a VM on the namespace's network.
    pub dns: Vec<String>,
}

/// Why a spec cannot run as a VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("config.json is not valid JSON: {0}")]
    Json(String),
    #[error("config.json: {0}")]
    Field(String),
    #[error("config.json: mount {dest}: {reason}")]
    Mount { dest: String, reason: String },
}

fn field(what: impl Into<String>) -> SpecError {
    SpecError::Field(what.into())
}

/// Reads the spec; `host_cpus` bounds the vCPUs a CPU quota asks for.
pub fn plan(config: &[u8], host_cpus: u32) -> Result<Plan, SpecError> {
    let spec: Value = serde_json::from_slice(config).map_err(|e| SpecError::Json(e.to_string()))?;
    let process = spec
        .get("process")
        .ok_or_else(|| field("no process to run"))?;
    let args = strings(process.get("args"), "process.args")?;
    let (entry, rest) = args
        .split_first()
        .ok_or_else(|| field("process.args is empty"))?;
    let mut options = vec!["--entrypoint".to_string(), entry.clone()];
    for kv in strings(process.get("env"), "process.env")? {
        if !kv.contains('=') {
            return Err(field(format!("process.env entry {kv:?} is not KEY=VALUE")));
        }
        options.extend(["-e".into(), kv]);
    }
    if let Some(cwd) = process.get("cwd").and_then(Value::as_str) {
        if !cwd.is_empty() && cwd != "/" {
            options.extend(["-w".into(), cwd.to_string()]);
        }
    }
    if let Some(user) = process.get("user") {
        let id = |k: &str| user.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (uid, gid) = (id("uid"), id("gid"));
        if uid != 0 || gid != 0 {
            options.extend(["-u".into(), format!("{uid}:{gid}")]);
        }
    }
    let terminal = process
        .get("terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(h) = spec.get("hostname").and_then(Value::as_str) {
        if !h.is_empty() {
            options.extend(["--hostname".into(), h.to_string()]);
        }
    }
    if spec
        .get("root")
        .and_then(|r| r.get("readonly"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        options.push("--read-only".into());
    }
    let mut skipped = Vec::new();
    let mut dns = Vec::new();
    for m in spec
        .get("mounts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        mount(m, &mut options, &mut skipped)?;
        if m.get("destination").and_then(Value::as_str) == Some("/etc/resolv.conf") {
            let source = m.get("source").and_then(Value::as_str).unwrap_or_default();
            dns = std::fs::read_to_string(source)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("nameserver"))
                .map(|s| s.trim().to_string())
                .filter(|s| s.parse::<std::net::IpAddr>().is_ok())
                .collect();
        }
    }
    let resources = spec.pointer("/linux/resources");
    let memory = resources
        .and_then(|r| r.pointer("/memory/limit"))
        .and_then(Value::as_i64)
        .filter(|&l| l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20))
        .unwrap_or(DEFAULT_MEMORY_MIB);
    if memory < MIN_MEMORY_MIB {
        return Err(field(format!(
            "linux.resources.memory.limit is {memory} MiB; a VM needs at least {MIN_MEMORY_MIB} MiB"
        )));
    }
    options.extend(["-m".into(), format!("{memory}M")]);
    let quota = resources
        .and_then(|r| r.pointer("/cpu/quota"))
        .and_then(Value::as_i64);
    let period = resources
        .and_then(|r| r.pointer("/cpu/period"))
        .and_then(Value::as_u64)
        .filter(|&p| p > 0)
        .unwrap_or(100_000);
    let cpus = match quota {
        Some(q) if q > 0 => (q as u64)
            .div_ceil(period)
            .clamp(1, host_cpus.max(1) as u64),
        _ => 1,
    };
    options.extend(["--cpus".into(), cpus.to_string()]);
    let mut netns = None;
    // Under Kubernetes the pod's sandbox (pause) container comes first; it
    // does not use the network, and the pod's interface is left to the app
    // container's VM.
    let sandbox = spec
        .pointer("/annotations/io.kubernetes.cri.container-type")
        .and_then(Value::as_str)
        == Some("sandbox");
    for ns in spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if ns.get("type").and_then(Value::as_str) == Some("network") {
            netns = ns
                .get("path")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty() && !sandbox)
                .map(str::to_string);
        }
    }
    Ok(Plan {
        options,
        args: rest.to_vec(),
        terminal,
        netns,
        skipped,
        dns,
    })
}

fn strings(v: Option<&Value>, what: &str) -> Result<Vec<String>, SpecError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.as_array()
        .ok_or_else(|| field(format!("{what} is not a list")))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| field(format!("{what} holds a non-string")))
        })
        .collect()
}

/// One entry of `mounts`: a host directory becomes a volume (`-v`), a tmpfs
/// a `--tmpfs`; the kernel's own filesystems are the guest's.
fn mount(m: &Value, options: &mut Vec<String>, skipped: &mut Vec<String>) -> Result<(), SpecError> {
    let dest = m
        .get("destination")
        .and_then(Value::as_str)
        .ok_or_else(|| field("a mount without a destination"))?
        .to_string();
    let err = |reason: &str| SpecError::Mount {
        dest: dest.clone(),
        reason: reason.to_string(),
    };
    let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
    let opts = strings(m.get("options"), "mount options")?;
    let bind = kind == "bind" || opts.iter().any(|o| o == "bind" || o == "rbind");
    if GUEST_PROVIDES.contains(&dest.as_str()) {
        // Kubernetes binds the sandbox's /dev/shm: the guest has its own.
        if bind {
            skipped.push(dest);
        }
        return Ok(());
    }
    if bind {
        let source = m
            .get("source")
            .and_then(Value::as_str)
            .ok_or_else(|| err("a bind mount without a source"))?;
        let md = std::fs::metadata(source).map_err(|e| err(&format!("source {source}: {e}")))?;
        if !md.is_dir() {
            if GUEST_MAKES.contains(&dest.as_str()) {
                skipped.push(dest);
                return Ok(());
            }
            return Err(err(
                "only directories can be shared with the VM (virtio-9p); bind a directory that holds the file",
            ));
        }
        let ro = opts.iter().any(|o| o == "ro");
        options.extend([
            "-v".into(),
            format!("{source}:{dest}:{}", if ro { "ro" } else { "rw" }),
        ]);
        return Ok(());
    }
    match kind {
        "tmpfs" => {
            let keep: Vec<&str> = opts
                .iter()
                .map(String::as_str)
                .filter(|o| o.starts_with("size=") || o.starts_with("mode="))
                .collect();
            let spec = if keep.is_empty() {
                dest.clone()
            } else {
                format!("{dest}:{}", keep.join(","))
            };
            options.extend(["--tmpfs".into(), spec]);
            Ok(())
        }
        "proc" | "sysfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2" => Err(err(&format!(
            "a {kind} filesystem at {dest} is not supported in the VM (the guest mounts its own at the usual places)"
        ))),
        other => Err(err(&format!("mount type {other:?} is not supported in the VM"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["/bin/sh","-c","echo hi"],"env":["PATH=/bin","A=1"],"cwd":"/srv","user":{{"uid":1000,"gid":100}},"terminal":false}},"root":{{"path":"rootfs"}},"hostname":"box",
            "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},{{"destination":"/dev","type":"tmpfs","source":"tmpfs"}},{{"destination":"/sys","type":"sysfs","source":"sysfs"}}]{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn the_process_becomes_hyperboots_command_line() {
        let p = plan(&spec(""), 2).unwrap();
        assert_eq!(
            p.options,
            [
                "--entrypoint",
                "/bin/sh",
                "-e",
                "PATH=/bin",
                "-e",
                "A=1",
                "-w",
                "/srv",
                "-u",
                "1000:100",
                "--hostname",
                "box",
                "-m",
                "128M",
                "--cpus",
                "1"
            ]
        );
        assert_eq!(p.args, ["-c", "echo hi"]);
        assert!(!p.terminal);
        assert_eq!(p.netns, None);
    }

    #[test]
    fn limits_become_vcpus_and_memory() {
        let p = plan(
            &spec(r#","linux":{"resources":{"memory":{"limit":268435456},"cpu":{"quota":150000,"period":100000}},"namespaces":[{"type":"network","path":"/var/run/netns/pod"}]}"#),
            4,
        )
        .unwrap();
        let joined = p.options.join(" ");
        assert!(joined.ends_with("-m 256M --cpus 2"), "{joined}");
        assert_eq!(p.netns.as_deref(), Some("/var/run/netns/pod"));
        let p = plan(
            &spec(r#","annotations":{"io.kubernetes.cri.container-type":"sandbox"},"linux":{"namespaces":[{"type":"network","path":"/var/run/netns/pod"}]}"#),
            4,
        )
        .unwrap();
        assert_eq!(
            p.netns, None,
            "the pause container leaves the pod's interface to the app"
        );
        let p = plan(
            &spec(r#","linux":{"resources":{"cpu":{"quota":800000,"period":100000}}}"#),
            2,
        )
        .unwrap();
        assert!(
            p.options.join(" ").ends_with("--cpus 2"),
            "at most the host's CPUs"
        );
    }

    #[test]
    fn too_little_memory_is_refused() {
        let e = plan(
            &spec(r#","linux":{"resources":{"memory":{"limit":16777216}}}"#),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 64 MiB"), "{e}");
    }

    #[test]
    fn bind_mounts_become_volumes_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let d = dir.path().display();
        let p = plan(
            &spec(&format!(
                r#","mounts":[{{"destination":"/data","type":"bind","source":"{d}","options":["rbind","ro"]}},{{"destination":"/etc/hosts","type":"bind","source":"{f}","options":["rbind"]}},{{"destination":"/cache","type":"tmpfs","source":"tmpfs","options":["nosuid","size=65536k"]}}]"#,
                f = file.display()
            )),
            1,
        )
        .unwrap();
        let joined = p.options.join(" ");
        assert!(joined.contains(&format!("-v {d}:/data:ro")), "{joined}");
        assert!(joined.contains("--tmpfs /cache:size=65536k"), "{joined}");
        assert_eq!(p.skipped, ["/etc/hosts"]);
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "search cluster.local\nnameserver 10.96.0.10\n").unwrap();
        let p = plan(
            &spec(&format!(
                r#","mounts":[{{"destination":"/etc/resolv.conf","type":"bind","source":"{}","options":["rbind","ro"]}}]"#,
                resolv.display()
            )),
            1,
        )
        .unwrap();
        assert_eq!(p.dns, ["10.96.0.10"]);
        let e = plan(
            &spec(&format!(
                r#","mounts":[{{"destination":"/app.conf","type":"bind","source":"{}","options":["rbind"]}}]"#,
                file.display()
            )),
            1,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("mount /app.conf: only directories"),
            "{e}"
        );
    }

    #[test]
    fn bad_specs_get_clear_errors() {
        assert!(matches!(plan(b"{", 1), Err(SpecError::Json(_))));
        let e = plan(br#"{"process":{"args":[]}}"#, 1).unwrap_err();
        assert_eq!(e, field("process.args is empty"));
        let e = plan(br#"{"process":{"args":["sh"],"env":["NOEQUALS"]}}"#, 1).unwrap_err();
        assert!(e.to_string().contains("not KEY=VALUE"), "{e}");
    }
}
