//! The run configuration the runner hands hyperinit in `/hyper/run.json`
//! (an extra cpio archive after the sealed initrd), as the contract crate
//! defines it: the runner has already combined the image config with the
//! command line (Entrypoint/Cmd, Env). What is left here is the guest's
//! part: the app's environment as Docker completes it.

pub use hyper_contract::{
    Network, RunConfig, Volume, VolumeKind, DEFAULT_PATH, RUN_CONFIG_PATH as PATH,
};

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
}
