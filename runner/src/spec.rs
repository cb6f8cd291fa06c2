//! What to run: the image config from the manifest combined with the command
//! line exactly as `docker run` combines them, as the contract's run
//! configuration hyperinit reads (`/hyper/run.json`).

pub use hyper_contract::{Network, RunConfig, Volume, VolumeKind};

/// The number of a signal named as in an image's StopSignal (`SIGTERM`,
/// `TERM`, `15`); SIGTERM when empty.
pub fn signal_number(name: &str) -> Result<i32, SpecError> {
    const NAMES: [(&str, i32); 14] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("CHLD", 17),
        ("CONT", 18),
        ("STOP", 19),
        ("TSTP", 20),
        ("WINCH", 28),
    ];
    let n = name.trim();
    if n.is_empty() {
        return Ok(15);
    }
    let bad = || SpecError::StopSignal(n.to_string());
    if let Ok(v) = n.parse::<i32>() {
        return if (1..=64).contains(&v) {
            Ok(v)
        } else {
            Err(bad())
        };
    }
    let bare = n.strip_prefix("SIG").unwrap_or(n);
    NAMES
        .iter()
        .find(|(k, _)| *k == bare)
        .map(|(_, v)| *v)
        .ok_or_else(bad)
}

/// A `--env-file` line that is not `KEY=VALUE` or `KEY`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {text:?} is not KEY=VALUE")]
pub struct EnvFileError {
    line: usize,
    text: String,
}

/// Parses a `--env-file` as Docker does: `KEY=VALUE` or `KEY` (taken from the
/// host) per line; blank lines and lines starting with `#` are skipped.
pub fn parse_env_file(text: &str) -> Result<Vec<String>, EnvFileError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line.split('=').next().unwrap_or("");
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(EnvFileError {
                line: n + 1,
                text: line.to_string(),
            });
        }
        out.push(line.to_string());
    }
    Ok(out)
}

/// Command-line overrides, as given to `hyperboot`.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--entrypoint`: `Some("")` clears the image's entrypoint.
    pub entrypoint: Option<String>,
    /// Arguments after the artifact (`-- CMD ARGS`): replace the image's Cmd.
    pub args: Vec<String>,
    /// `-e KEY=VALUE` or `-e KEY` (taken from the host environment).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    /// `--read-only`
    pub read_only: bool,
    /// `--tmpfs PATH[:OPTIONS]`
    pub tmpfs: Vec<String>,
}

/// `-v HOSTDIR:GUESTDIR[:ro|rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: std::path::PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// A `-v` value that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("-v {spec:?}: {why} (expected /HOSTDIR:/GUESTDIR[:ro|rw])")]
pub struct BindError {
    spec: String,
    why: &'static str,
}

/// Parses a `-v` value as Docker does for bind mounts.
pub fn parse_bind(s: &str) -> Result<Bind, BindError> {
    let err = |why: &'static str| BindError {
        spec: s.to_string(),
        why,
    };
    let parts: Vec<&str> = s.split(':').collect();
    let (host, guest, mode) = match parts.as_slice() {
        [h, g] => (*h, *g, "rw"),
        [h, g, m] => (*h, *g, *m),
        _ => return Err(err("wrong number of fields")),
    };
    if !host.starts_with('/') {
        return Err(err(
            "named volumes are not supported; give an absolute host path",
        ));
    }
    if !guest.starts_with('/') || guest == "/" || guest.split('/').any(|c| c == "..") {
        return Err(err("the guest path must be absolute, not /, without '..'"));
    }
    let read_only = match mode {
        "ro" => true,
        "rw" => false,
        _ => return Err(err("the mode is ro or rw")),
    };
    Ok(Bind {
        host: host.into(),
        guest: guest.trim_end_matches('/').to_string(),
        read_only,
    })
}

/// A host directory the VMM shares with the guest over virtio-9p.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host: std::path::PathBuf,
    pub read_only: bool,
}

/// The 9p shares of a boot: each `-v` as `volN`, then the `--upper`
/// directory as `upper`.
pub fn shares(binds: &[Bind], upper: Option<&std::path::Path>) -> Vec<Share> {
    let mut out: Vec<Share> = binds
        .iter()
        .enumerate()
        .map(|(i, b)| Share {
            tag: format!("vol{i}"),
            host: b.host.clone(),
            read_only: b.read_only,
        })
        .collect();
    if let Some(dir) = upper {
        out.push(Share {
            tag: UPPER_TAG.into(),
            host: dir.to_path_buf(),
            read_only: false,
        });
    }
    out
}

/// The 9p tag of the `--upper` directory.
pub const UPPER_TAG: &str = "upper";

/// The volumes of a boot: each `-v` shared as `volN`, then every image
/// VOLUME no `-v` covers as a fresh volume.
pub fn volumes(binds: &[Bind], image_volumes: &[String]) -> Vec<Volume> {
    let mut out: Vec<Volume> = binds
        .iter()
        .enumerate()
        .map(|(i, b)| Volume {
            kind: VolumeKind::Share,
            tag: format!("vol{i}"),
            target: b.guest.clone(),
            read_only: b.read_only,
        })
        .collect();
    for v in image_volumes {
        let v = v.trim_end_matches('/');
        if v.starts_with('/') && !binds.iter().any(|b| b.guest == v) {
            out.push(Volume {
                kind: VolumeKind::Tmpfs,
                tag: String::new(),
                target: v.to_string(),
                read_only: false,
            });
        }
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("no command specified: the image has no Entrypoint or Cmd; give one after the artifact (hyperboot app.hvm -- CMD)")]
    NoCommand,
    #[error("the image's StopSignal {0:?} is not a signal")]
    StopSignal(String),
}

/// Combines image config and overrides. `host_env` resolves `-e KEY`.
pub fn combine(
    image: &hvm::ImageConfig,
    o: &Overrides,
    default_hostname: &str,
    host_env: impl Fn(&str) -> Option<String>,
) -> Result<RunConfig, SpecError> {
    let entrypoint: Vec<String> = match &o.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint.clone().unwrap_or_default(),
    };
    // As in Docker: a new entrypoint drops the image's Cmd; arguments replace it.
    let cmd: Vec<String> = if !o.args.is_empty() {
        o.args.clone()
    } else if o.entrypoint.is_some() {
        Vec::new()
    } else {
        image.cmd.clone().unwrap_or_default()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let mut env = image.env.clone();
    for e in &o.env {
        match e.split_once('=') {
            Some(_) => env.push(e.clone()),
            None => {
                if let Some(v) = host_env(e) {
                    env.push(format!("{e}={v}"));
                }
            }
        }
    }
    Ok(RunConfig {
        argv,
        env,
        workdir: o
            .workdir
            .clone()
            .unwrap_or_else(|| image.working_dir.clone()),
        user: o.user.clone().unwrap_or_else(|| image.user.clone()),
        hostname: o
            .hostname
            .clone()
            .unwrap_or_else(|| default_hostname.to_string()),
        read_only: o.read_only,
        tmpfs: o.tmpfs.clone(),
        ..Default::default()
    })
}

/// The extra initramfs archive carrying the run configuration.
pub fn run_archive(cfg: &RunConfig) -> Vec<u8> {
    let mut c = hvm::cpio::Cpio::new();
    c.dir("hyper", 0o755);
    c.file("hyper/run.json", 0o644, &cfg.to_json());
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_and_image_volumes() {
        let b = parse_bind("/srv/data:/data:ro").unwrap();
        assert_eq!((b.guest.as_str(), b.read_only), ("/data", true));
        assert!(!parse_bind("/h:/g").unwrap().read_only);
        for bad in [
            "data:/data",
            "/h:rel",
            "/h:/",
            "/h:/a/../b",
            "/h:/g:rx",
            "/h",
        ] {
            assert!(parse_bind(bad).is_err(), "{bad}");
        }
        let v = volumes(
            &[parse_bind("/h:/data").unwrap()],
            &["/data".into(), "/var/lib/db/".into()],
        );
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].kind, v[0].tag.as_str()), (VolumeKind::Share, "vol0"));
        assert_eq!(
            (v[1].kind, v[1].target.as_str()),
            (VolumeKind::Tmpfs, "/var/lib/db")
        );
    }

    #[test]
    fn the_upper_directory_is_the_share_after_the_volumes() {
        let binds = [parse_bind("/h:/data:ro").unwrap()];
        let s = shares(&binds, Some(std::path::Path::new("/snap/7")));
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].tag.as_str(), s[0].read_only), ("vol0", true));
        assert_eq!(
            (s[1].tag.as_str(), s[1].host.to_str(), s[1].read_only),
            (UPPER_TAG, Some("/snap/7"), false)
        );
        assert_eq!(shares(&binds, None).len(), 1);
    }

    fn image(ep: Option<&[&str]>, cmd: Option<&[&str]>) -> hvm::ImageConfig {
        let v = |x: Option<&[&str]>| x.map(|s| s.iter().map(|s| s.to_string()).collect());
        hvm::ImageConfig {
            entrypoint: v(ep),
            cmd: v(cmd),
            env: vec!["A=1".into()],
            working_dir: "/w".into(),
            ..Default::default()
        }
    }

    fn argv(img: &hvm::ImageConfig, o: Overrides) -> Result<Vec<String>, SpecError> {
        combine(img, &o, "h", |_| None).map(|c| c.argv)
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_in_docker() {
        let both = image(Some(&["/ep", "x"]), Some(&["c1", "c2"]));
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            argv(&both, Overrides::default()).unwrap(),
            s(&["/ep", "x", "c1", "c2"])
        );
        assert_eq!(
            argv(
                &both,
                Overrides {
                    args: s(&["a"]),
                    ..Default::default()
                }
            )
            .unwrap(),
            s(&["/ep", "x", "a"])
        );
        assert_eq!(
            argv(
                &both,
                Overrides {
                    entrypoint: Some("/new".into()),
                    ..Default::default()
                }
            )
            .unwrap(),
            s(&["/new"])
        );
        assert_eq!(
            argv(
                &both,
                Overrides {
                    entrypoint: Some("".into()),
                    args: s(&["sh", "-c", "true"]),
                    ..Default::default()
                }
            )
            .unwrap(),
            s(&["sh", "-c", "true"])
        );
        let cmd_only = image(None, Some(&["sh"]));
        assert_eq!(
            argv(
                &cmd_only,
                Overrides {
                    args: s(&["echo", "hi"]),
                    ..Default::default()
                }
            )
            .unwrap(),
            s(&["echo", "hi"])
        );
        assert_eq!(
            argv(&image(None, None), Overrides::default()),
            Err(SpecError::NoCommand)
        );
        assert_eq!(
            argv(
                &both,
                Overrides {
                    entrypoint: Some("".into()),
                    ..Default::default()
                }
            ),
            Err(SpecError::NoCommand)
        );
    }

    #[test]
    fn unused_newer_fields_stay_out_of_the_run_config() {
        let img = image(None, Some(&["sh"]));
        let c = combine(&img, &Overrides::default(), "h", |_| None).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            !json.contains("read_only") && !json.contains("tmpfs"),
            "{json}"
        );
        let c = combine(
            &img,
            &Overrides {
                read_only: true,
                ..Default::default()
            },
            "h",
            |_| None,
        )
        .unwrap();
        assert!(serde_json::to_string(&c)
            .unwrap()
            .contains(r#""read_only":true"#));
    }

    #[test]
    fn stop_signals_by_name_or_number() {
        assert_eq!(signal_number(""), Ok(15));
        assert_eq!(signal_number("SIGQUIT"), Ok(3));
        assert_eq!(signal_number("USR1"), Ok(10));
        assert_eq!(signal_number("9"), Ok(9));
        assert!(signal_number("SIGNOPE").is_err());
        assert!(signal_number("99").is_err());
    }

    #[test]
    fn env_files_parse_like_docker() {
        let text = "# comment\n\nA=1\n  B=two words\nFROM_HOST\nC=\n";
        assert_eq!(
            parse_env_file(text).unwrap(),
            ["A=1", "B=two words", "FROM_HOST", "C="]
        );
        assert!(parse_env_file("=nokey\n")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert!(parse_env_file("BAD KEY=1\n").is_err());
    }

    #[test]
    fn env_workdir_user_hostname() {
        let img = image(None, Some(&["sh"]));
        let o = Overrides {
            env: vec![
                "B=2".into(),
                "A=9".into(),
                "FROM_HOST".into(),
                "UNSET".into(),
            ],
            user: Some("app".into()),
            ..Default::default()
        };
        let c = combine(&img, &o, "abc", |k| {
            (k == "FROM_HOST").then(|| "v".to_string())
        })
        .unwrap();
        assert_eq!(c.env, ["A=1", "B=2", "A=9", "FROM_HOST=v"]);
        assert_eq!(
            (c.workdir.as_str(), c.user.as_str(), c.hostname.as_str()),
            ("/w", "app", "abc")
        );
        let c = combine(
            &img,
            &Overrides {
                workdir: Some("/x".into()),
                hostname: Some("n".into()),
                ..Default::default()
            },
            "abc",
            |_| None,
        )
        .unwrap();
        assert_eq!((c.workdir.as_str(), c.hostname.as_str()), ("/x", "n"));
    }
}
