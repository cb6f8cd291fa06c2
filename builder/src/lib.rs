//! hyperbuild: turns an OCI image into a sealed `.hvm` artifact.
//!
//! The pipeline: [`oci`] resolves the image and its layers, [`layer`] applies
//! each layer's tar stream onto a [`tree`] (file contents go to the [`spool`]),
//! [`erofs`] writes the tree as a filesystem image, and [`build`] fuses it with
//! the kernel and init into an artifact (see the `hvm` crate for the format).
#![forbid(unsafe_code)]

pub mod build;
pub mod cache;
pub mod docker_archive;
pub mod elf;
pub mod inspect;
pub mod layer_cache;
pub mod oci;
pub mod registry;
pub use hyperfs::{erofs, layer, spool, tree};

/// The default location of an installed component: `$VAR`, else
/// `$XDG_DATA_HOME/hyper/NAME` (`~/.local/share/hyper/NAME`).
pub fn installed(var: &str, name: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share")
        });
    data.join("hyper").join(name)
}
