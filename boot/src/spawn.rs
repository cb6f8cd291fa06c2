//! Starting the app as hyperinit's child, as `posix_spawn` does: the child
//! shares PID 1's memory (`clone(CLONE_VM | CLONE_VFORK)`) on a stack of
//! its own until it execs, so no page table is copied and neither process
//! takes copy-on-write faults afterwards. PID 1 waits, suspended, until the
//! child has exec'd or failed.
//!
//! Sharing memory, the child may not allocate, lock or unwind: everything
//! it needs (argument and environment arrays, the paths to try, the
//! descriptors) is prepared here first, and it makes only plain system
//! calls. The set-ID calls are made directly (glibc's wrappers signal every
//! thread of the process, which here are PID 1's). A failure before the
//! exec is written as (stage, errno) to a close-on-exec pipe and the child
//! leaves by `_exit`; PID 1 words the message (as `docker run` does:
//! 127 not found, 126 not runnable) on the app's stderr.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What the app is started with.
pub struct App<'a> {
    pub argv: &'a [String],
    pub env: &'a [String],
    pub workdir: &'a str,
    pub path_var: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    /// The app's descriptors 0, 1, 2 (None: stdin from /dev/null, stdout
    /// and stderr PID 1's own, the console).
    pub fds: [Option<RawFd>; 3],
    /// Make the terminal on its stdin its controlling terminal.
    pub tty: bool,
}

/// Where the child stopped, when it did not exec.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Stage {
    Prepare = 1,
    Chdir = 2,
    Identity = 3,
    NotFound = 4,
    Exec = 5,
}

impl Stage {
    /// The stage a failure record names (none: not one of ours).
    fn from_byte(b: u8) -> Option<Stage> {
        [
            Stage::Prepare,
            Stage::Chdir,
            Stage::Identity,
            Stage::NotFound,
            Stage::Exec,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }
}

/// Everything the child reads, prepared by the parent.
struct Prepared {
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The paths to exec: the command itself when it names a path, else
    /// the command in each PATH directory.
    candidates: Vec<CString>,
    searched: bool,
    workdir: CString,
    dev_null: CString,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    fds: [RawFd; 3],
    tty: bool,
    /// Set when the arguments could not be prepared (a NUL byte).
    invalid: bool,
    report: RawFd,
}

/// The child's failure record: stage and errno.
const RECORD: usize = 5;

/// Starts the app; returns its pid. A failure of the child before its exec
/// is worded on `err_fd` here, and the child's exit status says 126 or 127.
pub fn app(a: &App, err_fd: RawFd) -> io::Result<libc::pid_t> {
    let strings = |v: &[String]| -> Option<Vec<CString>> {
        v.iter().map(|s| CString::new(s.as_bytes()).ok()).collect()
    };
    let argv_c = strings(a.argv);
    let env_c = strings(a.env);
    let cmd = a.argv.first().map(String::as_str).unwrap_or("");
    let searched = !cmd.contains('/');
    let candidates: Vec<CString> = if searched {
        a.path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .filter_map(|d| CString::new(format!("{}/{cmd}", d.trim_end_matches('/'))).ok())
            .collect()
    } else {
        CString::new(cmd).into_iter().collect()
    };
    let workdir = CString::new(a.workdir);
    let invalid = argv_c.is_none() || env_c.is_none() || workdir.is_err() || cmd.is_empty();
    let argv_c = argv_c.unwrap_or_default();
    let env_c = env_c.unwrap_or_default();
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let (report_r, report_w) = crate::streams::pipe()?;
    let p = Prepared {
        argv: ptrs(&argv_c),
        envp: ptrs(&env_c),
        candidates,
        searched,
        workdir: workdir.unwrap_or_default(),
        dev_null: CString::new("/dev/null").expect("no NUL"),
        uid: a.uid,
        gid: a.gid,
        groups: a.groups.to_vec(),
        fds: a.fds.map(|f| f.unwrap_or(-1)),
        tty: a.tty,
        invalid,
        report: report_w.as_raw_fd(),
    };
    let mut stack = vec![0u8; 256 << 10];
    // The stack grows down from its (16-byte aligned) end.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: every signal is blocked around the clone, so no handler of
    // PID 1's runs on the child's stack or in its shared memory; the child
    // unblocks them only after resetting every handler. `p` and `stack`
    // outlive the child's use of them: with CLONE_VFORK this thread is
    // suspended until the child has exec'd or exited.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &p as *const Prepared as *mut libc::c_void,
        );
        let err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(err);
        }
        pid
    };
    drop(report_w);
    drop(stack);
    let mut record = [0u8; RECORD];
    let mut f = std::fs::File::from(report_r);
    if io::Read::read(&mut f, &mut record).ok() == Some(RECORD) {
        let errno = i32::from_ne_bytes([record[1], record[2], record[3], record[4]]);
        let msg = message(Stage::from_byte(record[0]), errno, a);
        // SAFETY: `err_fd` is open for the app's stderr; a copy is
        // written to and closed, the caller's descriptor stays open.
        let mut out = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(libc::dup(err_fd)) });
        let _ = io::Write::write_all(&mut out, format!("hyperinit: {msg}\n").as_bytes());
    }
    Ok(pid)
}

/// The message for a child that stopped at `stage` with `errno`.
fn message(stage: Option<Stage>, errno: i32, a: &App) -> String {
    let e = io::Error::from_raw_os_error(errno);
    let cmd = a.argv.first().map(String::as_str).unwrap_or("");
    match stage {
        Some(Stage::Chdir) => format!("chdir to {}: {e}", a.workdir),
        Some(Stage::Identity) => format!("cannot switch to user {}:{}: {e}", a.uid, a.gid),
        Some(Stage::NotFound) => format!("exec: {cmd:?}: executable file not found in $PATH"),
        Some(Stage::Exec) => format!("exec {cmd:?}: {e}"),
        Some(Stage::Prepare) | None => {
            format!("exec {cmd:?}: a NUL byte in the command, environment or working directory")
        }
    }
}

/// The exit code of a child that failed at `stage` with `errno`.
fn code(stage: Stage, errno: i32) -> i32 {
    match stage {
        Stage::NotFound => 127,
        Stage::Exec if errno == libc::ENOENT => 127,
        _ => 126,
    }
}

/// The child: plain system calls on prepared data only.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Prepared`, alive and unchanged while
    // the parent is suspended.
    let p = unsafe { &*(arg as *const Prepared) };
    // SAFETY: as the module says: system calls with prepared arguments.
    unsafe {
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        for (to, &from) in p.fds.iter().enumerate() {
            if from >= 0 {
                libc::dup2(from, to as libc::c_int);
            }
        }
        libc::setsid();
        if p.tty {
            libc::ioctl(0, libc::TIOCSCTTY, 0);
        }
        let lim = libc::rlimit {
            rlim_cur: 1_048_576,
            rlim_max: 1_048_576,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        if p.fds[0] < 0 {
            let fd = libc::open(p.dev_null.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::dup2(fd, 0);
                libc::close(fd);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if p.invalid {
            fail(p, Stage::Prepare, 0);
        }
        if libc::chdir(p.workdir.as_ptr()) < 0 {
            fail(p, Stage::Chdir, errno());
        }
        if libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()) < 0
            || libc::syscall(libc::SYS_setgid, p.gid) < 0
            || libc::syscall(libc::SYS_setuid, p.uid) < 0
        {
            fail(p, Stage::Identity, errno());
        }
        for c in &p.candidates {
            // As `docker run` (Go's LookPath): a PATH entry is taken only
            // when it is a regular file with an execute bit.
            if p.searched {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(c.as_ptr(), &mut st) < 0
                    || st.st_mode & libc::S_IFMT != libc::S_IFREG
                    || st.st_mode & 0o111 == 0
                {
                    continue;
                }
            }
            libc::execve(c.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
            fail(p, Stage::Exec, errno());
        }
        fail(p, Stage::NotFound, libc::ENOENT)
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes the failure record and leaves.
fn fail(p: &Prepared, stage: Stage, errno: i32) -> ! {
    let e = errno.to_ne_bytes();
    let record: [u8; RECORD] = [stage as u8, e[0], e[1], e[2], e[3]];
    // SAFETY: a write of a local buffer, then _exit.
    unsafe {
        libc::write(p.report, record.as_ptr().cast(), RECORD);
        libc::_exit(code(stage, errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `argv` in `workdir` as the app, its stdout and stderr on one
    /// pipe: the exit code and everything written there (the app's output,
    /// or hyperinit's message about it).
    fn run(argv: &[&str], workdir: &str) -> (i32, String) {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let (r, w) = crate::streams::pipe().unwrap();
        // SAFETY: plain getters.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let a = App {
            argv: &argv,
            env: &[],
            workdir,
            path_var: "/nonexistent:/usr/bin:/bin",
            uid,
            gid,
            groups: &[],
            fds: [None, Some(w.as_raw_fd()), Some(w.as_raw_fd())],
            tty: false,
        };
        let pid = super::app(&a, w.as_raw_fd()).unwrap();
        drop(w);
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut out = String::new();
        io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        (libc::WEXITSTATUS(status), out)
    }

    #[test]
    fn the_app_runs_with_its_arguments_and_working_directory() {
        assert_eq!(
            run(&["sh", "-c", "pwd; echo \"$0 $1\"", "a", "b"], "/tmp"),
            (0, "/tmp\na b\n".to_string())
        );
    }

    #[test]
    fn failures_before_the_exec_are_worded_with_docker_codes() {
        for (argv, workdir, code, message) in [
            (
                &["no-such-command"][..],
                "/",
                127,
                "exec: \"no-such-command\": executable file not found in $PATH",
            ),
            (&["/nonexistent/app"], "/", 127, "No such file or directory"),
            (&["/tmp"], "/", 126, "Permission denied"),
            (
                &["sh"],
                "/nonexistent-dir",
                126,
                "chdir to /nonexistent-dir:",
            ),
            (&["sh", "a\0b"], "/", 126, "a NUL byte in the command"),
        ] {
            let (c, out) = run(argv, workdir);
            assert_eq!(c, code, "{argv:?}: {out}");
            assert!(
                out.starts_with("hyperinit: ") && out.contains(message) && out.ends_with('\n'),
                "{argv:?}: {out}"
            );
        }
    }
}
