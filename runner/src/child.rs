//! hyperboot's helper processes (QEMU, passt): each in a process group of
//! its own, so a signal to hyperboot's group (a terminal's Ctrl-C, timeout(1),
//! systemd's control-group kill) reaches hyperboot alone and goes through its
//! graceful stop once; and each ended by the kernel when hyperboot dies
//! (parent-death signal), so no VM or network outlives it.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// A command for a helper process.
pub fn helper(program: &str) -> Command {
    let mut c = Command::new(program);
    c.process_group(0);
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes two system calls (prctl, getppid); it allocates nothing.
    unsafe {
        c.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // hyperboot may have died between fork and prctl.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::other("hyperboot is gone"));
            }
            Ok(())
        });
    }
    c
}
