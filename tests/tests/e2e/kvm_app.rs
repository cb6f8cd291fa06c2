//! The app tier on the KVM backend: every app-level scenario of the qemu,
//! net and objstore tiers (`scenarios/`), the same bodies, run on hyperboot's
//! own VMM. Needs KVM with real semantics: hardware, or the nested host that
//! `scripts/test nested` boots (scripts/nested-run); elsewhere each test says
//! loudly that it was skipped.

mod app {
    app_scenarios!(hyper_tests::Backend::Kvm);
}

mod detached {
    detached_scenarios!(hyper_tests::Backend::Kvm);
}

mod net {
    net_scenarios!(hyper_tests::Backend::Kvm);
}

mod objstore {
    objstore_scenarios!(hyper_tests::Backend::Kvm);
}
