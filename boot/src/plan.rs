//! The boot plan: from the initramfs to the app's root. Runs against [`Sys`],
//! so tests can check every step without root.

use crate::config::VolumeKind;
use crate::sys::{Sys, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT};

pub const LOWER: &str = "/mnt/lower";
pub const RW: &str = "/mnt/rw";
pub const NEWROOT: &str = "/mnt/root";

/// A failed step, named for the console.
#[derive(Debug)]
pub struct StepError {
    pub step: String,
    pub source: std::io::Error,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

fn step<T>(name: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T, StepError> {
    r.map_err(|source| StepError {
        step: name(),
        source,
    })
}

/// Mounts what the initramfs itself needs: /dev, /proc and /sys (the
/// console ports are found by name in sysfs before the root is entered).
pub fn early(sys: &mut dyn Sys) -> Result<(), StepError> {
    step(
        || "mount devtmpfs on /dev".into(),
        sys.mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    )?;
    step(|| "create /sys".into(), sys.mkdir_all("/sys", 0o755))?;
    step(
        || "mount sysfs on /sys".into(),
        sys.mount(
            "sysfs",
            "/sys",
            "sysfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
            "",
        ),
    )?;
    step(
        || "mount proc on /proc".into(),
        sys.mount(
            "proc",
            "/proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "",
        ),
    )?;
    Ok(())
}

/// How a host directory shared over virtio-9p is mounted.
const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=262144";

/// Mounts the read-only EROFS image with a tmpfs-backed overlay on top, the
/// API filesystems inside it, and moves it onto `/`.
#[cfg(test)]
pub fn root(
    sys: &mut dyn Sys,
    device: &str,
    tmpfs: &[String],
    volumes: &[crate::config::Volume],
) -> Result<(), StepError> {
    root_base(sys, device)?;
    root_finish(sys, tmpfs, volumes)
}

/// The part of the root that is the same for every run of an artifact: the
/// EROFS image under a tmpfs-backed overlay, the API filesystems in it and
/// the /dev links, /run and /tmp. The snapshot point comes after it (contract 4). Returns
/// the mounts it made in the new root, for [`upper`] to carry over.
pub fn root_base(sys: &mut dyn Sys, device: &str) -> Result<Vec<&'static str>, StepError> {
    for d in [LOWER, RW, NEWROOT] {
        step(|| format!("create {d}"), sys.mkdir_all(d, 0o755))?;
    }
    step(
        || format!("mount the image's EROFS root from {device}"),
        sys.mount(device, LOWER, "erofs", MS_RDONLY, ""),
    )?;
    step(
        || "mount the tmpfs for writes".into(),
        sys.mount("tmpfs", RW, "tmpfs", 0, "mode=0755"),
    )?;
    for d in ["upper", "work"] {
        step(
            || format!("create {RW}/{d}"),
            sys.mkdir_all(&format!("{RW}/{d}"), 0o755),
        )?;
    }
    let opts = format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work");
    step(
        || "mount the overlay root".into(),
        sys.mount("overlay", NEWROOT, "overlay", 0, &opts),
    )?;

    let r = |p: &str| format!("{NEWROOT}{p}");
    let mounts: [(&str, &str, &str, u64, &str); 5] = [
        (
            "/proc",
            "proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "",
        ),
        (
            "/sys",
            "sysfs",
            "sysfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
            "",
        ),
        ("/dev", "devtmpfs", "devtmpfs", MS_NOSUID, "mode=0755"),
        (
            "/dev/pts",
            "devpts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        (
            "/dev/shm",
            "shm",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            "mode=1777",
        ),
    ];
    let mut made = Vec::new();
    for (at, src, fs, flags, data) in mounts {
        step(|| format!("create {at}"), sys.mkdir_all(&r(at), 0o755))?;
        step(
            || format!("mount {fs} on {at}"),
            sys.mount(src, &r(at), fs, flags, data),
        )?;
        // /dev/pts and /dev/shm go where /dev goes.
        if !at.starts_with("/dev/") {
            made.push(at);
        }
    }
    // The /dev links every container has (they go where /dev goes).
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
        ("pts/ptmx", "/dev/ptmx"),
    ] {
        step(|| format!("link {link}"), sys.symlink(target, &r(link)))?;
    }
    // /run and /tmp get their own tmpfs unless the image put content there,
    // which stays visible (writes still land in the tmpfs-backed overlay).
    for (at, mode) in [("/run", "mode=0755"), ("/tmp", "mode=1777")] {
        if !sys.exists(&r(at)) || sys.dir_is_empty(&r(at)) {
            step(|| format!("create {at}"), sys.mkdir_all(&r(at), 0o755))?;
            step(
                || format!("mount tmpfs on {at}"),
                sys.mount("tmpfs", &r(at), "tmpfs", MS_NOSUID | MS_NODEV, mode),
            )?;
            made.push(at);
        }
    }
    Ok(made)
}

/// Where the `--upper` host directory is mounted.
const UPPER: &str = "/mnt/upper";
/// The overlay over it while it is made.
const NEXTROOT: &str = "/mnt/next";

/// Contract 5: the root's writes go to the host directory shared as `tag`
/// (an overlayfs upper layer in its `fs/`, overlayfs' work directory in its
/// `work/`) instead of the tmpfs [`root_base`] gave them. It comes after
/// the snapshot point, so one snapshot serves every container: the new
/// overlay takes over the API filesystems root_base mounted (`made`), and
/// the tmpfs-backed root goes. overlayfs keeps its attributes (opaque
/// directories) in the `user.` namespace there, the one 9p servers pass on.
pub fn upper(sys: &mut dyn Sys, tag: &str, made: &[&str]) -> Result<(), StepError> {
    for d in [UPPER, NEXTROOT] {
        step(|| format!("create {d}"), sys.mkdir_all(d, 0o755))?;
    }
    step(
        || format!("mount the host directory {tag} for the root's writes"),
        sys.mount(tag, UPPER, "9p", 0, NINEP_OPTIONS),
    )?;
    let (up, work) = (hyper_contract::UPPER_DIR, hyper_contract::WORK_DIR);
    for d in [up, work] {
        step(
            || format!("create {d}/ in the host directory"),
            sys.mkdir_all(&format!("{UPPER}/{d}"), 0o755),
        )?;
    }
    let opts = format!("lowerdir={LOWER},upperdir={UPPER}/{up},workdir={UPPER}/{work},userxattr");
    step(
        || "mount the overlay root over the host directory".into(),
        sys.mount("overlay", NEXTROOT, "overlay", 0, &opts),
    )?;
    for at in made {
        let to = format!("{NEXTROOT}{at}");
        step(|| format!("create {at}"), sys.mkdir_all(&to, 0o755))?;
        step(
            || format!("move {at} into the new root"),
            sys.mount(&format!("{NEWROOT}{at}"), &to, "", MS_MOVE, ""),
        )?;
    }
    step(
        || "unmount the tmpfs-backed root".into(),
        sys.umount(NEWROOT),
    )?;
    step(|| "unmount its tmpfs".into(), sys.umount(RW))?;
    step(
        || "put the new root in its place".into(),
        sys.mount(NEXTROOT, NEWROOT, "", MS_MOVE, ""),
    )
}

/// The run's part: `--tmpfs` mounts and volumes, then the move into the
/// new root.
pub fn root_finish(
    sys: &mut dyn Sys,
    tmpfs: &[String],
    volumes: &[crate::config::Volume],
) -> Result<(), StepError> {
    let r = |p: &str| format!("{NEWROOT}{p}");
    for spec in tmpfs {
        let (at, opts) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
        if !at.starts_with('/') || at.split('/').any(|c| c == "..") {
            return Err(StepError {
                step: format!("--tmpfs {spec}"),
                source: std::io::Error::other("needs an absolute path without '..'"),
            });
        }
        step(|| format!("create {at}"), sys.mkdir_all(&r(at), 0o1777))?;
        let data = if opts.is_empty() {
            "mode=1777".to_string()
        } else {
            opts.to_string()
        };
        step(
            || format!("mount tmpfs on {at}"),
            sys.mount(
                "tmpfs",
                &r(at),
                "tmpfs",
                MS_NOSUID | MS_NODEV | MS_NOEXEC,
                &data,
            ),
        )?;
    }
    for v in volumes {
        let at = v.target.as_str();
        if !at.starts_with('/') || at.split('/').any(|c| c == "..") || at == "/" {
            return Err(StepError {
                step: format!("volume {at}"),
                source: std::io::Error::other("needs an absolute path other than / without '..'"),
            });
        }
        step(|| format!("create {at}"), sys.mkdir_all(&r(at), 0o755))?;
        let ro = if v.read_only { MS_RDONLY } else { 0 };
        match v.kind {
            VolumeKind::Share => step(
                || format!("mount the host directory {} on {at}", v.tag),
                sys.mount(&v.tag, &r(at), "9p", MS_NODEV | ro, NINEP_OPTIONS),
            )?,
            VolumeKind::Tmpfs => {
                step(
                    || format!("mount a fresh volume on {at}"),
                    sys.mount("tmpfs", &r(at), "tmpfs", MS_NODEV, "mode=0755"),
                )?;
                // As Docker fills a new volume: with what the image has there.
                let image = format!("{LOWER}{at}");
                if sys.exists(&image) && !sys.dir_is_empty(&image) {
                    step(
                        || format!("copy the image's {at} into its volume"),
                        sys.copy_tree(&image, &r(at)),
                    )?;
                }
                if v.read_only {
                    step(
                        || format!("make {at} read-only"),
                        sys.mount("", &r(at), "", MS_REMOUNT | MS_RDONLY, ""),
                    )?;
                }
            }
        }
    }
    step(|| "enter the new root".into(), sys.chdir(NEWROOT))?;
    step(
        || "move the new root onto /".into(),
        sys.mount(".", "/", "", MS_MOVE, ""),
    )?;
    step(|| "chroot into the new root".into(), sys.chroot("."))?;
    step(|| "chdir /".into(), sys.chdir("/"))?;
    Ok(())
}

/// `--read-only`: remounts the root read-only once the runtime files are written.
pub fn seal_root(sys: &mut dyn Sys) -> Result<(), StepError> {
    step(
        || "remount / read-only".into(),
        sys.mount("", "/", "", MS_REMOUNT | MS_RDONLY, ""),
    )
}

/// The files Docker generates for every container: /etc/hostname and /etc/hosts.
pub fn hosts_files(
    hostname: &str,
    network: Option<&crate::config::Network>,
) -> Vec<(&'static str, String)> {
    // As Docker: the hostname resolves to the guest's address when it has one.
    let own = network.map_or("127.0.1.1", |n| n.address.as_str());
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n{own}\t{hostname}\n"
    );
    let mut files = vec![("/etc/hostname", format!("{hostname}\n"))];
    if let Some(n) = network {
        for h in &n.hosts {
            if let Some((ip, name)) = h.split_once(' ') {
                hosts.push_str(&format!("{ip}\t{name}\n"));
            }
        }
        files.push(("/etc/resolv.conf", crate::net::resolv_conf(n)));
    }
    files.insert(1, ("/etc/hosts", hosts));
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
        fail_on: Option<&'static str>,
        populated: Vec<&'static str>,
    }

    impl Recorder {
        fn rec(&mut self, s: String) -> io::Result<()> {
            let fail = self.fail_on.is_some_and(|f| s.contains(f));
            self.calls.push(s);
            if fail {
                Err(io::Error::from_raw_os_error(libc::ENODEV))
            } else {
                Ok(())
            }
        }
    }

    impl Sys for Recorder {
        fn mount(
            &mut self,
            source: &str,
            target: &str,
            fstype: &str,
            flags: u64,
            data: &str,
        ) -> io::Result<()> {
            self.rec(format!(
                "mount {source} {target} {fstype} {flags:#x} {data}"
            ))
        }
        fn umount(&mut self, path: &str) -> io::Result<()> {
            self.rec(format!("umount {path}"))
        }
        fn mkdir_all(&mut self, path: &str, _: u32) -> io::Result<()> {
            self.rec(format!("mkdir {path}"))
        }
        fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
            self.rec(format!("symlink {link} -> {target}"))
        }
        fn chdir(&mut self, path: &str) -> io::Result<()> {
            self.rec(format!("chdir {path}"))
        }
        fn chroot(&mut self, path: &str) -> io::Result<()> {
            self.rec(format!("chroot {path}"))
        }
        fn sethostname(&mut self, name: &str) -> io::Result<()> {
            self.rec(format!("hostname {name}"))
        }
        fn exists(&mut self, path: &str) -> bool {
            self.populated.iter().any(|p| path.ends_with(p))
        }
        fn dir_is_empty(&mut self, path: &str) -> bool {
            !self.populated.iter().any(|p| path.ends_with(p))
        }
        fn copy_tree(&mut self, from: &str, to: &str) -> io::Result<()> {
            self.rec(format!("copy {from} -> {to}"))
        }
    }

    fn index_of(calls: &[String], needle: &str) -> usize {
        calls
            .iter()
            .position(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("no call with {needle}: {calls:#?}"))
    }

    #[test]
    fn an_upper_host_directory_takes_over_the_root_after_the_snapshot_point() {
        let mut r = Recorder::default();
        let made = root_base(&mut r, "/dev/vda").unwrap();
        assert_eq!(made, ["/proc", "/sys", "/dev", "/run", "/tmp"]);
        let base = r.calls.len();
        upper(&mut r, "upper", &made).unwrap();
        let c = &r.calls[base..];
        let share = index_of(c, &format!("mount upper {UPPER} 9p 0x0 trans=virtio"));
        let overlay = index_of(
            c,
            &format!("mount overlay {NEXTROOT} overlay 0x0 lowerdir={LOWER},upperdir={UPPER}/fs,workdir={UPPER}/work,userxattr"),
        );
        let moves: Vec<usize> = made
            .iter()
            .map(|at| {
                index_of(
                    c,
                    &format!("mount {NEWROOT}{at} {NEXTROOT}{at}  {MS_MOVE:#x} "),
                )
            })
            .collect();
        let old = index_of(c, &format!("umount {NEWROOT}"));
        let tmpfs = index_of(c, &format!("umount {RW}"));
        let place = index_of(c, &format!("mount {NEXTROOT} {NEWROOT}  {MS_MOVE:#x} "));
        assert!(share < overlay && moves.iter().all(|&m| overlay < m && m < old));
        assert!(
            old < tmpfs && tmpfs < place && place == c.len() - 1,
            "{c:#?}"
        );
    }

    #[test]
    fn root_is_erofs_under_an_overlay_then_moved_onto_slash() {
        let mut r = Recorder::default();
        root(&mut r, "/dev/vda", &[], &[]).unwrap();
        let c = &r.calls;
        let erofs = index_of(c, &format!("mount /dev/vda {LOWER} erofs 0x1 "));
        let overlay = index_of(c, &format!("mount overlay {NEWROOT} overlay 0x0 lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work"));
        let proc_ = index_of(c, &format!("mount proc {NEWROOT}/proc proc"));
        let pts = index_of(c, &format!("mount devpts {NEWROOT}/dev/pts devpts"));
        let dev = index_of(c, &format!("mount devtmpfs {NEWROOT}/dev devtmpfs"));
        let mv = index_of(c, "mount . / ");
        assert!(erofs < overlay && overlay < proc_ && dev < pts && pts < mv);
        assert_eq!(c[mv + 1], "chroot .");
        for l in [
            "/dev/stdin -> /proc/self/fd/0",
            "/dev/stdout -> /proc/self/fd/1",
            "/dev/stderr -> /proc/self/fd/2",
        ] {
            index_of(c, l);
        }
        index_of(c, &format!("mount tmpfs {NEWROOT}/tmp tmpfs"));
        index_of(c, &format!("mount tmpfs {NEWROOT}/run tmpfs"));
    }

    #[test]
    fn image_content_in_run_is_not_hidden() {
        let mut r = Recorder {
            populated: vec!["/run"],
            ..Default::default()
        };
        root(&mut r, "/dev/vda", &[], &[]).unwrap();
        assert!(!r
            .calls
            .iter()
            .any(|c| c.contains(&format!("{NEWROOT}/run tmpfs"))));
        index_of(&r.calls, &format!("mount tmpfs {NEWROOT}/tmp tmpfs"));
    }

    #[test]
    fn tmpfs_mounts_land_in_the_new_root_and_refuse_escapes() {
        let mut r = Recorder::default();
        root(
            &mut r,
            "/dev/vda",
            &["/scratch:size=1m".into(), "/data".into()],
            &[],
        )
        .unwrap();
        index_of(
            &r.calls,
            &format!("mount tmpfs {NEWROOT}/scratch tmpfs 0xe size=1m"),
        );
        index_of(
            &r.calls,
            &format!("mount tmpfs {NEWROOT}/data tmpfs 0xe mode=1777"),
        );
        for bad in ["relative", "/a/../../etc"] {
            let mut r = Recorder::default();
            assert!(
                root(&mut r, "/dev/vda", &[bad.into()], &[]).is_err(),
                "{bad}"
            );
        }
        let hosts = &hosts_files("box", None)[1].1;
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n") && hosts.ends_with("127.0.1.1\tbox\n"));
    }

    #[test]
    fn volumes_are_host_shares_or_fresh_copies_of_the_image() {
        use crate::config::{Volume, VolumeKind};
        let mut r = Recorder {
            populated: vec!["/var/lib/db"],
            ..Default::default()
        };
        let vols = [
            Volume {
                kind: VolumeKind::Share,
                tag: "vol0".into(),
                target: "/data".into(),
                read_only: true,
            },
            Volume {
                kind: VolumeKind::Tmpfs,
                tag: String::new(),
                target: "/var/lib/db".into(),
                read_only: false,
            },
        ];
        root(&mut r, "/dev/vda", &[], &vols).unwrap();
        let c = &r.calls;
        index_of(c, &format!("mount vol0 {NEWROOT}/data 9p 0x5 trans=virtio"));
        let fresh = index_of(c, &format!("mount tmpfs {NEWROOT}/var/lib/db tmpfs"));
        let copy = index_of(
            c,
            &format!("copy {LOWER}/var/lib/db -> {NEWROOT}/var/lib/db"),
        );
        assert!(fresh < copy && copy < index_of(c, "mount . / "));
        for bad in ["relative", "/", "/a/../b"] {
            let v = Volume {
                kind: VolumeKind::Share,
                tag: "vol0".into(),
                target: bad.into(),
                read_only: false,
            };
            assert!(
                root(&mut Recorder::default(), "/dev/vda", &[], &[v]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_failed_step_is_named() {
        let mut r = Recorder {
            fail_on: Some("erofs"),
            ..Default::default()
        };
        let err = root(&mut r, "/dev/vda", &[], &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("mount the image's EROFS root from /dev/vda: "),
            "{err}"
        );
        assert!(
            !r.calls.iter().any(|c| c.contains("overlay")),
            "went on after a failure"
        );
    }
}
