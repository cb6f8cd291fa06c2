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
