//! `containerd-shim-hyper-v2`: containerd's runtime v2 shim for hyper.
//! containerd starts it for a container run with `--runtime
//! io.containerd.hyper.v2` (or a Kubernetes RuntimeClass whose handler maps
//! to that runtime); it turns the container's snapshot into a sealed
//! artifact (cached) and boots it with `hyperboot`, one microVM per
//! container.

mod rootfs;
mod service;
mod spec;

fn main() {
    // The shim waits for its VM itself (a thread per VM), so the library's
    // reaper must not take the exit status first.
    let config = containerd_shim::Config {
        no_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>("io.containerd.hyper.v2", Some(config));
}
