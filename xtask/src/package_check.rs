//! `cargo xtask package-check`: the crate as published builds like any other crate.
//!
//! 1. `cargo package -p flash-attn` (the workspace's pinned toolchain; `--no-verify`, the stable builds
//!    below are the verification) and the PTX modules inside the .crate equal `host/ptx/`.
//! 2. The .crate unpacked into a temporary directory builds with `cargo +stable` (library and CLI), and a
//!    scratch binary crate depending on it by path runs a small attention on the CPU through the public API.
//! 3. cudarc's features compose: a second scratch crate depending on candle-core with `cuda` and on the
//!    unpacked crate with `candle` passes `cargo +stable check -p cudarc` on a machine with no CUDA.
//!
//! Everything outside the repository runs in `$TMPDIR/flash-attn-package-check/` (so the nightly pinned by
//! our rust-toolchain.toml never applies there; `+stable` says so explicitly too), with the caller's
//! CARGO_HOME (registry cache) and one shared target dir, `target/package-check/`, so reruns are quick.
//! Nothing here needs nvcc, a CUDA toolkit or a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

/// The scratch binary: the README's API on the CPU, on a shape with one kernel variant's head dim.
const CPU_MAIN: &str = r#"use flash_attn::{fwd, AttnOptions, DType, Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shape = [1usize, 16, 2, 64];
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let q = Tensor::from_f32(&data, &shape, DType::BF16)?.to_device(Device::Cpu)?;
    let k = Tensor::from_f32(&data, &shape, DType::BF16)?;
    let v = Tensor::from_f32(&data, &shape, DType::BF16)?;
    let o = fwd(&q, &k, &v, &AttnOptions::default())?;
    assert_eq!(o.out.shape(), &shape[..], "out shape");
    let out = o.out.to_f32_vec()?;
    assert_eq!(out.len(), n, "out length");
    assert!(out.iter().all(|x| x.is_finite()), "non-finite output");
    // Each output is a convex combination of values in [-0.5, 0.5) (bf16-rounded).
    assert!(out.iter().all(|x| x.abs() <= 0.51), "output outside the values' range");
    assert!(out.iter().any(|&x| x != 0.0), "all-zero output");
    println!("package-check: fwd on the CPU ok, out {:?}, {} finite values", o.out.shape(), out.len());
    Ok(())
}
"#;

pub fn run_check(root: &Path) -> Result<(), String> {
    let start = Instant::now();
    let target_dir = root.join("target").join("package-check");
    let scratch = std::env::temp_dir().join("flash-attn-package-check");
    if scratch.starts_with(root) {
        return Err(format!("the scratch dir {} must be outside the repository (set TMPDIR)", scratch.display()));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    mkdir(&scratch)?;
    ensure_stable()?;

    // 1. The package, built by the workspace's own cargo (the pinned nightly, as in `./x test`).
    let t = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let before = SystemTime::now();
    let mut package = Command::new(&cargo);
    package.current_dir(root).args(["package", "-p", "flash-attn", "--allow-dirty", "--no-verify", "--quiet"]).env_remove("CARGO_TARGET_DIR");
    run(&mut package)?;
    let krate = newest_crate(&root.join("target").join("package"), before)?;
    let unpacked = scratch.join("unpacked");
    mkdir(&unpacked)?;
    // --touch: extraction time as mtime, so cargo's fingerprints see a changed crate as changed.
    run(Command::new("tar").arg("xzf").arg(&krate).arg("--touch").arg("-C").arg(&unpacked))?;
    let stem = krate.file_name().unwrap().to_string_lossy().trim_end_matches(".crate").to_string();
    let crate_dir = unpacked.join(&stem);
    if crate_dir.join("build.rs").exists() {
        return Err(format!("{} has a build script: the package must build without one", krate.display()));
    }
    for rel in crate::ptx::PTX_TARGETS.iter().flat_map(|t| t.shipped_files()).map(|f| format!("ptx/{f}.zst")) {
        let packed = std::fs::read(crate_dir.join(&rel)).map_err(|e| format!("{} lacks {rel}: {e}", krate.display()))?;
        let shipped = std::fs::read(root.join("host").join(&rel)).map_err(|e| format!("host/{rel}: {e}"))?;
        if packed != shipped {
            return Err(format!("{rel} in {} differs from host/{rel}", krate.display()));
        }
    }
    let size = std::fs::metadata(&krate).map_err(|e| e.to_string())?.len();
    // crates.io refuses packages over 10 MB.
    if size > 10_000_000 {
        return Err(format!("{} is {size} bytes: crates.io takes at most 10 MB", krate.display()));
    }
    println!("package-check: {} ({:.1} MiB) holds the shipped kernel modules (sm_80 PTX, both cubins), no build script [{:.0}s]", krate.display(), size as f64 / (1 << 20) as f64, t.elapsed().as_secs_f64());
    let lock = crate_dir.join("Cargo.lock");

    // 2. The unpacked crate's own targets (library and CLI) on stable, then a dependent binary, run.
    let t = Instant::now();
    run(stable(&target_dir).current_dir(&crate_dir).args(["build", "--quiet", "--lib", "--bins"]))?;
    let cpu = scratch.join("use-cpu");
    scratch_crate(&cpu, &format!("flash-attn = {{ path = {} }}\n", toml_str(&crate_dir)), CPU_MAIN, &lock)?;
    run(stable(&target_dir).current_dir(&cpu).args(["run", "--quiet"]))?;
    println!("package-check: builds and runs on stable [{:.0}s]", t.elapsed().as_secs_f64());

    // 3. Next to candle-core's `cuda` (cudarc with dynamic-linking and cuda-version-from-build-system).
    let t = Instant::now();
    let candle = scratch.join("use-candle-cuda");
    let deps = format!(
        "candle-core = {{ version = \"0.11\", features = [\"cuda\"] }}\nflash-attn = {{ path = {}, features = [\"candle\"] }}\n",
        toml_str(&crate_dir)
    );
    scratch_crate(&candle, &deps, "fn main() {}\n", &lock)?;
    let tree = stable(&target_dir).current_dir(&candle).args(["tree", "--quiet", "-p", "cudarc", "--depth", "0", "-f", "{p} [{f}]"]).output().map_err(|e| e.to_string())?;
    print!("package-check: cudarc next to candle-core/cuda: {}", String::from_utf8_lossy(&tree.stdout));
    run(stable(&target_dir).current_dir(&candle).args(["check", "--quiet", "-p", "cudarc"]))?;
    println!("package-check: cargo +stable check -p cudarc ok with candle-core/cuda, no CUDA needed [{:.0}s]", t.elapsed().as_secs_f64());

    let _ = std::fs::remove_dir_all(&scratch);
    println!("package-check ok [{:.0}s]", start.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo +stable` through rustup's proxy, with nothing of the outer (nightly) build leaking in.
fn stable(target_dir: &Path) -> Command {
    let mut cmd = Command::new(rustup_cargo());
    cmd.arg("+stable").env("CARGO_TARGET_DIR", target_dir);
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_MAKEFLAGS", "CARGO_PRIMARY_PACKAGE", "CARGO_MANIFEST_DIR", "CARGO"] {
        cmd.env_remove(var);
    }
    cmd
}

/// rustup's `cargo` proxy (which understands `+toolchain`), not the toolchain's own binary that a
/// toolchain-first PATH might give.
fn rustup_cargo() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    match home.map(|h| h.join("bin").join("cargo")) {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("cargo"),
    }
}

/// Install the stable toolchain if it is missing (RUSTUP_AUTO_INSTALL=0 on our machines).
fn ensure_stable() -> Result<(), String> {
    let ok = Command::new("rustup").args(["run", "stable", "rustc", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("xtask: installing the stable toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "stable", "--profile", "minimal"]))?;
    }
    Ok(())
}

fn scratch_crate(dir: &Path, deps: &str, main: &str, lock: &Path) -> Result<(), String> {
    mkdir(&dir.join("src"))?;
    let name = dir.file_name().unwrap().to_string_lossy();
    // Its own workspace, edition 2021 (any recent stable), the package's lock file for the same versions.
    let manifest = format!("[package]\nname = \"{name}\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n[dependencies]\n{deps}\n[workspace]\n");
    write(&dir.join("Cargo.toml"), &manifest)?;
    write(&dir.join("src").join("main.rs"), main)?;
    if lock.exists() {
        std::fs::copy(lock, dir.join("Cargo.lock")).map_err(|e| format!("copy {}: {e}", lock.display()))?;
    }
    Ok(())
}

/// The `flash-attn-*.crate` that `cargo package` just wrote.
fn newest_crate(dir: &Path, not_before: SystemTime) -> Result<PathBuf, String> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = e.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("flash-attn-") && name.ends_with(".crate") {
            let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).map_err(|e| e.to_string())?;
            if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
                best = Some((mtime, path));
            }
        }
    }
    match best {
        // A second's slack: some filesystems round mtimes.
        Some((t, p)) if t + std::time::Duration::from_secs(1) >= not_before => Ok(p),
        _ => Err(format!("cargo package wrote no flash-attn-*.crate in {}", dir.display())),
    }
}

/// A path as a TOML basic string.
fn toml_str(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('\\', "\\\\").replace('"', "\\\""))
}

fn mkdir(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))
}

fn write(p: &Path, s: &str) -> Result<(), String> {
    std::fs::write(p, s).map_err(|e| format!("write {}: {e}", p.display()))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    crate::run(cmd)
}
