//! The slow tier: the project's kernel booted by hyperboot's KVM VMM.
