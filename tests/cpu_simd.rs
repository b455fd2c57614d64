//! The CPU path's vector variants (`flash_attn::cpu::set_vectors`: the baseline build, AVX2, AVX-512F) give
//! the same bits: forward (out, lse, s_dmask), backward (dq, dk, dv) and the KV cache, on random problems over
//! every head dim, causal or not, windows, softcap, ALiBi, dropout, GQA, f16 and bf16. The baseline is what
//! CPUs without AVX2 and other architectures run, which no other test runs on a machine that has AVX2.
//! One test in its own binary: the setting is process-wide.

#[path = "common/mod.rs"]
mod common;

use common::*;
use flash_attn::cpu::{set_vectors, Vectors};
use flash_attn::{bwd_with, fwd_kvcache, fwd_with, AttnOptions, DType, Dropout, Extras, KvCache, KvCacheOptions, Tensor};
use rand::Rng;

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Every output of one random problem, as bits.
fn outputs(case: &Case) -> Vec<Vec<u32>> {
    let Case { q, k, v, dout, slopes, opts, cache } = case;
    let extras = Extras { alibi_slopes: slopes.as_ref(), return_attn_probs: true };
    let o = fwd_with(q, k, v, &extras, opts).unwrap();
    let g = bwd_with(dout, q, k, v, &o.out, &o.lse, &extras, opts, false).unwrap();
    let mut all = vec![bits(&o.out), bits(&o.lse), bits(o.s_dmask.as_ref().unwrap()), bits(&g.dq), bits(&g.dk), bits(&g.dv)];
    if let Some((seqlens, splits)) = cache {
        // The caches are k and v (copies: nothing is appended, but the call takes them mutably).
        let (mut kc, mut vc) = (k.clone(), v.clone());
        let mut plain = *opts;
        plain.dropout = Dropout::default();
        let r = fwd_kvcache(q, &mut kc, &mut vc, &KvCache::new(seqlens), &plain, &KvCacheOptions { num_splits: *splits, ..Default::default() }).unwrap();
        all.extend([bits(&r.out), bits(&r.lse)]);
    }
    all
}

struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    slopes: Option<Tensor>,
    opts: AttnOptions,
    cache: Option<(Tensor, usize)>,
}

#[test]
fn vector_variants_give_the_same_bits() {
    let (seed, mut r) = seeded("vector_variants_give_the_same_bits");
    let mut checked = 0;
    for n in 0..24 {
        let d = [32, 64, 96, 128, 192, 256][n % 6];
        let dtype = if r.gen_bool(0.5) { DType::BF16 } else { DType::F16 };
        let (b, hk) = (r.gen_range(1..=2), r.gen_range(1..=2));
        let hq = hk * r.gen_range(1..=2);
        let (sq, sk) = (r.gen_range(1..=150), r.gen_range(1..=150));
        let causal = r.gen_bool(0.5);
        let window = if r.gen_bool(0.3) { (r.gen_range(0..40) as i64, r.gen_range(0..40) as i64) } else { (-1, -1) };
        let softcap = if r.gen_bool(0.3) { 5.0 } else { 0.0 };
        let dropout = if r.gen_bool(0.3) { Dropout { p: 0.2, seed: r.r#gen(), offset: r.gen_range(0..1000) } } else { Dropout::default() };
        let opts = AttnOptions { causal, window, softcap, dropout, ..Default::default() };
        let values = |r: &mut rand::rngs::StdRng, shape: &[usize]| {
            let n: usize = shape.iter().product();
            Tensor::from_f32(&random_values(r, n, 2.0, dtype), shape, dtype).unwrap()
        };
        let q = values(&mut r, &[b, sq, hq, d]);
        let k = values(&mut r, &[b, sk, hk, d]);
        let v = values(&mut r, &[b, sk, hk, d]);
        let dout = values(&mut r, &[b, sq, hq, d]);
        let slopes = r.gen_bool(0.3).then(|| Tensor::from_f32(&random_values(&mut r, hq, 0.5, DType::F32), &[hq], DType::F32).unwrap());
        let cache = (slopes.is_none() && r.gen_bool(0.5)).then(|| {
            let lens: Vec<i32> = (0..b).map(|_| r.gen_range(0..=sk) as i32).collect();
            (Tensor::from_i32(lens, &[b]).unwrap(), r.gen_range(1..=3))
        });
        let case = Case { q, k, v, dout, slopes, opts, cache };
        set_vectors(Vectors::Baseline);
        let want = outputs(&case);
        for level in [Vectors::Avx2, Vectors::Avx512, Vectors::Auto] {
            set_vectors(level);
            let got = outputs(&case);
            for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                assert!(a == w, "seed {seed}, case {n} (D {d}, {dtype:?}, B {b}, Sq {sq}, Sk {sk}, H {hq}/{hk}, {opts:?}): output {i} differs between {level:?} and Baseline");
            }
        }
        checked += 1;
    }
    set_vectors(Vectors::Auto);
    eprintln!("{checked} problems: the same bits under Baseline, Avx2, Avx512 and Auto");
}
