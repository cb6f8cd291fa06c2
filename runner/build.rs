// hyperboot is linked with packed relative relocations (DT_RELR, glibc
// 2.36 and binutils 2.38 on): its position-independent image carries
// about 20 000 of them, which as RELA records were half a MiB read into
// every VM's memory at start; packed they are a few KiB.
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
