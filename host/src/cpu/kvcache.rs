//! The KV-cache forward on the CPU: append k_new / v_new to the caller's cache in place (k_new rotated
//! to its positions first, then rounded to the cache's dtype), rotate q into a scratch copy (rounded to
//! q's dtype, as the kernels hold it), then the forward over each row's cache entries
//! (`Problem::keys`), split into `num_splits` key ranges whose partial results are merged.

use super::rotary::Rope;
use super::{host_slice, load_rows, scatter, store_row, HostSlice, BLOCK_N};
use crate::error::{Error, Result};
use crate::problem::{num_splits_heuristic, HostKeys, KvCacheProblem, Strides};
use crate::types::{DType, KvCacheViews};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// The forward on host memory: the append into the caller's caches, then out and lse.
///
/// # Safety
/// As `raw::fwd_kvcache` on `Target::Cpu`; `kp.fwd.keys` is filled in.
pub(crate) unsafe fn fwd_kvcache_into(kp: &KvCacheProblem, t: &KvCacheViews<'_>) -> Result<()> {
    let p = &kp.fwd;
    let keys = p.keys.as_ref().ok_or_else(|| Error::Value { arg: "cache_seqlens", msg: "the CPU path needs the host cache lengths".into() })?;
    let rope = match (kp.rotary, &t.rotary_cos, &t.rotary_sin) {
        (Some(rotary), Some(cos), Some(sin)) => Some(unsafe { Rope { rotary, cos: host_slice("rotary_cos", cos)?, sin: host_slice("rotary_sin", sin)? } }),
        _ => None,
    };
    unsafe { append(kp, t, keys, rope.as_ref())? };

    let mut p = p.clone();
    let rotated = match &rope {
        Some(rope) => {
            let q = unsafe { host_slice("q", &t.q)? };
            let (buf, strides) = rotate_q(kp, keys, q, rope);
            p.q = strides;
            Some(buf)
        }
        None => None,
    };
    let q = match &rotated {
        Some(QBuf::F16(x)) => HostSlice::F16(x),
        Some(QBuf::BF16(x)) => HostSlice::BF16(x),
        None => unsafe { host_slice("q", &t.q)? },
    };
    // Read only now: the append above wrote these.
    let (k, v) = unsafe { (host_slice("k_cache", &t.k_cache)?, host_slice("v_cache", &t.v_cache)?) };
    let mods = unsafe { super::score::Mods::read(&p, t.alibi_slopes.as_ref())? };
    unsafe {
        let lse = super::fwd(&p, q, k, v, &mods, splits(kp), &t.out)?;
        scatter(&t.lse, &lse);
    }
    Ok(())
}

/// The split count a CPU call uses: the requested one, or the heuristic over this machine's threads.
pub(crate) fn splits(kp: &KvCacheProblem) -> usize {
    if kp.num_splits > 0 {
        return kp.num_splits;
    }
    let p = &kp.fwd;
    if super::serial(super::call_work(p)) {
        return 1; // one thread runs it (`map_items`): splits would only add their merge
    }
    let tiles = p.batch * p.hk * super::tile::TileRows::tiles(p.seqlen_q, 0, p.hq / p.hk.max(1)).count();
    num_splits_heuristic(tiles, p.seqlen_k.div_ceil(BLOCK_N), rayon::current_num_threads())
}

/// Writes k_new (rotated) and v_new of batch entry b at positions `cache_seqlens[b]..` of its cache row.
///
/// # Safety
/// The caches must be valid host memory for writes, overlapping no input (validated).
unsafe fn append(kp: &KvCacheProblem, t: &KvCacheViews<'_>, keys: &HostKeys, rope: Option<&Rope<'_>>) -> Result<()> {
    let (Some(kn), Some(vn), Some(kst), Some(vst)) = (&t.k_new, &t.v_new, &kp.k_new, &kp.v_new) else { return Ok(()) };
    let p = &kp.fwd;
    let (d, s_new) = (p.head_dim, kp.seqlen_new);
    let (k_new, v_new) = unsafe { (host_slice("k_new", kn)?, host_slice("v_new", vn)?) };
    // Element offset of head 0 of cache position `pos` of batch entry b.
    let entry = |b: usize, pos: usize, st: &Strides| match (p.paged, keys.block_table.as_deref()) {
        (Some(pg), Some(table)) => table[b * pg.max_blocks + pos / pg.page_size] as usize * st.batch + (pos % pg.page_size) * st.row,
        _ => keys.batch[b] * st.batch + pos * st.row,
    };
    let mut row = vec![0.0f32; d];
    for b in 0..p.batch {
        // The row's entries end at cache_seqlens[b] + S_new.
        let pos0 = keys.first[b] + keys.seqlen_k[b] - s_new;
        for i in 0..s_new {
            let pos = pos0 + i;
            for h in 0..p.hk {
                load_rows(k_new, b * kst.batch + i * kst.row + h * kst.head, 0, 1, d, &mut row);
                if let Some(rope) = rope {
                    rope.rotate(&mut row, pos);
                }
                unsafe { store_row(&t.k_cache, entry(b, pos, &p.k) + h * p.k.head, &row) };
                load_rows(v_new, b * vst.batch + i * vst.row + h * vst.head, 0, 1, d, &mut row);
                unsafe { store_row(&t.v_cache, entry(b, pos, &p.v) + h * p.v.head, &row) };
            }
        }
    }
    Ok(())
}

/// q rotated, in q's dtype.
enum QBuf {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// q rotated to its positions (row i of batch entry b at `cache_seqlens[b] + i` with causal or windowed
/// attention, else at `cache_seqlens[b]`), rounded to q's dtype, contiguous `[B, Sq, Hq, D]`; and its
/// strides.
fn rotate_q(kp: &KvCacheProblem, keys: &HostKeys, q: HostSlice<'_>, rope: &Rope<'_>) -> (QBuf, Strides) {
    let p = &kp.fwd;
    let (d, sq, hq) = (p.head_dim, p.seqlen_q, p.hq);
    let mut rotated = vec![0.0f32; p.batch * sq * hq * d];
    for (at, row) in rotated.chunks_exact_mut(d).enumerate() {
        let (b, i, h) = (at / (sq * hq), at / hq % sq, at % hq);
        load_rows(q, b * p.q.batch + i * p.q.row + h * p.q.head, 0, 1, d, row);
        let seqlen = keys.first[b] + keys.seqlen_k[b] - kp.seqlen_new;
        rope.rotate(row, seqlen + if rope.rotary.q_per_row { i } else { 0 });
    }
    let buf = match p.dtype {
        DType::F16 => {
            let mut x = vec![f16::ZERO; rotated.len()];
            x.convert_from_f32_slice(&rotated);
            QBuf::F16(x)
        }
        _ => {
            let mut x = vec![bf16::ZERO; rotated.len()];
            x.convert_from_f32_slice(&rotated);
            QBuf::BF16(x)
        }
    };
    (buf, Strides { batch: sq * hq * d, row: hq * d, head: d })
}
