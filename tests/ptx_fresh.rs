//! The PTX and cubins shipped in `host/ptx/` (zstd-compressed; embedded by the library, published in the
//! package) are exactly what the kernel sources build to: `cargo xtask ptx` builds `target/ptx/` (`./x test`
//! runs it before the tests) and this compares the library's decompressed modules with it byte for byte.
//! The build is deterministic: two clean builds, in different directories with different toolchain
//! locations, give identical bytes.

use std::path::{Path, PathBuf};

/// The modules `host/src/ptx.rs` embeds from those `xtask/src/ptx.rs` builds (`PTX_TARGETS`,
/// `shipped_files`): both cubins, and the PTX of sm_80 only (sm_90a PTX runs only where its cubin does).
fn shipped() -> [(&'static str, &'static [u8]); 3] {
    let get = |r: Result<&'static [u8], String>| r.unwrap_or_else(|e| panic!("{e}: run `cargo xtask ship-ptx`"));
    [
        ("kernels_sm80.ptx", get(flash_attn::ptx::ptx_sm80().map(str::as_bytes))),
        ("kernels_sm80.cubin", get(flash_attn::ptx::cubin_sm80())),
        ("kernels_sm90.cubin", get(flash_attn::ptx::cubin_sm90())),
    ]
}
/// Every module built (the sources of each are checked against its PTX build).
const STEMS: [&str; 2] = ["kernels_sm80", "kernels_sm90"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}


fn read_fresh(file: &str) -> (PathBuf, Vec<u8>) {
    let path = root().join("target").join("ptx").join(file);
    match std::fs::read(&path) {
        Ok(bytes) => (path, bytes),
        Err(e) => panic!("no fresh PTX build at {} ({e}): run `cargo xtask ptx` first (`./x test` does)", path.display()),
    }
}

#[test]
fn shipped_ptx_is_fresh() {
    let mut stale = Vec::new();
    for (file, shipped) in shipped() {
        let (fresh_path, fresh) = read_fresh(file);
        if shipped != &fresh[..] {
            let line = shipped.split(|&b| b == b'\n').zip(fresh.split(|&b| b == b'\n')).position(|(a, b)| a != b);
            let at = match line {
                Some(i) => format!("first difference at line {}", i + 1),
                None => "one is a prefix of the other".into(),
            };
            stale.push(format!(
                "  host/ptx/{file}.zst, decompressed ({} bytes) != {} ({} bytes), {at}",
                shipped.len(),
                fresh_path.display(),
                fresh.len()
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "the shipped PTX differs from a fresh build of kernels-gpu:\n{}\nrun `cargo xtask ship-ptx` and commit host/ptx/",
        stale.join("\n")
    );
}

/// Guards the comparison above from passing on an old build: no source file of the last device build
/// (cargo's dep-info of kernels-gpu, every file the crate reads) is newer than the PTX it produced.
#[test]
fn fresh_ptx_is_newer_than_kernel_sources() {
    let mut newer = Vec::new();
    for stem in STEMS {
        let (fresh_path, _) = read_fresh(&format!("{stem}.ptx"));
        let built = std::fs::metadata(&fresh_path).and_then(|m| m.modified()).unwrap();
        let dep_info = root()
            .join("target")
            .join(format!("kernels-gpu-{stem}"))
            .join("nvptx64-nvidia-cuda/release/libkernels_gpu.d");
        let text = std::fs::read_to_string(&dep_info)
            .unwrap_or_else(|e| panic!("{} ({e}): run `cargo xtask ptx` first (`./x test` does)", dep_info.display()));
        for source in dep_info_sources(&text) {
            let modified = std::fs::metadata(&source).and_then(|m| m.modified());
            match modified {
                Ok(t) if t <= built => {}
                Ok(_) => newer.push(format!("  {} (newer than the build in target/ptx/)", source.display())),
                Err(_) => newer.push(format!("  {} (gone since the build)", source.display())),
            }
        }
    }
    newer.sort();
    newer.dedup();
    assert!(
        newer.is_empty(),
        "kernel sources changed after the last `cargo xtask ptx`:\n{}\nrun `cargo xtask ptx` (then `cargo xtask ship-ptx` if the PTX changed)",
        newer.join("\n")
    );
}

/// The prerequisites of a make-style dep-info file (`target: a b c`, spaces in paths escaped as `\ `).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(colon) = line.find(": ") else { continue };
        let mut cur = String::new();
        let mut chars = line[colon + 2..].chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&' ') => {
                    cur.push(' ');
                    chars.next();
                }
                ' ' => {
                    if !cur.is_empty() {
                        out.push(PathBuf::from(std::mem::take(&mut cur)));
                    }
                }
                _ => cur.push(c),
            }
        }
        if !cur.is_empty() {
            out.push(PathBuf::from(cur));
        }
    }
    out
}
