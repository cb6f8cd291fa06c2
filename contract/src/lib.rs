//! The host↔guest contract of hyper, written once: what hyperboot (the
//! runner and its VMM) and hyperinit (the guest's PID 1) say to each other.
//!
//! - [`RunConfig`]: what to run and how — the image config already combined
//!   with the command line, the volumes, the network. The runner MUST deliver
//!   it as `/hyper/run.json` ([`RUN_CONFIG_PATH`]) in a cpio archive appended
//!   to the artifact's sealed initrd; hyperinit MUST refuse fields it does not
//!   know, so a feature newer than the artifact's init fails loudly instead of
//!   doing nothing.
//! - [`control`]: one-line messages on the control channel (a virtio-console
//!   port named [`CONTROL_PORT`] where the host offers one, else the second
//!   UART, COM2): hyperinit's reports ([`GuestMessage`]) and the host's
//!   requests ([`HostMessage`]), each with one encoder and one decoder.
//!
//! # Versions
//!
//! [`VERSION`] is the contract this crate speaks. hyperinit stamps the
//! version it speaks into its binary (the ELF section [`ELF_SECTION`], a
//! little-endian `u32`); hyperbuild copies it into the artifact's manifest
//! (`init.contract`; absent in artifacts built before it existed, which
//! speak version 1). hyperboot MUST speak every version from 1 to its own and
//! MUST refuse an artifact whose init speaks a newer one, saying so
//! ([`check_version`]). Within a version, fields added later are left out
//! of the run configuration while unused, so an older init keeps booting.

pub mod control;
pub mod elf;

pub use control::{
    decode_start_header, encode_start, ControlError, GuestMessage, HostMessage, LineBuffer,
    START_MAX,
};

use serde::{Deserialize, Serialize};

/// The contract version this crate speaks.
///
/// 1: the first. 2: `stats` in the run configuration, and hyperinit's
/// `timings` message. 3: the control channel on the [`CONTROL_PORT`]
/// virtio-console port when the host offers it (the host may then boot
/// without UARTs). 4: the snapshot point: booted with `hyper.start=port`,
/// hyperinit mounts the root, says `waiting` and takes a [`Start`] on the
/// control channel instead of reading its run configuration from the
/// initrd. 5: `upper` in the run configuration: the root's writes go to a
/// host directory shared over 9p. 6: the host's `closed 1|2`: its stdout or
/// stderr lost its reader, and hyperinit closes the app's pipe for that
/// stream, so the app's writes fail as in a shell pipeline.
pub const VERSION: u32 = 6;

/// The name of the virtio-console port that carries the control channel
/// (contract 3); without it, COM2 does.
pub const CONTROL_PORT: &str = "hyper.control";

/// The ELF section in which hyperinit records the contract version it speaks.
pub const ELF_SECTION: &str = ".hyper_contract";

/// The kernel argument by which the host says the run configuration comes
/// as a [`Start`] on the control port (contract 4).
pub const START_ARG: &str = "hyper.start=port";

/// The kernel argument `hyper.warm=PROGRAM` (with [`START_ARG`]): the
/// image's own program, the first word of its entrypoint, else of its
/// command (a path in the image, or a name looked up in [`DEFAULT_PATH`]).
/// hyperinit reads it, and the interpreter it names (an ELF file's, or a
/// script's `#!` line and then that one's), before the
/// snapshot point, so that the snapshot holds them decompressed in the page
/// cache and a restored app starts without reading its image. An init that
/// does not know it ignores it; a program that is not there is skipped.
pub const WARM_ARG: &str = "hyper.warm=";

/// What the host sends at the snapshot point (contract 4): the run
/// configuration, the time, and entropy. A guest restored from a snapshot
/// has the snapshot's clock and random state: hyperinit sets the wall
/// clock to `realtime_ns` and adds `entropy` to the kernel's pool (and
/// reseeds it) before anything of the run happens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub run: RunConfig,
    /// Nanoseconds since the epoch when the host sent it.
    pub realtime_ns: u64,
    /// 64 random bytes, in hex.
    pub entropy: String,
}

impl Start {
    /// Parses a start message's body, refusing unknown fields and an empty
    /// command.
    pub fn parse(bytes: &[u8]) -> Result<Self, RunConfigError> {
        let s: Start = serde_json::from_slice(bytes).map_err(RunConfigError::Malformed)?;
        if s.run.argv.is_empty() {
            return Err(RunConfigError::NoCommand);
        }
        Ok(s)
    }
}

/// Where hyperinit finds its run configuration.
pub const RUN_CONFIG_PATH: &str = "/hyper/run.json";

/// The default `PATH`, as Docker sets it when the image has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether a runner speaking [`VERSION`] can boot an artifact whose init
/// speaks `artifact` (None: recorded before versions were, i.e. 1).
pub fn check_version(artifact: Option<u32>) -> Result<u32, VersionError> {
    match artifact.unwrap_or(1) {
        0 => Err(VersionError::Invalid),
        v if v > VERSION => Err(VersionError::Newer(v)),
        v => Ok(v),
    }
}

/// An artifact this runner cannot talk to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("the artifact's hyperinit speaks host-guest contract {0}, this hyperboot at most {VERSION}: upgrade hyperboot, or rebuild the artifact with a matching hyperbuild")]
    Newer(u32),
    #[error("the artifact's manifest names host-guest contract 0, which does not exist")]
    Invalid,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// What to run: field names are the JSON keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The full command: entrypoint, then arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` pairs, the image's first, then the overrides (later win).
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub hostname: String,
    /// hyperinit prints each boot step on the console.
    #[serde(default)]
    pub debug: bool,
    /// The block device holding the EROFS root (default `/dev/vda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_device: Option<String>,
    /// `--read-only`: the root stays read-only for the app.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// `--tmpfs PATH[:OPTIONS]` mounts, as `docker run --tmpfs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<String>,
    /// The guest's network, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Host directories (`-v`) and the image's VOLUME paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// `-i`: the app's stdin comes from the host.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin: bool,
    /// `-t`: the app runs on a pseudo-terminal.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    /// The host terminal's size (rows, columns) for `-t`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty_size: Option<[u16; 2]>,
    /// `--stats` (contract 2): hyperinit reports its milestones
    /// ([`GuestMessage::Timings`]) before its report.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stats: bool,
    /// `--upper` (contract 5): the 9p tag of a host directory that keeps
    /// the root's writes, as an overlayfs upper layer in its `fs/` with
    /// overlayfs' work directory `work/` beside it (containerd's layout),
    /// instead of the guest's tmpfs. hyperinit puts the root's overlay over
    /// it once it has the run configuration, after the snapshot point, so
    /// one snapshot serves runs with any such directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<String>,
}

/// In the directory shared as [`RunConfig::upper`]: the upper layer.
pub const UPPER_DIR: &str = "fs";
/// In the directory shared as [`RunConfig::upper`]: overlayfs' work directory.
pub const WORK_DIR: &str = "work";

/// What kind of volume hyperinit mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeKind {
    /// A host directory the VMM shares over virtio-9p under the volume's tag.
    #[serde(rename = "9p")]
    Share,
    /// A fresh tmpfs holding a copy of what the image has at the target.
    #[serde(rename = "tmpfs")]
    Tmpfs,
}

/// One volume mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub kind: VolumeKind,
    /// The 9p mount tag of a [`VolumeKind::Share`]; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tag: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// One configured interface: the runner decides every value (no DHCP).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Extra /etc/hosts entries as `IP NAME`.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A run configuration hyperinit cannot use.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    #[error("malformed {RUN_CONFIG_PATH}")]
    Malformed(#[source] serde_json::Error),
    #[error("no command to run: the image has no Entrypoint or Cmd and none was given")]
    NoCommand,
}

impl RunConfig {
    /// The JSON the runner delivers.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a run config serializes")
    }

    /// Parses what the runner delivered.
    pub fn parse(bytes: &[u8]) -> Result<Self, RunConfigError> {
        let c: RunConfig = serde_json::from_slice(bytes).map_err(RunConfigError::Malformed)?;
        if c.argv.is_empty() {
            return Err(RunConfigError::NoCommand);
        }
        Ok(c)
    }

    /// The root device, `/dev/vda` unless the runner named another.
    pub fn root_device(&self) -> &str {
        self.root_device.as_deref().unwrap_or("/dev/vda")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_added_later_stay_out_while_unused() {
        let c = RunConfig {
            argv: vec!["sh".into()],
            ..Default::default()
        };
        // Exactly what the first hyperinit accepts.
        assert_eq!(
            String::from_utf8(c.to_json()).unwrap(),
            r#"{"argv":["sh"],"env":[],"workdir":"","user":"","hostname":"","debug":false}"#
        );
        let c = RunConfig {
            read_only: true,
            volumes: vec![Volume {
                kind: VolumeKind::Share,
                tag: "vol0".into(),
                target: "/data".into(),
                read_only: false,
            }],
            ..c
        };
        let json = String::from_utf8(c.to_json()).unwrap();
        assert!(json.contains(r#""read_only":true"#), "{json}");
        assert!(
            json.contains(r#""volumes":[{"kind":"9p","tag":"vol0","target":"/data"}]"#),
            "{json}"
        );
        assert_eq!(RunConfig::parse(json.as_bytes()).unwrap(), c);
    }

    #[test]
    fn refuses_empty_commands_unknown_fields_and_garbage() {
        assert!(matches!(
            RunConfig::parse(br#"{"argv":[]}"#),
            Err(RunConfigError::NoCommand)
        ));
        assert!(matches!(
            RunConfig::parse(b"{"),
            Err(RunConfigError::Malformed(_))
        ));
        assert!(RunConfig::parse(br#"{"argv":["a"],"bogus":1}"#).is_err());
        assert!(
            RunConfig::parse(br#"{"argv":["a"],"volumes":[{"kind":"nfs","target":"/x"}]}"#)
                .is_err()
        );
        let c = RunConfig::parse(br#"{"argv":["a"]}"#).unwrap();
        assert_eq!(c.root_device(), "/dev/vda");
    }

    #[test]
    fn versions() {
        assert_eq!(check_version(None), Ok(1));
        assert_eq!(check_version(Some(1)), Ok(1));
        assert_eq!(check_version(Some(VERSION)), Ok(VERSION));
        assert_eq!(
            check_version(Some(VERSION + 1)),
            Err(VersionError::Newer(VERSION + 1))
        );
        assert_eq!(check_version(Some(0)), Err(VersionError::Invalid));
    }
}
