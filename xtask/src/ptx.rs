//! Building the device crate into PTX, for `cargo xtask ptx` (which adds ptxas), `ship-ptx` (which copies
//! the result into `host/ptx/`, what the package embeds) and `bundle`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::variants::{decode_config, fwd_decode_fin_kernel_name, fwd_decode_kernel_name, KernelDType, DECODE_BLOCKS_PER_SM};

/// One PTX module: the same kernel sources for one GPU generation.
pub struct PtxTarget {
    /// File stem of the `.ptx` (the host embeds `<stem>.ptx`).
    pub stem: &'static str,
    /// `-C target-cpu`: the PTX `.target`.
    pub cpu: &'static str,
    /// PTX ISA version, as a target feature.
    pub ptx_isa: &'static str,
    /// `--cfg` flags the device code branches on (`fa_sm90`: Hopper-only instructions).
    pub cfgs: &'static [&'static str],
    /// GPUs `cargo xtask ptx` assembles this module for.
    pub ptxas_archs: &'static [&'static str],
    /// The one of `ptxas_archs` whose cubin is shipped beside the PTX (`<stem>.cubin`): loading a cubin
    /// skips the driver's JIT, which takes seconds on a cold cache.
    pub cubin_arch: &'static str,
    /// Whether the package ships the PTX too (for the driver's JIT on GPUs no cubin runs on). The sm_90a
    /// PTX runs only where its cubin does, so only the cubin ships (the crate stays under crates.io's
    /// 10 MB; a driver refusing the cubin gets the sm_80 PTX).
    pub ship_ptx: bool,
}

impl PtxTarget {
    /// The files `cargo xtask ship-ptx` compresses into `host/ptx/` (`<file>.zst`; the library embeds them).
    pub fn shipped_files(&self) -> Vec<String> {
        let mut files = vec![format!("{}.cubin", self.stem)];
        if self.ship_ptx {
            files.insert(0, format!("{}.ptx", self.stem));
        }
        files
    }
}

/// sm_80 PTX runs on Ampere and later (its sm_80 cubin on compute capability 8.x, the PTX JIT-compiled
/// elsewhere); the sm_90a module adds Hopper-only instructions (wgmma, vector reductions) and is what the
/// host loads on compute capability 9.0 (its cubin; sm_90a code runs on no other GPU).
pub const PTX_TARGETS: &[PtxTarget] = &[
    PtxTarget { stem: "kernels_sm80", cpu: "sm_80", ptx_isa: "+ptx80", cfgs: &[], ptxas_archs: &["sm_80", "sm_90a"], cubin_arch: "sm_80", ship_ptx: true },
    PtxTarget { stem: "kernels_sm90", cpu: "sm_90a", ptx_isa: "+ptx81", cfgs: &["fa_sm90"], ptxas_archs: &["sm_90a"], cubin_arch: "sm_90a", ship_ptx: false },
];

/// Build every module of `PTX_TARGETS` from `<root>/kernels-gpu` into `out_dir/<stem>.ptx`.
/// `cargo` is the cargo binary to run (the toolchain is pinned by rust-toolchain.toml).
///
/// rustc writes the PTX to a fixed path inside the module's own target dir, then it is copied to `out_dir`.
/// Cargo does not track `--emit` outputs: when the crate is fresh it skips rustc and writes nothing, so
/// emitting straight into `out_dir` would leave a deleted or differently placed file missing (and every new
/// `out_dir` would change the arguments and force a rebuild). A missing emitted file is rebuilt after
/// `cargo clean -p kernels-gpu` (the built `core` is kept).
pub fn build_ptx(cargo: &Path, root: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;
    let mut outputs = Vec::new();
    for t in PTX_TARGETS {
        // One target dir per module: they differ in flags, and sharing one would rebuild each time.
        let target_dir = root.join("target").join(format!("kernels-gpu-{}", t.stem));
        let emitted = target_dir.join(format!("{}.ptx", t.stem));
        let device_cargo = |args: &[&str]| {
            let mut cmd = Command::new(cargo);
            cmd.current_dir(root.join("kernels-gpu")).args(args).arg("--target-dir").arg(&target_dir);
            // Outer-build settings must not leak into the device build.
            for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO_MAKEFLAGS", "CARGO_PRIMARY_PACKAGE"] {
                cmd.env_remove(var);
            }
            cmd
        };
        for attempt in 0..2 {
            if attempt == 1 {
                let mut clean = device_cargo(&["clean", "--quiet", "--release", "--target", "nvptx64-nvidia-cuda", "-p", "kernels-gpu"]);
                let status = clean.status().map_err(|e| format!("running {}: {e}", cargo.display()))?;
                if !status.success() {
                    return Err(format!("cargo clean -p kernels-gpu in {} failed ({status})", target_dir.display()));
                }
            }
            let mut cmd = device_cargo(&["rustc", "--release", "--quiet", "--target", "nvptx64-nvidia-cuda", "-Zbuild-std=core"]);
            cmd.args(["--", "-C", &format!("target-cpu={}", t.cpu), "-C", &format!("target-feature={}", t.ptx_isa), "-C", "llvm-args=-unroll-threshold=100000 -unroll-full-max-count=100000"])
                .arg(format!("--emit=asm={}", emitted.display()));
            for cfg in t.cfgs {
                cmd.args(["--cfg", cfg]);
            }
            let status = cmd.status().map_err(|e| format!("running {}: {e}", cargo.display()))?;
            if !status.success() {
                return Err(format!("building kernels-gpu for {} failed ({status})", t.cpu));
            }
            if emitted.exists() {
                break;
            }
        }
        if !emitted.exists() {
            return Err(format!("building kernels-gpu for {} left no {}", t.cpu, emitted.display()));
        }
        let out = out_dir.join(format!("{}.ptx", t.stem));
        let ptx = std::fs::read_to_string(&emitted).map_err(|e| format!("read {}: {e}", emitted.display()))?;
        std::fs::write(&out, launch_bounds(&ptx)).map_err(|e| format!("write {}: {e}", out.display()))?;
        outputs.push(out);
    }
    Ok(outputs)
}

/// Kernels whose register budget comes from their block size (ptxas assumes 1024 threads otherwise):
/// export-name prefix, threads per block. rustc has no launch-bounds attribute, so the directives are
/// added to the emitted PTX. The warp-specialized forward and backward: 384 threads (`FWD_WS_THREADS`,
/// `BWD_WS_THREADS`), the tall forward (`flash_fwd_ws3_`) 512, one block per multiprocessor.
const LAUNCH_BOUNDS: &[(&str, u32)] = &[("flash_fwd_ws_", 384), ("flash_fwd_ws3_", 512), ("flash_bwd_ws_", 384)];

/// A kernel's launch bounds: (threads per block, blocks per multiprocessor, whether its second
/// parameter holds tensor maps): `LAUNCH_BOUNDS`, and the decode kernels (`decode_config`'s threads,
/// `DECODE_BLOCKS_PER_SM` blocks, so that their registers leave room for that many).
fn bounds(name: &str) -> Option<(u32, u32, bool)> {
    if let Some(&(_, n)) = LAUNCH_BOUNDS.iter().find(|(prefix, _)| name.starts_with(prefix)) {
        return Some((n, 1, true));
    }
    let name = name.split(['(', ' ']).next().unwrap_or(name);
    (1..=256).find(|&d| [KernelDType::BF16, KernelDType::F16].iter().any(|&dt| [fwd_decode_kernel_name(d, dt), fwd_decode_fin_kernel_name(d, dt)].contains(&Some(name))))
        .map(|d| (decode_config(d).threads() as u32, DECODE_BLOCKS_PER_SM as u32, false))
}

/// `ptx` with `.maxntid N, 1, 1` and `.minnctapersm B` after the parameter list of each kernel with
/// `bounds`; where its second parameter is `TmaMaps` (tensor maps, which the copy engine reads in place)
/// it gets the 64-byte alignment a tensor map needs.
fn launch_bounds(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len() + 1024);
    let mut pending: Option<(u32, u32, bool)> = None;
    for line in ptx.lines() {
        if let Some(name) = line.trim_start().strip_prefix(".visible .entry ") {
            pending = bounds(name);
        }
        if pending.is_some_and(|b| b.2) && line.contains("_param_1[") {
            out.push_str(&line.replacen(".param .align 16 ", ".param .align 64 ", 1));
            out.push('\n');
            continue;
        }
        if let (Some((n, blocks, _)), true) = (pending, line.trim() == ")") {
            out.push_str(line);
            out.push_str(&format!("\n.maxntid {n}, 1, 1\n.minnctapersm {blocks}\n"));
            pending = None;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
