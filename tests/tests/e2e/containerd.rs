//! The containerd tier: Debian's containerd, started by the tests with the
//! shim on its PATH, images pulled with `ctr image pull --plain-http` from a
//! loopback docker-registry, containers run with `ctr run --runtime
//! io.containerd.hyper.v2` (each a microVM; QEMU with TCG where KVM has no
//! real semantics).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_tests::registry::Registry;
use hyper_tests::*;

const RUNTIME: &str = "io.containerd.hyper.v2";

/// One containerd for the tier, with its registry and the image pulled.
struct Containerd {
    dir: PathBuf,
    image: String,
    registry: &'static Registry,
}

fn containerd() -> &'static Containerd {
    static C: OnceLock<Containerd> = OnceLock::new();
    C.get_or_init(start)
}

fn start() -> Containerd {
    for tool in ["containerd", "ctr"] {
        assert!(
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: apt-get install containerd (scripts/install-deps does)"
        );
    }
    // On a disk: the containers' snapshots take their writes (--upper).
    let dir = disk_scratch().join("containerd");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{d}/sock\"\n[ttrpc]\n  address = \"{d}/sock.ttrpc\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let shim = bin_path("containerd-shim-hyper-v2");
    assert!(shim.is_file(), "{} was not built", shim.display());
    let path = format!(
        "{}:{}",
        shim.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let (config2, dir2) = (config.clone(), dir.clone());
    // containerd ends with this process: its parent-death signal follows
    // the thread that started it, which waits for it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut c = Command::new("containerd");
        // The nested tier runs these tests with the shim's VMs on the KVM
        // backend, and says so: no silent fall-back to QEMU.
        if let Ok(b) = std::env::var("HYPER_TEST_SHIM_BACKEND") {
            c.env("HYPER_SHIM_HYPERBOOT_ARGS", format!("--backend {b}"));
        }
        c.arg("--config")
            .arg(&config2)
            .env("PATH", &path)
            .env("HYPER_KERNEL", kernel())
            .env("HYPER_INIT", init())
            .env("HYPER_SHIM_CACHE", dir2.join("artifacts"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: one system call between fork and exec.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = c.spawn().expect("start containerd");
        tx.send(child.id()).unwrap();
        let _ = child.wait();
    });
    rx.recv().unwrap();
    let sock = dir.join("sock");
    let until = Instant::now() + Duration::from_secs(30);
    while !(sock.exists()
        && ctr_at(&dir)
            .arg("version")
            .output()
            .unwrap()
            .status
            .success())
    {
        assert!(
            Instant::now() < until,
            "containerd did not start: {}",
            log_of(&dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let registry = Box::leak(Box::new(Registry::start(false)));
    let layout = dir.join("layout");
    make_image(&layout, "bb", "root");
    registry.push(&format!("oci:{}:bb", layout.display()), "busybox:1", &[]);
    let image = format!("{}/busybox:1", registry.addr);
    let out = ctr_at(&dir)
        .args(["image", "pull", "--plain-http", &image])
        .output()
        .unwrap();
    assert!(out.status.success(), "ctr image pull: {}", stderr(&out));
    Containerd {
        dir,
        image,
        registry,
    }
}

/// The nginx image (`scripts/make-app-image`), pushed and pulled once.
fn nginx_image() -> &'static str {
    static I: OnceLock<String> = OnceLock::new();
    I.get_or_init(|| {
        let c = containerd();
        let layout = c.dir.join("nginx-layout");
        let out = Command::new(repo().join("scripts/make-app-image"))
            .arg(&layout)
            .arg("nginx")
            .output()
            .expect("run make-app-image");
        assert!(
            out.status.success(),
            "make-app-image nginx: {}",
            stderr(&out)
        );
        c.registry
            .push(&format!("oci:{}", layout.display()), "nginx:1", &[]);
        let image = format!("{}/nginx:1", c.registry.addr);
        let out = ctr()
            .args(["image", "pull", "--plain-http", &image])
            .output()
            .unwrap();
        assert!(out.status.success(), "ctr image pull: {}", stderr(&out));
        image
    })
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
}

fn ctr_at(dir: &Path) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address").arg(dir.join("sock"));
    c
}

fn ctr() -> Command {
    ctr_at(&containerd().dir)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ctr run --runtime … [FLAGS] IMAGE ID ARGS…`, stdin closed.
fn run(flags: &[&str], id: &str, args: &[&str]) -> Output {
    let c = containerd();
    ctr()
        .args(["run", "--runtime", RUNTIME])
        .args(flags)
        .arg(&c.image)
        .arg(id)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The task's status in `ctr task ls` (None when it is not listed).
fn task_status(id: &str) -> Option<(u32, String)> {
    let out = ctr().args(["task", "ls"]).output().unwrap();
    stdout(&out).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
    })
}

fn wait_status(id: &str, want: &str, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let st = task_status(id);
        if st.as_ref().is_some_and(|(_, s)| s == want) {
            return;
        }
        assert!(Instant::now() < until, "task {id}: {st:?}, not {want}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for_file(p: &Path, within: Duration) {
    let until = Instant::now() + within;
    while !p.exists() {
        assert!(
            Instant::now() < until,
            "{} did not appear: {}",
            p.display(),
            log_of(&containerd().dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Deletes the container when dropped, a failed test's too: its shim and
/// VM would outlive this process (and its containerd) otherwise.
struct Removed(&'static str);

impl Drop for Removed {
    fn drop(&mut self) {
        remove(self.0);
    }
}

fn remove(id: &str) {
    let _ = ctr().args(["task", "delete", "--force", id]).output();
    let _ = ctr().args(["container", "delete", id]).output();
}

#[test]
fn ctr_run_gives_the_apps_output_and_exit_code() {
    let out = run(
        &["--rm"],
        "out-code",
        &[
            "sh",
            "-c",
            "echo hello from $(uname -r); echo to stderr >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains("hello from 6."), "{}", stdout(&out));
    assert!(stderr(&out).contains("to stderr"), "{}", stderr(&out));
    let listed = ctr().args(["container", "ls", "-q"]).output().unwrap();
    assert!(
        !stdout(&listed).lines().any(|l| l == "out-code"),
        "--rm removed it"
    );
}

#[test]
fn stdin_reaches_the_app_and_its_end_ends_it() {
    let c = containerd();
    let mut child = ctr()
        .args([
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            &c.image,
            "stdin",
            "sh",
            "-c",
        ])
        .arg("wc -l; echo done")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut w = child.stdin.take().unwrap();
        w.write_all(b"one\ntwo\nthree\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains('3') && text.contains("done"), "{text}");
}

#[test]
fn the_process_env_cwd_memory_and_volumes_are_honoured() {
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("in"), "from the host").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        vol.path().display()
    );
    let out = run(
        &[
            "--rm",
            "--env",
            "GREETING=hi there",
            "--cwd",
            "/tmp",
            "--mount",
            &mount,
            "--memory-limit",
            "201326592",
        ],
        "process",
        &[
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)|$(cat /data/in)|$(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo)\"; echo back > /data/out",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    let f: Vec<&str> = line.trim().split('|').collect();
    assert_eq!(&f[..3], ["hi there", "/tmp", "from the host"], "{line}");
    let mem: u64 = f[3].parse().unwrap();
    assert!(
        (150..=192).contains(&mem),
        "a 192 MiB limit gives the guest {mem} MiB"
    );
    assert_eq!(
        std::fs::read_to_string(vol.path().join("out")).unwrap(),
        "back\n"
    );
}

/// Runs a detached container whose app sets `trap` then loops, and waits
/// until it has (a file it makes in a volume); the guard deletes it.
fn run_looping(id: &'static str, trap: &str) -> Removed {
    remove(id);
    let removed = Removed(id);
    let flag = tempfile::tempdir().unwrap();
    let mount = format!(
        "type=bind,src={},dst=/flag,options=rbind:rw",
        flag.path().display()
    );
    let script = format!("{trap}; touch /flag/ready; while true; do sleep 1; done");
    let out = run(&["-d", "--mount", &mount], id, &["sh", "-c", &script]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for_file(&flag.path().join("ready"), Duration::from_secs(120));
    removed
}

#[test]
fn a_detached_task_is_listed_stopped_gracefully_and_deleted() {
    let id = "detached";
    let _removed = run_looping(id, "trap 'exit 7' TERM");
    let (pid, status) = task_status(id).expect("listed");
    assert_eq!(status, "RUNNING");
    assert!(alive(pid), "the task's pid {pid} is the running VM");
    let pids = ctr().args(["task", "ps", id]).output().unwrap();
    assert!(
        stdout(&pids).contains(&pid.to_string()),
        "{}",
        stdout(&pids)
    );
    // The VM's cost on the host: its memory and the CPU time it has used.
    let m = ctr().args(["task", "metrics", id]).output().unwrap();
    let value = |name: &str| -> u64 {
        stdout(&m)
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in: {}{}", stdout(&m), stderr(&m)))
    };
    assert!(value("memory.usage_in_bytes") > 1 << 20, "{}", stdout(&m));
    assert!(value("cpuacct.usage ") > 0, "{}", stdout(&m));
    let k = ctr().args(["task", "kill", id]).output().unwrap();
    assert!(k.status.success(), "{}", stderr(&k));
    wait_status(id, "STOPPED", Duration::from_secs(60));
    let del = ctr().args(["task", "delete", id]).output().unwrap();
    assert!(del.status.success(), "{}", stderr(&del));
    assert!(
        stderr(&del).contains("exit code 7"),
        "the app's trap ran: {}",
        stderr(&del)
    );
    assert!(!alive(pid), "the VM is gone");
    assert_eq!(task_status(id), None);
    remove(id);
}

#[test]
fn an_app_that_ignores_sigterm_is_ended_by_sigkill() {
    let id = "forced";
    let _removed = run_looping(id, "trap '' TERM");
    let (pid, _) = task_status(id).expect("listed");
    assert!(ctr().args(["task", "kill", id]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        task_status(id).map(|(_, s)| s).as_deref(),
        Some("RUNNING"),
        "SIGTERM is the app's to handle, as with runc"
    );
    let k = ctr()
        .args(["task", "kill", "--signal", "SIGKILL", id])
        .output()
        .unwrap();
    assert!(k.status.success(), "{}", stderr(&k));
    wait_status(id, "STOPPED", Duration::from_secs(30));
    let del = ctr().args(["task", "delete", id]).output().unwrap();
    assert!(stderr(&del).contains("exit code 137"), "{}", stderr(&del));
    assert!(!alive(pid));
    remove(id);
}

#[test]
fn a_terminal_is_the_apps_controlling_tty() {
    // ctr -t needs a terminal of its own: script(1) gives it one.
    let c = containerd();
    let cmd = format!(
        "ctr --address {} run --runtime {RUNTIME} --rm -t {} tty sh -c 'tty; test -t 0 && echo stdin-is-a-tty; exit 4'",
        c.dir.join("sock").display(),
        c.image
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (bsdutils)");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{text}{}", stderr(&out));
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("stdin-is-a-tty"), "{text}");
}

#[test]
fn the_second_container_of_an_image_uses_the_cached_artifact() {
    let first = run(&["--rm"], "cache-1", &["true"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let artifacts = containerd().dir.join("artifacts");
    let before: Vec<_> = std::fs::read_dir(&artifacts)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let second = run(&["--rm"], "cache-2", &["true"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let log = log_of(&containerd().dir);
    let line = log
        .lines()
        .find(|l| l.contains("cache-2: artifact "))
        .unwrap_or_else(|| panic!("no artifact line for cache-2 in the log:\n{log}"));
    assert!(line.contains("(cached in "), "{line}");
    let after: Vec<_> = std::fs::read_dir(&artifacts)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(before.len(), after.len(), "no new artifact: {after:?}");
}

#[test]
fn a_killed_shim_leaves_no_vm_behind() {
    let id = "lost-shim";
    remove(id);
    let _removed = Removed(id);
    let out = run(&["-d"], id, &["sleep", "600"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (vm, _) = task_status(id).expect("listed");
    let shim = std::fs::read_to_string(format!("/proc/{vm}/stat"))
        .unwrap()
        .rsplit(") ")
        .next()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok())
        })
        .expect("the VM's parent");
    let comm = std::fs::read_to_string(format!("/proc/{shim}/comm")).unwrap();
    assert!(
        comm.starts_with("containerd-shim"),
        "the VM's parent is {comm}"
    );
    // SAFETY: kill(2) on a pid read above.
    assert_eq!(unsafe { libc::kill(shim, libc::SIGKILL) }, 0);
    let until = Instant::now() + Duration::from_secs(20);
    while alive(vm) {
        assert!(Instant::now() < until, "hyperboot {vm} outlived its shim");
        std::thread::sleep(Duration::from_millis(100));
    }
    remove(id);
    let listed = ctr().args(["container", "ls", "-q"]).output().unwrap();
    assert!(
        !stdout(&listed).lines().any(|l| l == id),
        "{}",
        stdout(&listed)
    );
}

#[test]
fn a_file_bind_mount_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.conf");
    std::fs::write(&file, "x").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/app.conf,options=rbind:ro",
        file.display()
    );
    let out = run(&["--rm", "--mount", &mount], "refused-file", &["true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("mount /app.conf: only directories can be shared"),
        "{}",
        stderr(&out)
    );
    remove("refused-file");
}

#[test]
fn nginx_in_a_network_namespace_answers_at_the_namespaces_address() {
    let image = nginx_image();
    let net = NetNs::new(7);
    let id = "nginx-netns";
    remove(id);
    let _removed = Removed(id);
    let out = ctr()
        .args(["run", "--runtime", RUNTIME, "-d", "--with-ns"])
        .arg(format!("network:{}", net.path()))
        .arg(image)
        .arg(id)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let url = format!("http://{}/", net.pod_ip);
    let until = Instant::now() + Duration::from_secs(180);
    let body = loop {
        let out = Command::new("curl")
            .args(["-s", "-m", "5", &url])
            .output()
            .expect("curl");
        if out.status.success() {
            break stdout(&out);
        }
        assert!(
            Instant::now() < until,
            "nginx did not answer at {url}: {:?}\n{}",
            task_status(id),
            log_of(&containerd().dir)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        body.contains("hello from nginx in a hyper microVM"),
        "{body}"
    );
    assert!(
        net.qdiscs().contains("ingress"),
        "the VM's tap is joined to eth0 by tc: {}",
        net.qdiscs()
    );
    assert!(ctr().args(["task", "kill", id]).status().unwrap().success());
    wait_status(id, "STOPPED", Duration::from_secs(60));
    assert!(
        net.redirect_gone(),
        "the redirect is gone with the VM: {}",
        net.qdiscs()
    );
    remove(id);
}

#[test]
fn the_vm_takes_over_the_namespaces_interface() {
    let net = NetNs::new(8);
    let out = run(
        &["--rm", "--with-ns", &format!("network:{}", net.path())],
        "netns-identity",
        &[
            "sh",
            "-c",
            "cat /sys/class/net/eth0/address; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; ip route | grep default; ping -c 1 -W 5 10.231.8.1 >/dev/null && echo gateway-answers",
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        net.mac(),
        "the guest has the interface's MAC: {text}"
    );
    assert_eq!(lines[1], "inet 10.231.8.2/24", "{text}");
    assert!(lines[2].contains("via 10.231.8.1"), "{text}");
    assert_eq!(lines[3], "gateway-answers", "{text}");
}

#[test]
fn a_containers_writes_land_in_its_snapshot_and_outlive_its_task() {
    let id = "upper-1";
    let _removed = Removed(id);
    let c = containerd();
    let script = "cat /state 2>/dev/null || echo first; echo run >> /state; rm -f /etc/motd";
    let made = ctr()
        .args(["container", "create", "--runtime", RUNTIME])
        .arg(&c.image)
        // "--": ctr's own -c (--config) would take the shell's.
        .args([id, "--", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let start = || {
        ctr()
            .args(["task", "start", id])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let first = start();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(stdout(&first), "first\n");
    // The writes are in the container's overlay snapshot, as runc's would be:
    // a file, and a whiteout for the image's file it removed.
    let snapshots = c
        .dir
        .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let upper = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .find(|fs| fs.join("state").is_file())
        .unwrap_or_else(|| panic!("no snapshot holds /state:\n{}", log_of(&c.dir)));
    assert_eq!(
        std::fs::read_to_string(upper.join("state")).unwrap(),
        "run\n"
    );
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = std::fs::symlink_metadata(upper.join("etc/motd")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "/etc/motd removed is a whiteout: {wh:?}"
    );
    // The next task of the container (ctr deleted the first when it ended)
    // starts from them.
    let second = start();
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert_eq!(stdout(&second), "run\n");
    assert_eq!(
        std::fs::read_to_string(upper.join("state")).unwrap(),
        "run\nrun\n"
    );
}
