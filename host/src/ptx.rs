//! The two kernel modules, shipped in the package (`host/ptx/`, zstd-compressed: the `.crate` stays far
//! under crates.io's 10 MB) and decompressed on first use: a dependent crate builds on stable with no
//! nightly and no CUDA. Inside this repository `cargo xtask ptx` rebuilds them from kernels-gpu into
//! `target/ptx/`; the test `shipped_ptx_is_fresh` (tests/ptx_fresh.rs) fails until `cargo xtask ship-ptx`
//! compresses a changed build into `host/ptx/`, so the shipped modules are never stale.

use std::io::Read;
use std::sync::OnceLock;

#[path = "shared/packed.rs"]
#[allow(dead_code)] // `index` is the writer's (xtask)
mod packed;
use packed::frames;

type Unpacked = OnceLock<Result<Vec<u8>, String>>;

/// The shipped module `packed`, decompressed once into `cell`: its frames on up to one thread per core
/// (the 15 MB sm_90a cubin took ~0.1 s on one).
fn unpack(cell: &'static Unpacked, packed: &[u8], what: &str) -> Result<&'static [u8], String> {
    let out = cell.get_or_init(|| unpack_frames(packed).map_err(|e| format!("the shipped {what} does not decompress: {e}")));
    out.as_deref().map_err(Clone::clone)
}

fn unpack_frames(packed: &[u8]) -> Result<Vec<u8>, String> {
    let frames = frames(packed).ok_or("its frame index is malformed")?;
    let mut out = vec![0u8; frames.iter().map(|f| f.1).sum()];
    // Each frame into its own slice of `out`; workers take frames in turn.
    let mut slots = Vec::with_capacity(frames.len());
    let mut rest = &mut out[..];
    for &(c, r) in &frames {
        let (mine, tail) = rest.split_at_mut(r);
        slots.push(std::sync::Mutex::new(Some((c, mine))));
        rest = tail;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(slots.len());
    let decode = || -> Result<(), String> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(slot) = slots.get(i) else { return Ok(()) };
            let Some((c, dst)) = slot.lock().map_err(|_| "a lock was poisoned")?.take() else { continue };
            let mut d = ruzstd::decoding::StreamingDecoder::new(c).map_err(|e| format!("frame {i}: {e}"))?;
            d.read_exact(dst).map_err(|e| format!("frame {i}: {e}"))?;
            if d.read(&mut [0u8; 1]).map_err(|e| format!("frame {i}: {e}"))? != 0 {
                return Err(format!("frame {i} is longer than its index says"));
            }
        }
    };
    std::thread::scope(|s| {
        // A thread the OS will not start leaves its frames to the others (this one included).
        let jobs: Vec<_> = (1..workers).filter_map(|_| std::thread::Builder::new().spawn_scoped(s, decode).ok()).collect();
        let mine = decode();
        jobs.into_iter().map(|j| j.join().unwrap_or_else(|_| Err("a decompression thread panicked".into()))).chain([mine]).collect::<Result<(), String>>()
    })?;
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    const PACKED: &[u8] = include_bytes!("../ptx/kernels_sm80.cubin.zst");

    #[test]
    fn shipped_modules_are_indexed_frames() {
        let f = frames(PACKED).expect("the shipped sm_80 cubin's index");
        assert!(f.len() > 1, "{} frames: nothing to decode in parallel", f.len());
        assert_eq!(unpack_frames(PACKED).unwrap().len(), f.iter().map(|x| x.1).sum::<usize>());
    }

    /// A damaged module is an error, never a panic or a short module.
    #[test]
    fn damaged_modules_are_errors() {
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("no index", PACKED[8..].to_vec()),
            ("truncated", PACKED[..PACKED.len() - 1].to_vec()),
            ("trailing byte", [PACKED, &[0]].concat()),
        ];
        for (what, at, delta) in [("frame count", 8, 1i64), ("a compressed length", 12, -1), ("a raw length", 16, 1), ("a raw length", 16, -1), ("a raw length of 4 GiB", 16, u32::MAX as i64 - (1 << 20))] {
            let mut p = PACKED.to_vec();
            let v = u32::from_le_bytes(p[at..at + 4].try_into().unwrap()) as i64 + delta;
            p[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
            cases.push((what, p));
        }
        for (what, p) in cases {
            match std::panic::catch_unwind(|| unpack_frames(&p)) {
                Ok(Err(_)) => {}
                Ok(Ok(out)) => panic!("{what}: decompressed to {} bytes instead of an error", out.len()),
                Err(_) => panic!("{what}: panicked"),
            }
        }
        // Damaged frame contents (no checksum to catch every one): an error or the module's length,
        // never a panic.
        let raw = unpack_frames(PACKED).unwrap().len();
        for at in [PACKED.len() / 3, PACKED.len() / 2, PACKED.len() - 100] {
            let mut p = PACKED.to_vec();
            p[at..at + 64].iter_mut().for_each(|b| *b ^= 0x5a);
            match std::panic::catch_unwind(|| unpack_frames(&p)) {
                Ok(Err(_)) => {}
                Ok(Ok(out)) => assert_eq!(out.len(), raw, "bytes {at}.. damaged"),
                Err(_) => panic!("bytes {at}.. damaged: panicked"),
            }
        }
    }
}
