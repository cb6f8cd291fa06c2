//! hyperfs: the filesystem half of hyperbuild, with no network, no image
//! formats and no artifact: [`layer`] applies OCI layer tar streams onto a
//! [`tree`] (file contents go to the [`spool`], zero blocks as holes), and
//! [`erofs`] writes the tree as a read-only EROFS image. Kept apart so the
//! fuzzers and tests build only this.
#![forbid(unsafe_code)]

pub mod dir;
pub mod erofs;
pub mod layer;
pub mod record;
pub mod spool;
pub mod tree;
