//! The two kernel modules, shipped in the package (`host/ptx/`, zstd-compressed: the `.crate` stays far
//! under crates.io's 10 MB) and decompressed on first use: a dependent crate builds on stable with no
//! nightly and no CUDA. Inside this repository `cargo xtask ptx` rebuilds them from kernels-gpu into
//! `target/ptx/`; the test `shipped_ptx_is_fresh` (tests/ptx_fresh.rs) fails until `cargo xtask ship-ptx`
//! compresses a changed build into `host/ptx/`, so the shipped modules are never stale.

use std::io::Read;
use std::sync::OnceLock;

type Unpacked = OnceLock<Result<Vec<u8>, String>>;

/// The zstd frame `packed`, decompressed once into `cell`.
fn unpack(cell: &'static Unpacked, packed: &[u8], what: &str) -> Result<&'static [u8], String> {
    let out = cell.get_or_init(|| {
        let mut out = Vec::new();
        let mut d = ruzstd::decoding::StreamingDecoder::new(packed).map_err(|e| format!("the shipped {what} does not decompress: {e}"))?;
        d.read_to_end(&mut out).map_err(|e| format!("the shipped {what} does not decompress: {e}"))?;
        Ok(out)
    });
    out.as_deref().map_err(Clone::clone)
}

/// PTX for sm_80 and newer (JIT-compiled by the driver for the GPU at hand).
pub fn ptx_sm80() -> Result<&'static str, String> {
    static PTX: Unpacked = OnceLock::new();
    let bytes = unpack(&PTX, include_bytes!("../ptx/kernels_sm80.ptx.zst"), "sm_80 PTX")?;
    std::str::from_utf8(bytes).map_err(|e| format!("the shipped sm_80 PTX is not text: {e}"))
}

/// The sm_80 module assembled for sm_80 (runs on compute capability 8.x without a JIT).
pub fn cubin_sm80() -> Result<&'static [u8], String> {
    static CUBIN: Unpacked = OnceLock::new();
    unpack(&CUBIN, include_bytes!("../ptx/kernels_sm80.cubin.zst"), "sm_80 cubin")
}

/// The sm_90a module (the same kernels plus the Hopper ones: wgmma, bulk tensor copies) assembled for
/// sm_90a (compute capability 9.0 only). Its PTX is not shipped: it would run nowhere else.
pub fn cubin_sm90() -> Result<&'static [u8], String> {
    static CUBIN: Unpacked = OnceLock::new();
    unpack(&CUBIN, include_bytes!("../ptx/kernels_sm90.cubin.zst"), "sm_90a cubin")
}
