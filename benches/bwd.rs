//! Backward benchmarks on the GPU, on benches/fwd.rs's shapes (same names): `bwd` alone, given `out` and
//! `lse` from one `fwd` call, and `fwd` + `bwd` as a training step runs them; `varlen_bwd` likewise on the
//! ragged batch. CUDA events through criterion's `iter_custom`; each shape prints
//! `RESULT ours-bwd <shape> <median ms> <TFLOP/s>` and `RESULT ours-fwdbwd ...` for benches/compare.py.
//! FLOPs, flash-attn's convention: backward 2.5x the forward's (5 matmuls to its 2), fwd + bwd 3.5x.
//! A shape whose backward returns an error (not implemented on CUDA yet, too little shared memory)
//! prints `SKIPPED <shape>: <error>` and the run goes on. Skips with a notice when there is no GPU.
//! The score modifiers' rows (`mods/...`, benches/fwd.rs's): without, with ALiBi, with dropout (p = 0.1).
//! Filter shapes with FA_BENCH_FILTER=substring; FA_BENCH_DETERMINISTIC=1 times the deterministic
//! backward (default: not, like PyTorch's default).

mod common;

use common::{alibi_slopes, bench, cu_seqlens, dense_name, dense_shapes, device_tensor, fwd_flops, mods_name, mods_shapes, ragged_lengths, selected, skewed_lengths, varlen_name, MODS, MODS_DROPOUT, RAGGED_D, RAGGED_H};
use flash_attn::{bwd, bwd_with, cuda, fwd, fwd_with, varlen_bwd, varlen_fwd, AttnOptions, Dropout, Extras, FwdOutput, Result, Varlen};
use std::hint::black_box;

const BWD_FLOPS: f64 = 2.5;
const FWDBWD_FLOPS: f64 = 3.5;

/// Times `bwd_only` (given the forward's output) and `fwd_bwd` for one shape, after one untimed call of
/// each that also checks they work here.
fn bench_shape(
    c: &mut criterion::Criterion,
    name: &str,
    fwd_flops: f64,
    fwd: impl Fn() -> Result<FwdOutput>,
    bwd: impl Fn(&FwdOutput) -> Result<()>,
) {
    if !selected(name) {
        return;
    }
    let o = match fwd().and_then(|o| bwd(&o).map(|()| o)) {
        Ok(o) => o,
        Err(e) => {
            println!("SKIPPED {name}: {e}");
            return;
        }
    };
    bench(c, "ours-bwd", name, BWD_FLOPS * fwd_flops, || bwd(&o));
    bench(c, "ours-fwdbwd", name, FWDBWD_FLOPS * fwd_flops, || bwd(&fwd()?));
}

fn main() {
    if !cuda::available() {
        println!("SKIPPED bwd benches: no CUDA GPU on this machine");
        return;
    }
    println!("device: {}", cuda::device_name(0).unwrap());
    let deterministic = std::env::var("FA_BENCH_DETERMINISTIC").is_ok_and(|v| v == "1");
    println!("deterministic: {deterministic}");
    let mut c = common::criterion();
    for (d, s, b, h) in dense_shapes() {
        let shape = [b, s, h, d];
        let (q, k, v, dout) = (device_tensor(&shape, 1), device_tensor(&shape, 2), device_tensor(&shape, 3), device_tensor(&shape, 7));
        for causal in [false, true] {
            let opts = AttnOptions { causal, ..Default::default() };
            bench_shape(
                &mut c,
                &dense_name(d, s, b, h, causal),
                b as f64 * fwd_flops(h, s, s, d, causal),
                || fwd(&q, &k, &v, &opts),
                |o| bwd(&dout, &q, &k, &v, &o.out, &o.lse, &opts, deterministic).map(|g| drop(black_box(g))),
            );
        }
    }
    for (d, s, b, h) in mods_shapes() {
        if !MODS.iter().any(|m| [false, true].iter().any(|&c| selected(&mods_name(d, s, b, h, c, m)))) {
            continue;
        }
        let shape = [b, s, h, d];
        let (q, k, v, dout) = (device_tensor(&shape, 1), device_tensor(&shape, 2), device_tensor(&shape, 3), device_tensor(&shape, 7));
        let slopes = alibi_slopes(h);
        for causal in [false, true] {
            for m in MODS {
                let extras = Extras { alibi_slopes: (m == "alibi").then_some(&slopes), return_attn_probs: false };
                let dropout = if m.starts_with("dropout") { Dropout { p: MODS_DROPOUT, seed: 0x5eed, offset: 0 } } else { Dropout::default() };
                let opts = AttnOptions { causal, dropout, ..Default::default() };
                bench_shape(
                    &mut c,
                    &mods_name(d, s, b, h, causal, m),
                    b as f64 * fwd_flops(h, s, s, d, causal),
                    || fwd_with(&q, &k, &v, &extras, &opts),
                    |o| bwd_with(&dout, &q, &k, &v, &o.out, &o.lse, &extras, &opts, deterministic).map(|g| drop(black_box(g))),
                );
            }
        }
    }
    let (h, d) = (RAGGED_H, RAGGED_D);
    for (batch, lens) in [("ragged64", ragged_lengths()), ("skewed64", skewed_lengths())] {
        if ![false, true].iter().any(|&c| selected(&varlen_name(batch, c, true)) || selected(&varlen_name(batch, c, false))) {
            continue;
        }
        let total: usize = lens.iter().sum();
        let cu = cu_seqlens(&lens);
        let shape = [total, h, d];
        let (q, k, v, dout) = (device_tensor(&shape, 4), device_tensor(&shape, 5), device_tensor(&shape, 6), device_tensor(&shape, 8));
        let max = *lens.iter().max().unwrap();
        for causal in [false, true] {
            for max_given in [true, false] {
                let m = max_given.then_some(max);
                let varlen = Varlen { cu_seqlens_q: &cu, cu_seqlens_k: &cu, max_seqlen_q: m, max_seqlen_k: m, seqused_q: None, seqused_k: None };
                let opts = AttnOptions { causal, ..Default::default() };
                bench_shape(
                    &mut c,
                    &varlen_name(batch, causal, max_given),
                    lens.iter().map(|&l| fwd_flops(h, l, l, d, causal)).sum(),
                    || varlen_fwd(&q, &k, &v, &varlen, &opts),
                    |o| varlen_bwd(&dout, &q, &k, &v, &o.out, &o.lse, &varlen, &opts, deterministic).map(|g| drop(black_box(g))),
                );
            }
        }
    }
}
