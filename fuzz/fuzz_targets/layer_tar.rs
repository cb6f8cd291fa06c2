//! Hostile layers: any bytes as a stack of tar layers. Flattening must give a
//! tree or a clear error, never panic, and whatever tree results must be
//! writable as an EROFS image.
#![no_main]

use hyperfs::{erofs, layer, spool::Spool, tree::Tree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tree = Tree::new();
    let Ok(mut spool) = Spool::new() else { return };
    // Split the input into up to three layers at 0xfe bytes.
    for (i, part) in data.split(|&b| b == 0xfe).take(3).enumerate() {
        if layer::apply(&mut tree, &mut spool, i, part).is_err() {
            return;
        }
    }
    let _ = erofs::write(&tree, &spool, &mut std::io::sink());
});
