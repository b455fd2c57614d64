//! The README's Rust examples, each inside a function with the inputs it names, so that they compile
//! against the library as it is; `readme_examples_are_these` checks that every ```rust block of README.md
//! appears here line for line (leading spaces aside), so neither side can drift. The examples that need
//! no GPU run on the CPU (on random inputs, printed seed) and their outputs are checked for shape and
//! finiteness; the raw layer's example is compiled only (its views are CUDA memory).

#[path = "common/mod.rs"]
mod common;

use flash_attn::Result;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

fn random(rng: &mut StdRng, shape: &[usize]) -> Vec<f32> {
    (0..shape.iter().product::<usize>()).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn tensor(rng: &mut StdRng, shape: &[usize]) -> flash_attn::Tensor {
    flash_attn::Tensor::from_f32(&random(rng, shape), shape, flash_attn::DType::BF16).unwrap()
}

fn finite(t: &flash_attn::Tensor) -> bool {
    t.to_f32_vec().unwrap().iter().all(|x| x.is_finite())
}

/// README, "Use": dense and packed forward (the first `o` is shadowed, as in the README).
#[allow(unused_variables)]
fn use_dense_and_varlen(rng: &mut StdRng) -> Result<()> {
    let (b, s, hq, hk, d) = (2, 9, 4, 2, 64);
    let q_values = random(rng, &[b, s, hq, d]);
    let (k, v) = (tensor(rng, &[b, s, hk, d]), tensor(rng, &[b, s, hk, d]));
    let (cu_q, cu_k) = (Tensor::from_i32(vec![0, 5, 12], &[3])?, Tensor::from_i32(vec![0, 7, 10], &[3])?);
    let (max_q, max_k) = (7, 7);
    let (q_packed, k_packed, v_packed) = (tensor(rng, &[12, hq, d]), tensor(rng, &[10, hk, d]), tensor(rng, &[10, hk, d]));

    use flash_attn::{fwd, varlen_fwd, AttnOptions, DType, Device, Tensor, Varlen};

    let q = Tensor::from_f32(&q_values, &[b, s, hq, d], DType::BF16)?.to_device(Device::best())?;
    let o = fwd(&q, &k, &v, &AttnOptions { causal: true, ..Default::default() })?;
    // o.out: [B, Sq, Hq, D] in q's dtype; o.lse: f32 [B, Hq, Sq] (natural log)

    let varlen = Varlen { cu_seqlens_q: &cu_q, cu_seqlens_k: &cu_k, max_seqlen_q: Some(max_q),
                          max_seqlen_k: Some(max_k), seqused_q: None, seqused_k: None };
    let o = varlen_fwd(&q_packed, &k_packed, &v_packed, &varlen, &AttnOptions::default())?;
    // o.out: [Tq, Hq, D]; o.lse: [Hq, Tq]

    assert_eq!((o.out.shape(), o.lse.shape()), (&[12, hq, d][..], &[hq, 12][..]));
    assert!(finite(&o.out));
    Ok(())
}

/// README: ALiBi, dropout and the probabilities, forward and backward.
fn alibi_dropout(rng: &mut StdRng) -> Result<()> {
    let (b, s, hq, hk, d) = (2, 11, 4, 2, 32);
    let (q, k, v, dout) = (tensor(rng, &[b, s, hq, d]), tensor(rng, &[b, s, hk, d]), tensor(rng, &[b, s, hk, d]), tensor(rng, &[b, s, hq, d]));
    let slopes = flash_attn::Tensor::from_f32(&[0.5, 0.25, 0.125, 0.0625], &[hq], flash_attn::DType::F32)?;
    let (seed, offset) = (rng.next_u64(), 0);

    use flash_attn::{bwd_with, fwd_with, AttnOptions, Dropout, Extras};

    let opts = AttnOptions { causal: true, dropout: Dropout { p: 0.1, seed, offset }, ..Default::default() };
    let extras = Extras { alibi_slopes: Some(&slopes) /* f32 [Hq] or [B, Hq] */, return_attn_probs: true };
    let o = fwd_with(&q, &k, &v, &extras, &opts)?;      // o.s_dmask: f32 [B, Hq, Sq, Sk]
    let g = bwd_with(&dout, &q, &k, &v, &o.out, &o.lse, &extras, &opts, false)?;  // the same mask

    assert_eq!(o.s_dmask.as_ref().map(|m| m.shape().to_vec()), Some(vec![b, hq, s, s]));
    assert!(finite(&g.dq) && finite(&g.dk) && finite(&g.dv));
    Ok(())
}

/// README: paged K/V, the KV-cache forward and the combine (each `o` shadows the last, as in the README).
#[allow(unused_variables)]
fn paged_kvcache_combine(rng: &mut StdRng) -> Result<()> {
    use flash_attn::{AttnOptions, DType, Tensor};
    let (hq, hk, d, page) = (4, 2, 64, 4);
    let cu_q = Tensor::from_i32(vec![0, 3, 5], &[3])?;
    let seqused_k = Tensor::from_i32(vec![6, 8], &[2])?;
    let block_table = Tensor::from_i32(vec![2, 0, 4, 1, 3, 0], &[2, 3])?;
    let (q_packed, k_pages, v_pages) = (tensor(rng, &[5, hq, d]), tensor(rng, &[5, page, hk, d]), tensor(rng, &[5, page, hk, d]));
    let (b, s_cache, s_new, rot) = (2, 16, 2, 32);
    let q = tensor(rng, &[b, s_new, hq, d]);
    let (mut k_cache, mut v_cache) = (tensor(rng, &[b, s_cache, hk, d]), tensor(rng, &[b, s_cache, hk, d]));
    let (k_new, v_new) = (tensor(rng, &[b, s_new, hk, d]), tensor(rng, &[b, s_new, hk, d]));
    let angles: Vec<f32> = (0..s_cache * rot / 2).map(|i| (i / (rot / 2)) as f32 * 0.5f32.powi((i % (rot / 2)) as i32)).collect();
    let cos = Tensor::from_f32(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), &[s_cache, rot / 2], DType::F32)?;
    let sin = Tensor::from_f32(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), &[s_cache, rot / 2], DType::F32)?;
    let cache_seqlens = Tensor::from_i32(vec![5, 9], &[b])?;
    let partial_out = tensor(rng, &[3, b, s_new, hq, d]);
    let partial_lse = Tensor::from_f32(&random(rng, &[3, b, hq, s_new]), &[3, b, hq, s_new], DType::F32)?;

    use flash_attn::{combine, fwd_kvcache, varlen_fwd_paged, KvCache, KvCacheOptions, PagedVarlen};

    // Packed q over k, v in pages [num_blocks, page_size, Hk, D] (any page size >= 1): key t of sequence b is
    // row t % page_size of block block_table[b][t / page_size]; key counts from cu_seqlens_k or seqused_k.
    let paged = PagedVarlen { cu_seqlens_q: &cu_q, cu_seqlens_k: None, max_seqlen_q: None, max_seqlen_k: None,
                              seqused_q: None, seqused_k: Some(&seqused_k), block_table: &block_table };
    let o = varlen_fwd_paged(&q_packed, &k_pages, &v_pages, &paged, &AttnOptions::default())?;

    // flash_attn_with_kvcache: append k_new / v_new at cache_seqlens[b].. (in place: the caches are &mut),
    // rotate q and k_new (rotary_cos / rotary_sin [S_ro, rotary_dim / 2]), attend over each row's
    // cache_seqlens - cache_leftpad + S_new keys. Caches [B_cache, S_cache, Hk, D], or paged with block_table.
    let cache = KvCache { k_new: Some(&k_new), v_new: Some(&v_new), rotary_cos: Some(&cos), rotary_sin: Some(&sin),
                          ..KvCache::new(&cache_seqlens) };
    let kv = KvCacheOptions { rotary_interleaved: false, num_splits: 0 };   // 0 = heuristic
    let o = fwd_kvcache(&q, &mut k_cache, &mut v_cache, &cache, &AttnOptions { causal: true, ..Default::default() }, &kv)?;

    // Merge partial results over disjoint keys (split-KV, context parallelism): the exact log-sum-exp merge.
    let o = combine(&partial_out /* [n, B, Sq, H, D] */, &partial_lse /* f32 [n, B, H, Sq] */)?;

    assert_eq!((o.out.shape(), o.lse.shape()), (&[b, s_new, hq, d][..], &[b, hq, s_new][..]));
    assert!(finite(&o.out));
    Ok(())
}

/// README, "Embedding": the raw layer on the caller's CUDA memory and stream (compiled, not run).
#[allow(dead_code, clippy::too_many_arguments)]
unsafe fn raw_layer(b: usize, s: usize, h: usize, d: usize, q_ptr: u64, k_ptr: u64, v_ptr: u64, out_ptr: u64, lse_ptr: u64, my_stream: u64) -> Result<usize> {
    use flash_attn::raw::{self, BwdViews, FwdViews, Workspace};
    use flash_attn::{AttnOptions, DType, Target, View};

    let (shape, strides) = ([b, s, h, d], [s * h * d, h * d, d, 1]);     // any strides, head dim contiguous
    let (lse_shape, lse_strides) = ([b, h, s], [h * s, s, 1]);           // contiguous f32
    let view = |addr| View { addr, dtype: DType::BF16, shape: &shape, strides: &strides };
    let t = FwdViews { q: view(q_ptr), k: view(k_ptr), v: view(v_ptr), out: view(out_ptr),
                       lse: View { addr: lse_ptr, dtype: DType::F32, shape: &lse_shape, strides: &lse_strides },
                       alibi_slopes: None, s_dmask: None };
    let target = Target::Cuda { ordinal: 0, stream: my_stream as usize };  // a CUstream; 0 legacy, 2 per-thread
    unsafe { raw::fwd(&t, &AttnOptions { causal: true, ..Default::default() }, target)? };
    // Backward: dq, dk, dv are yours too, and so is the scratch memory (256-byte aligned):
    let bytes = raw::bwd_workspace_bytes(&shape, /* deterministic */ false)?;

    let _: Option<(BwdViews<'_>, Workspace)> = None;
    Ok(bytes)
}

/// README, candle: the drop-in import.
#[cfg(feature = "candle")]
fn candle_drop_in(rng: &mut StdRng) -> candle_core::Result<()> {
    let (b, s, h, d) = (1, 7, 2, 64);
    let make = |rng: &mut StdRng| candle_core::Tensor::from_vec(random(rng, &[b, s, h, d]), (b, s, h, d), &candle_core::Device::Cpu)?.to_dtype(candle_core::DType::BF16);
    let (q, k, v) = (make(rng)?, make(rng)?, make(rng)?);

    // use candle_flash_attn::flash_attn;
    use flash_attn::candle::flash_attn;
    let out = flash_attn(&q, &k, &v, 1.0 / (d as f32).sqrt(), /* causal */ true)?;

    assert_eq!(out.dims(), &[b, s, h, d]);
    Ok(())
}

#[test]
fn readme_examples_run() {
    let (_, mut rng) = common::seeded("readme_examples_run");
    use_dense_and_varlen(&mut rng).unwrap();
    alibi_dropout(&mut rng).unwrap();
    paged_kvcache_combine(&mut rng).unwrap();
    #[cfg(feature = "candle")]
    candle_drop_in(&mut rng).unwrap();
}

/// Every ```rust block of README.md appears in this file line for line (leading spaces aside).
#[test]
fn readme_examples_are_these() {
    let readme = include_str!("../README.md");
    let here: Vec<&str> = include_str!("readme.rs").lines().map(str::trim).collect();
    let mut blocks = 0;
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```rust" {
            continue;
        }
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").map(str::trim).filter(|l| !l.is_empty()).collect();
        blocks += 1;
        let nonempty: Vec<&str> = here.iter().copied().filter(|l| !l.is_empty()).collect();
        let found = nonempty.windows(block.len()).any(|w| w == block.as_slice());
        assert!(found, "README's rust block {blocks} is not in tests/readme.rs (update both):\n{}", block.join("\n"));
    }
    assert_eq!(blocks, 5, "README's rust blocks: update readme_examples_are_these's count and this file");
}
