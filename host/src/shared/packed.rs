//! The format of the shipped kernel modules (`host/ptx/*.zst`), shared by the writer (`cargo xtask
//! ship-ptx`, xtask/src/main.rs's `pack_chunks`, which includes this file by path) and the reader
//! (host/src/ptx.rs): a zstd skippable frame whose payload is the frame count n, then each frame's
//! compressed and raw length, all little-endian u32; then the n zstd frames, one per `FRAME_BYTES` of the
//! module. Any zstd decoder reads the file as the whole module (it skips the index); the index lets the
//! library decompress the frames in parallel. Not compiled for the kernels.

/// The magic of the skippable frame that leads each shipped module.
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// Raw bytes per frame (the last may hold fewer); the reader refuses larger frames, so a damaged index
/// cannot ask for more memory.
pub const FRAME_BYTES: usize = 1 << 20;

/// The skippable frame indexing frames of `(compressed, raw)` lengths.
pub fn index(frames: &[(usize, usize)]) -> Vec<u8> {
    let mut words = vec![frames.len() as u32];
    for &(c, r) in frames {
        words.extend([c as u32, r as u32]);
    }
    let mut out = Vec::with_capacity(8 + 4 * words.len());
    out.extend(SKIPPABLE_MAGIC.to_le_bytes());
    out.extend((4 * words.len() as u32).to_le_bytes());
    out.extend(words.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// (compressed, raw) frames of `packed` per its index; None where the index is malformed.
pub fn frames(packed: &[u8]) -> Option<Vec<(&[u8], usize)>> {
    let word = |at: usize| Some(u32::from_le_bytes(packed.get(at..at + 4)?.try_into().ok()?) as usize);
    if word(0)? != SKIPPABLE_MAGIC as usize {
        return None;
    }
    let (len, n) = (word(4)?, word(8)?);
    if n > packed.len() || len != 4 + 8 * n {
        return None;
    }
    let mut at = 8 + len;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (c, r) = (word(12 + 8 * i)?, word(16 + 8 * i)?);
        if r > FRAME_BYTES {
            return None;
        }
        out.push((packed.get(at..at.checked_add(c)?)?, r));
        at += c;
    }
    (at == packed.len()).then_some(out)
}
