//! Builds kernels-gpu into PTX for every `PTX_TARGETS` entry, so the library embeds PTX made from the
//! kernel sources of this very checkout (never a stale artifact).

#[path = "../xtask/src/ptx.rs"]
#[allow(dead_code)] // ptxas_archs is for `cargo xtask ptx`
mod ptx;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cargo = PathBuf::from(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    println!("cargo:rerun-if-changed={}", root.join("kernels-gpu/src").display());
    println!("cargo:rerun-if-changed={}", root.join("kernels-gpu/Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", root.join("xtask/src/ptx.rs").display());
    println!("cargo:rerun-if-changed={}", root.join("rust-toolchain.toml").display());
    if let Err(e) = ptx::build_ptx(&cargo, &root, &out_dir) {
        panic!("{e}");
    }
}
