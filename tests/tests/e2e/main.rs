//! End-to-end tests, one binary, one module per tier (scripts/test runs each
//! tier by its module name):
//! - `qemu`: real artifacts from a busybox image booted on the QEMU backend;
//! - `registry`: pulls from loopback registries, docker-archives, faults;
//! - `net`: nginx and redis from Debian packages reached through `-p`/`-P`, outbound, tap;
//! - `objstore`: artifacts published to and booted from object storage (moto on loopback);
//! - `vmm`: tiny purpose-built guests on hyperboot's own KVM VMM (any KVM);
//! - `slow`: the project's kernel booted by the KVM VMM (up to init under
//!   nested PVM KVM, to the app where KVM has real semantics);
//! - `containerd`: containers run by Debian's containerd through our shim;
//! - `kvm_app`: the app-level scenarios on the KVM backend (the nested tier).
//!
//! App-level scenarios are written once (`scenarios/`) and instantiated per
//! backend.

#[macro_use]
mod scenarios;

mod containerd;
mod kvm_app;
mod net;
mod objstore;
mod qemu;
mod registry;
mod slow;
mod vmm;
