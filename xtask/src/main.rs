//! Project tasks: `cargo xtask ptx` (build the device crate to PTX and check it with ptxas for every
//! target GPU), `cargo xtask ship-ptx` (the same, then compress the PTX into `host/ptx/`, which the package
//! embeds), `cargo xtask package-check` (the packaged crate builds and runs on stable with no CUDA),
//! `cargo xtask bundle` (release binaries + PTX + scripts for the GPU machine), `cargo xtask gen-wgmma` (the
//! generated wgmma wrappers and the `WgElem` trait over them).

mod package_check;
mod ptx;
mod wgmma;
#[path = "../../host/src/shared/packed.rs"]
#[allow(dead_code)] // `frames` is the reader's (host/src/ptx.rs); the tests use it
mod packed;
#[path = "../../host/src/shared/variants.rs"]
#[macro_use]
#[allow(dead_code)]
mod variants;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// ptxas comes from PyPI's nvidia-cuda-nvcc, pinned to the GPU machine's CUDA (13.0).
const NVCC_WHEEL: &str = "nvidia-cuda-nvcc==13.0.88";

const USAGE: &str = "usage: cargo xtask <ptx|ship-ptx|package-check|bundle|gen-wgmma>
  ptx            build kernels-gpu to PTX in target/ptx/ and run ptxas on it (sm_80, sm_90a)
  ship-ptx       the same, then compress the shipped modules into host/ptx/*.zst (what the crate embeds and ships;
                 run after changing kernels-gpu: the ptx_fresh test fails until the two agree)
  package-check  cargo package flash-attn, then build and run a scratch crate depending on the unpacked
                 .crate with `cargo +stable` (no nightly, no CUDA), and check cudarc's features compose
                 with candle-core's `cuda`
  bundle         build release test/CLI/bench binaries and PTX into bundle/ for the GPU machine
                 (`bundle --only test-gpu_bwd,bench-bwd,example-sanitize,flash-attn`: just those
                 binaries and the scripts, no PTX: a few MiB, so several variants fit one device call)
  gen-wgmma      write kernels-gpu/src/arch/wgmma_ops.rs and kernels-gpu/src/fwd/wg_elem.rs";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ptx") => cmd_ptx(),
        Some("ship-ptx") => cmd_ship_ptx(),
        Some("package-check") => package_check::run_check(&root()),
        Some("bundle") => match (args.get(1).map(String::as_str), args.get(2)) {
            (None, _) => cmd_bundle(),
            (Some("--only"), Some(names)) => cmd_bundle_only(names),
            _ => Err(USAGE.into()),
        },
        Some("gen-wgmma") => {
            wgmma::generated_files().into_iter().try_for_each(|(file, text)| {
                let path = root().join(file);
                std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
            })
        }
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{cmd:?} failed: {status}")) }
}

/// Path of ptxas, installing the pinned wheel into target/ on first use.
fn ptxas() -> Result<PathBuf, String> {
    let dir = root().join("target").join("cuda-nvcc");
    let bin = dir.join("nvidia/cu13/bin/ptxas");
    if !bin.exists() {
        eprintln!("xtask: installing ptxas ({NVCC_WHEEL}) into {}", dir.display());
        let py = if Command::new("python3").arg("--version").output().is_ok() { "python3" } else { "python" };
        run(Command::new(py).args(["-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", "--target"]).arg(&dir).arg(NVCC_WHEEL))?;
    }
    if bin.exists() { Ok(bin) } else { Err(format!("ptxas not found at {}", bin.display())) }
}

fn cmd_ptx() -> Result<(), String> {
    let out_dir = root().join("target").join("ptx");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let files = ptx::build_ptx(Path::new(&cargo), &root(), &out_dir)?;
    let ptxas = ptxas()?;
    let mut spills = 0;
    let mut losses = Vec::new();
    for (file, target) in files.iter().zip(ptx::PTX_TARGETS) {
        for arch in target.ptxas_archs {
            // The shipped architecture's cubin is kept (ptxas output is deterministic); the rest is a check.
            let cubin = if *arch == target.cubin_arch { out_dir.join(format!("{}.cubin", target.stem)) } else { PathBuf::from("/dev/null") };
            let out = Command::new(&ptxas)
                .args(["-v", "--warn-on-spills", "-O3", "--gpu-name", arch, "-o"])
                .arg(&cubin)
                .arg(file)
                .output()
                .map_err(|e| format!("running ptxas: {e}"))?;
            let log = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                return Err(format!("ptxas {arch} rejected {}:\n{log}", file.display()));
            }
            println!("ptxas {arch} {}:", file.file_name().unwrap().to_string_lossy());
            println!("  {:<28} {:>5} {:>10} {:>10} {:>7} {:>12}", "kernel", "regs", "smem(st.)", "smem(dyn)", "stack", "spill st/ld");
            losses.extend(performance_losses(&log).into_iter().map(|l| format!("{arch}: {l}")));
            for k in parse_ptxas(&log) {
                spills += k.spill_stores + k.spill_loads;
                println!("  {:<28} {:>5} {:>10} {:>10} {:>7} {:>6}/{:<6}", k.name, k.regs, k.smem, dynamic_smem(&k.name), k.stack, k.spill_stores, k.spill_loads);
            }
        }
    }
    if spills > 0 {
        println!("warning: some kernels spill registers (see the table)");
    }
    if !losses.is_empty() {
        return Err(format!("ptxas reports lost wgmma / setmaxnreg performance (e.g. a `trap` path reachable from warp-specialized consumer code makes ptxas ignore their setmaxnreg budget and serialize every wgmma; see benches/RESULTS.md):\n{}", losses.join("\n")));
    }
    println!("ptx ok: {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}

/// ptxas's notes that it serialized wgmma, injected waits into a wgmma pipeline, or ignored setmaxnreg
/// (its "Potential Performance Loss" infos and the setmaxnreg warnings): a kernel that compiles with
/// one runs far below what its source intends, so `cargo xtask ptx` fails on them.
fn performance_losses(log: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains("Potential Performance Loss") || (l.contains("setmaxnreg") && l.contains("ignored"))).map(|l| l.trim().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::{pack_chunks, packed, performance_losses};

    /// `pack_chunks` writes what the library's reader takes: an index of frames of at most
    /// `FRAME_BYTES`, each decompressing to its slice of the module.
    #[test]
    fn packed_modules_read_back() {
        let mut x = 0x9e37_79b9u32;
        let raw: Vec<u8> = (0..2 * packed::FRAME_BYTES + 12345)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 7) as u8
            })
            .collect();
        let p = pack_chunks(&raw).unwrap();
        let frames = packed::frames(&p).expect("an index the reader accepts");
        assert_eq!(frames.len(), 3);
        let mut back = Vec::new();
        for (c, r) in frames {
            let f = zstd::decode_all(c).unwrap();
            assert_eq!(f.len(), r);
            back.extend(f);
        }
        assert_eq!(back, raw);
        assert_eq!(zstd::decode_all(&p[..]).unwrap(), raw, "a plain zstd decoder skips the index");
    }

    #[test]
    fn wgmma_serialization_and_ignored_setmaxnreg_are_losses() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                   ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'k'\n\
                   ptxas warning : (C7508) Potential Performance Loss: setmaxnreg ignored; unable to determine register count at entry\n\
                   ptxas info    : Used 168 registers, used 16 barriers\n\
                       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads";
        let found = performance_losses(log);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("C7512") && found[1].contains("C7508"));
        assert!(performance_losses("ptxas info    : Used 255 registers\n").is_empty());
    }
}

/// `cargo xtask ptx`, then compress its shipped modules and cubins into `host/ptx/` (`<file>.zst`): what
/// the host embeds and the package ships, so that a dependent crate builds with no nightly and no CUDA.
fn cmd_ship_ptx() -> Result<(), String> {
    cmd_ptx()?;
    let root = root();
    let dest = root.join("host").join("ptx");
    std::fs::create_dir_all(&dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    for t in ptx::PTX_TARGETS.iter().filter(|t| !t.ship_ptx) {
        let stale = dest.join(format!("{}.ptx", t.stem));
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| format!("remove {}: {e}", stale.display()))?;
            println!("ship-ptx: removed {} (not shipped)", stale.display());
        }
    }
    // Shipped zstd-compressed (level 19: PTX and cubins shrink 7-23x, the `.crate` stays far under
    // crates.io's limit); a file whose content did not change is left as it is.
    for file in ptx::PTX_TARGETS.iter().flat_map(|t| t.shipped_files()) {
        let (src, dst) = (root.join("target").join("ptx").join(&file), dest.join(format!("{file}.zst")));
        let new = std::fs::read(&src).map_err(|e| format!("read {}: {e}", src.display()))?;
        let old = std::fs::read(&dst).ok().filter(|packed| packed.starts_with(&packed::SKIPPABLE_MAGIC.to_le_bytes()));
        if old.and_then(|packed| zstd::decode_all(&packed[..]).ok()).as_deref() == Some(&new[..]) {
            println!("ship-ptx: {} unchanged", dst.display());
        } else {
            let packed = pack_chunks(&new).map_err(|e| format!("compress {}: {e}", src.display()))?;
            std::fs::write(&dst, &packed).map_err(|e| format!("write {}: {e}", dst.display()))?;
            println!("ship-ptx: updated {} ({} bytes, {} compressed)", dst.display(), new.len(), packed.len());
        }
        let raw = dest.join(&file);
        if raw.exists() {
            std::fs::remove_file(&raw).map_err(|e| format!("remove {}: {e}", raw.display()))?;
            println!("ship-ptx: removed {} (shipped compressed now)", raw.display());
        }
    }
    Ok(())
}

/// A module in the shipped format (host/src/shared/packed.rs): the index, then one zstd frame (level 19)
/// per `packed::FRAME_BYTES` of the module.
fn pack_chunks(raw: &[u8]) -> Result<Vec<u8>, String> {
    let chunks: Vec<&[u8]> = raw.chunks(packed::FRAME_BYTES).collect();
    // One worker per core, each taking the next chunk (level 19 holds ~100 MB per compressor).
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(chunks.len());
    let mut done: Vec<(usize, std::io::Result<Vec<u8>>)> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(c) = chunks.get(i) else { return mine };
                        mine.push((i, zstd::encode_all(*c, 19)));
                    }
                })
            })
            .collect();
        jobs.into_iter().flat_map(|j| j.join().unwrap_or_default()).collect()
    });
    done.sort_by_key(|d| d.0);
    if done.len() != chunks.len() {
        return Err("a compression thread panicked".into());
    }
    let frames = done.into_iter().map(|(_, f)| f.map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    let lengths: Vec<(usize, usize)> = frames.iter().zip(&chunks).map(|(f, c)| (f.len(), c.len())).collect();
    let mut out = packed::index(&lengths);
    frames.iter().for_each(|f| out.extend(f));
    Ok(out)
}

/// Dynamic shared memory the host launches a kernel with (from the shared variant table).
fn dynamic_smem(kernel: &str) -> String {
    // A paged, modifier (`_alibi` / `_dropout`: the ALiBi-only / dropout-only copies) or ordered
    // deterministic (`_det`, `_mods_det`) twin launches like its contiguous kernel.
    let kernel = kernel.strip_suffix("_det").unwrap_or(kernel);
    let kernel = kernel.strip_suffix("_mods").or_else(|| kernel.strip_suffix("_alibi")).or_else(|| kernel.strip_suffix("_dropout")).unwrap_or(kernel);
    let kernel = kernel.strip_suffix("_paged").unwrap_or(kernel);
    for d in [32, 64, 96, 128, 192, 256] {
        for dt in [variants::KernelDType::BF16, variants::KernelDType::F16] {
            if variants::fwd_kernel_name(d, dt) == Some(kernel) {
                return variants::fwd_config(d).smem_bytes().to_string();
            }
            if let (Some(c), Some(name)) = (variants::fwd_wg_config(d), variants::fwd_wg_kernel_name(d, dt))
                && name == kernel
            {
                return variants::fwd_wg_smem_bytes(&c).to_string();
            }
            if variants::bwd_wg_kernel_name(d, dt) == Some(kernel) {
                return variants::bwd_wg_smem_bytes(d).to_string();
            }
            if let Some((dkdv, dq)) = variants::bwd_kernel_names(d, dt) {
                if dkdv == kernel {
                    return variants::bwd_config(d).smem_bytes().to_string();
                }
                if dq == kernel {
                    return variants::dq_smem_bytes(&variants::dq_config(d)).to_string();
                }
            }
        }
    }
    "0".into()
}

#[derive(Default)]
struct KernelReport {
    name: String,
    regs: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Pull (kernel, registers, static smem, stack, spills) out of `ptxas -v`.
fn parse_ptxas(log: &str) -> Vec<KernelReport> {
    let num_before = |line: &str, unit: &str| -> u32 {
        line.find(unit).and_then(|i| line[..i].split_whitespace().last()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let mut out: Vec<KernelReport> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + 26..];
            out.push(KernelReport { name: rest[..rest.find('\'').unwrap_or(rest.len())].to_string(), ..Default::default() });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack = num_before(line, "bytes stack frame");
                k.spill_stores = num_before(line, "bytes spill stores");
                k.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.regs = num_before(line, "registers");
                k.smem = num_before(line, "bytes smem");
            }
        }
    }
    out
}

/// Release binaries (every test target, the CLI, the benches) and the PTX, stripped, in `bundle/`: the
/// GPU machine has no Rust toolchain, so this folder is what travels there (`carry: ["bundle"]`).
fn cmd_bundle() -> Result<(), String> {
    let root = root();
    let bundle = root.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args(["test", "--release", "--no-run", "--benches", "--tests", "--bins", "--message-format=json", "-p", "flash-attn"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err("building the release test binaries failed".into());
    }
    run(Command::new(&cargo).current_dir(&root).args(["build", "--release", "--bin", "flash-attn"]))?;
    let mut copied = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // {"reason":"compiler-artifact", "target":{"name":"gpu",...}, "executable":"/.../gpu-hash", ...}
        let (Some(exe), Some(name)) = (json_str(line, "\"executable\":"), json_str(line, "\"name\":")) else { continue };
        let kind = if line.contains("\"kind\":[\"bench\"]") { "bench" } else if line.contains("\"kind\":[\"bin\"]") { continue } else { "test" };
        let dest = bundle.join(format!("{kind}-{name}"));
        std::fs::copy(exe, &dest).map_err(|e| format!("copy {exe}: {e}"))?;
        copied.push(dest);
    }
    // The examples as plain binaries (`cargo test --examples` would build them with the test harness).
    run(Command::new(&cargo).current_dir(&root).args(["build", "--release", "--examples", "-p", "flash-attn"]))?;
    let examples = std::fs::read_dir(root.join("host/examples")).map_err(|e| e.to_string())?;
    for name in examples.filter_map(|e| Some(e.ok()?.path().file_stem()?.to_string_lossy().into_owned())) {
        let dest = bundle.join(format!("example-{name}"));
        std::fs::copy(root.join("target/release/examples").join(&name), &dest).map_err(|e| format!("copy example {name}: {e}"))?;
        copied.push(dest);
    }
    let cli = bundle.join("flash-attn");
    std::fs::copy(root.join("target/release/flash-attn"), &cli).map_err(|e| e.to_string())?;
    copied.push(cli);
    for f in &copied {
        let _ = Command::new("strip").arg(f).status();
    }
    let ptx_dir = bundle.join("ptx");
    ptx::build_ptx(Path::new(&cargo), &root, &ptx_dir)?;
    // Every script of benches/ (run.sh and the PyTorch comparison, sanitize.sh over example-sanitize).
    let benches = std::fs::read_dir(root.join("benches")).map_err(|e| e.to_string())?;
    let mut scripts: Vec<String> = benches.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.ends_with(".sh") || n.ends_with(".py")).collect();
    scripts.sort();
    for script in &scripts {
        std::fs::copy(root.join("benches").join(script), bundle.join(script)).map_err(|e| format!("copy {script}: {e}"))?;
    }
    println!("bundle scripts: {}", scripts.join(", "));
    let total: u64 = std::fs::read_dir(&bundle).map_err(|e| e.to_string())?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!("bundle: {} files, {:.1} MiB in {}", copied.len() + 1, total as f64 / (1 << 20) as f64, bundle.display());
    for f in &copied {
        println!("  {}", f.file_name().unwrap().to_string_lossy());
    }
    // Every binary embeds the same PTX and cubins of both modules (tens of megabytes): the folder outgrows
    // what the device tool carries (64 MiB with the tree). One xz stream with a dictionary larger than
    // a binary stores those copies once (527 MiB -> 6 MiB in 13 s, where `-T0 -1` gave 46 MiB). On the
    // GPU machine: `tar xJf bundle.tar.xz`.
    let archive = root.join("bundle.tar.xz");
    run(Command::new("sh").current_dir(&root).arg("-c").arg("tar cf - bundle | xz -T1 --lzma2=preset=2,dict=256MiB > bundle.tar.xz"))?;
    let len = std::fs::metadata(&archive).map_err(|e| e.to_string())?.len();
    println!("archive: {} ({:.1} MiB); on the GPU machine: tar xJf bundle.tar.xz && cd bundle", archive.display(), len as f64 / (1 << 20) as f64);
    Ok(())
}

/// `bundle --only a,b,...`: the named binaries (`test-NAME`, `bench-NAME`, `example-NAME`, `flash-attn`),
/// stripped, and the bench scripts in `bundle/` and `bundle.tar.xz`, without the PTX folder: for A/B
/// runs of several branches in one device call (each variant's archive is a few MiB).
fn cmd_bundle_only(names: &str) -> Result<(), String> {
    let root = root();
    let bundle = root.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut copied = Vec::new();
    for name in names.split(',').filter(|n| !n.is_empty()) {
        let dest = bundle.join(name);
        if name == "flash-attn" {
            run(Command::new(&cargo).current_dir(&root).args(["build", "--release", "--bin", "flash-attn"]))?;
            std::fs::copy(root.join("target/release/flash-attn"), &dest).map_err(|e| e.to_string())?;
        } else if let Some(example) = name.strip_prefix("example-") {
            run(Command::new(&cargo).current_dir(&root).args(["build", "--release", "-p", "flash-attn", "--example", example]))?;
            std::fs::copy(root.join("target/release/examples").join(example), &dest).map_err(|e| format!("copy example {example}: {e}"))?;
        } else {
            let (flag, target) = match name.split_once('-') {
                Some(("test", t)) => ("--test", t),
                Some(("bench", t)) => ("--bench", t),
                _ => return Err(format!("bundle --only: `{name}` is not test-NAME, bench-NAME, example-NAME or flash-attn")),
            };
            let out = Command::new(&cargo)
                .current_dir(&root)
                .args(["test", "--release", "--no-run", "-p", "flash-attn", flag, target, "--message-format=json"])
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("building {name} failed"));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let exe = stdout
                .lines()
                .filter(|l| json_str(l, "\"name\":") == Some(target))
                .find_map(|l| json_str(l, "\"executable\":"))
                .ok_or_else(|| format!("cargo built no executable for {name}"))?;
            std::fs::copy(exe, &dest).map_err(|e| format!("copy {exe}: {e}"))?;
        }
        copied.push(dest);
    }
    for f in &copied {
        let _ = Command::new("strip").arg(f).status();
    }
    let benches = std::fs::read_dir(root.join("benches")).map_err(|e| e.to_string())?;
    for script in benches.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.ends_with(".sh") || n.ends_with(".py")) {
        std::fs::copy(root.join("benches").join(&script), bundle.join(&script)).map_err(|e| format!("copy {script}: {e}"))?;
    }
    run(Command::new("sh").current_dir(&root).arg("-c").arg("tar cf - bundle | xz -T1 --lzma2=preset=2,dict=256MiB > bundle.tar.xz"))?;
    let len = std::fs::metadata(root.join("bundle.tar.xz")).map_err(|e| e.to_string())?.len();
    println!("archive: bundle.tar.xz ({:.1} MiB, {} binaries); copy it aside per variant, e.g. target/bundle-NAME.tar.xz", len as f64 / (1 << 20) as f64, copied.len());
    Ok(())
}

/// The string value following `key` in one line of cargo's JSON output (no escapes in our paths).
fn json_str<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}
