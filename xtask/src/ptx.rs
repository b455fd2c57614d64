//! Building the device crate into PTX. One definition, used by `host/build.rs` (so a plain `cargo build`
//! always embeds PTX made from the current kernel sources) and by `cargo xtask ptx` (which adds ptxas).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The PTX modules we build: (file stem, `-C target-cpu`). sm_80 PTX runs on Ampere and Hopper (JIT).
pub const PTX_TARGETS: &[(&str, &str)] = &[("kernels_sm80", "sm_80")];

/// Build every module of `PTX_TARGETS` from `<root>/kernels-gpu` into `out_dir/<stem>.ptx`.
/// `cargo` is the cargo binary to run (the toolchain is pinned by rust-toolchain.toml).
pub fn build_ptx(cargo: &Path, root: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;
    let mut outputs = Vec::new();
    for (stem, cpu) in PTX_TARGETS {
        let out = out_dir.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root.join("kernels-gpu"))
            .args(["rustc", "--release", "--quiet", "--target", "nvptx64-nvidia-cuda", "-Zbuild-std=core"])
            .arg("--target-dir")
            .arg(root.join("target").join("kernels-gpu"))
            .args(["--", "-C", &format!("target-cpu={cpu}"), "-C", "target-feature=+ptx80", "-C", "llvm-args=-unroll-threshold=100000 -unroll-full-max-count=100000"])
            .arg(format!("--emit=asm={}", out.display()));
        // Outer-build settings must not leak into the device build.
        for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO_MAKEFLAGS", "CARGO_PRIMARY_PACKAGE"] {
            cmd.env_remove(var);
        }
        let status = cmd.status().map_err(|e| format!("running {}: {e}", cargo.display()))?;
        if !status.success() {
            return Err(format!("building kernels-gpu for {cpu} failed ({status})"));
        }
        outputs.push(out);
    }
    Ok(outputs)
}
