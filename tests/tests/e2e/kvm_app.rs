//! The app tier on the KVM backend: needs hardware KVM.
