//! The run configuration the runner hands hyperinit in `/hyper/run.json`
//! (an extra cpio archive after the sealed initrd). The runner has already
//! combined the image config with the command line (Entrypoint/Cmd, Env).

use serde::Deserialize;

pub const PATH: &str = "/hyper/run.json";
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The full command: entrypoint + arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` pairs, image first, overrides later.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub hostname: String,
    /// The block device holding the EROFS root.
    #[serde(default = "default_root")]
    pub root_device: String,
    /// `--read-only`: the root stays read-only (no writable overlay for the app).
    #[serde(default)]
    pub read_only: bool,
    /// `--tmpfs PATH[:OPTIONS]` mounts, as `docker run --tmpfs`.
    #[serde(default)]
    pub tmpfs: Vec<String>,
    /// Print each boot step on the console.
    #[serde(default)]
    pub debug: bool,
    /// The guest's network, when it has one.
    #[serde(default)]
    pub network: Option<Network>,
    /// Volumes: host directories (`-v`) and the image's VOLUME paths.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// `-i`: the app's stdin comes from the host.
    #[serde(default)]
    pub stdin: bool,
    /// `-t`: the app runs on a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    /// The host terminal's size (rows, columns) for `-t`.
    #[serde(default)]
    pub tty_size: Option<[u16; 2]>,
}

/// One volume mount.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// `9p`: a host directory shared under `tag`; `tmpfs`: a fresh volume
    /// holding a copy of what the image has at `target`.
    pub kind: String,
    #[serde(default)]
    pub tag: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// One configured interface (the runner decides every value; no DHCP).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub interface: String,
    /// IPv4 address of the guest.
    pub address: String,
    pub prefix: u8,
    /// Default gateway; empty for none.
    #[serde(default)]
    pub gateway: String,
    /// Name servers for /etc/resolv.conf.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Search domains for /etc/resolv.conf.
    #[serde(default)]
    pub search: Vec<String>,
    /// Extra /etc/hosts entries as `IP NAME`.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

fn default_root() -> String {
    "/dev/vda".into()
}

impl RunConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let c: RunConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("malformed {PATH}: {e}"))?;
        if c.argv.is_empty() {
            return Err(
                "no command to run: the image has no Entrypoint or Cmd and none was given".into(),
            );
        }
        Ok(c)
    }
}

/// Builds the app's environment: the configured pairs (later ones win), then
/// PATH, HOSTNAME and HOME as Docker sets them when absent.
pub fn app_env(cfg: &RunConfig, home: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kv in &cfg.env {
        let key = kv.split('=').next().unwrap_or("");
        out.retain(|e| e.split('=').next() != Some(key));
        out.push(kv.clone());
    }
    let has = |out: &Vec<String>, k: &str| out.iter().any(|e| e.split('=').next() == Some(k));
    if !has(&out, "PATH") {
        out.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&out, "HOSTNAME") && !cfg.hostname.is_empty() {
        out.push(format!("HOSTNAME={}", cfg.hostname));
    }
    if !has(&out, "HOME") {
        out.push(format!("HOME={home}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_defaults_and_overrides() {
        let cfg = RunConfig {
            argv: vec!["sh".into()],
            env: vec!["A=1".into(), "B=2".into(), "A=3".into()],
            hostname: "box".into(),
            ..Default::default()
        };
        assert_eq!(
            app_env(&cfg, "/root"),
            [
                &format!("PATH={DEFAULT_PATH}"),
                "B=2",
                "A=3",
                "HOSTNAME=box",
                "HOME=/root"
            ]
        );
        let cfg = RunConfig {
            argv: vec!["x".into()],
            env: vec!["PATH=/bin".into(), "HOME=/h".into()],
            ..Default::default()
        };
        assert_eq!(app_env(&cfg, "/root"), ["PATH=/bin", "HOME=/h"]);
    }

    #[test]
    fn refuses_empty_command_and_garbage() {
        assert!(RunConfig::parse(br#"{"argv":[]}"#)
            .unwrap_err()
            .contains("no command"));
        assert!(RunConfig::parse(b"{").unwrap_err().contains("malformed"));
        assert!(RunConfig::parse(br#"{"argv":["a"],"bogus":1}"#).is_err());
        assert_eq!(
            RunConfig::parse(br#"{"argv":["a"]}"#).unwrap().root_device,
            "/dev/vda"
        );
    }
}
