//! Forward benchmarks on the GPU: `fwd` over the comparison table's shapes (hdim 64/128/256, S 512..16384
//! at 16k tokens per batch, causal and not, bf16) and `varlen_fwd` on a ragged batch, timed with CUDA
//! events through criterion's `iter_custom`. Besides criterion's report, each shape prints one line
//! `RESULT ours <shape> <median ms> <TFLOP/s>` that benches/compare.py joins with PyTorch's numbers.
//! Skips with a notice when there is no GPU. FLOPs: 4 * B * H * Sq * Sk * D, halved for causal.
//! The ragged batch also runs over paged K/V (`varlen_fwd_paged`: pages of 16, 64 and 256 rows, or
//! `FA_BENCH_PAGES=8,32`; each sequence's pages scattered over the pool), named `paged/...`, to set
//! against the contiguous row.
//! The score modifiers (`mods/...`): hdim 64, 96, 128, 192 and 256 at S 2048 and 8192, causal and not, each without
//! modifiers, with ALiBi (slopes `[H]`) and with dropout (p = 0.1), the same FLOPs counted for all three.
//! The ragged batch and a skewed one (`skewed64`: one sequence of 16384 tokens, 63 of 256) also run without
//! max_seqlen (`/nomax`: scheduled by the mean length).
//! Filter shapes with FA_BENCH_FILTER=substring. FA_BENCH_RAW=1: the dense rows through `raw::fwd` into
//! outputs allocated once (the `Tensor` API allocates out and lse in every call).

mod common;

use common::{alibi_slopes, bench, cu_seqlens, dense_name, dense_shapes, device_tensor, fwd_flops, mods_name, mods_shapes, ragged_lengths, selected, skewed_lengths, varlen_name, MODS, MODS_DROPOUT, RAGGED_D, RAGGED_H};
use flash_attn::raw::{self, FwdViews};
use flash_attn::{cuda, fwd, fwd_with, varlen_fwd, varlen_fwd_paged, AttnOptions, DType, Device, Dropout, Extras, PagedVarlen, Target, Tensor, Varlen};

fn main() {
    if !cuda::available() {
        println!("SKIPPED fwd benches: no CUDA GPU on this machine");
        return;
    }
    println!("device: {}", cuda::device_name(0).unwrap());
    let mut c = common::criterion();
    // FA_BENCH_RAW: the dense rows through the raw layer into out and lse allocated once (as a framework
    // calls it), instead of the `Tensor` API, which allocates both per call.
    let raw_layer = std::env::var_os("FA_BENCH_RAW").is_some();
    for (d, s, b, h) in dense_shapes() {
        let (q, k, v) = (device_tensor(&[b, s, h, d], 1), device_tensor(&[b, s, h, d], 2), device_tensor(&[b, s, h, d], 3));
        for causal in [false, true] {
            let opts = AttnOptions { causal, ..Default::default() };
            let (name, flops) = (dense_name(d, s, b, h, causal), b as f64 * fwd_flops(h, s, s, d, causal));
            if !raw_layer {
                bench(&mut c, "ours", &name, flops, || fwd(&q, &k, &v, &opts).map(|o| drop(std::hint::black_box(o))));
            } else if selected(&name) {
                let mut out = device_tensor(&[b, s, h, d], 4);
                let mut lse = Tensor::zeros(&[b, h, s], DType::F32, Device::Cuda(0)).unwrap();
                let views = FwdViews { q: q.view(), k: k.view(), v: v.view(), out: out.view_mut(), lse: lse.view_mut(), alibi_slopes: None, s_dmask: None };
                // The legacy default stream, which the `Tensor` API and the timing events use.
                let target = Target::Cuda { ordinal: 0, stream: 0 };
                // SAFETY: every view is a live device tensor of its shape, out and lse written by this call only.
                bench(&mut c, "ours", &name, flops, || unsafe { raw::fwd(&views, &opts, target) });
            }
        }
    }
    for (d, s, b, h) in mods_shapes() {
        if !MODS.iter().any(|m| [false, true].iter().any(|&c| selected(&mods_name(d, s, b, h, c, m)))) {
            continue;
        }
        let (q, k, v) = (device_tensor(&[b, s, h, d], 1), device_tensor(&[b, s, h, d], 2), device_tensor(&[b, s, h, d], 3));
        let slopes = alibi_slopes(h);
        for causal in [false, true] {
            for m in MODS {
                let extras = Extras { alibi_slopes: (m == "alibi").then_some(&slopes), return_attn_probs: false };
                let dropout = if m.starts_with("dropout") { Dropout { p: MODS_DROPOUT, seed: 0x5eed, offset: 0 } } else { Dropout::default() };
                let opts = AttnOptions { causal, dropout, ..Default::default() };
                bench(&mut c, "ours", &mods_name(d, s, b, h, causal, m), b as f64 * fwd_flops(h, s, s, d, causal), || {
                    fwd_with(&q, &k, &v, &extras, &opts).map(|o| drop(std::hint::black_box(o)))
                });
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
        let (q, k, v) = (device_tensor(&[total, h, d], 4), device_tensor(&[total, h, d], 5), device_tensor(&[total, h, d], 6));
        let max = *lens.iter().max().unwrap();
        for causal in [false, true] {
            let flops: f64 = lens.iter().map(|&l| fwd_flops(h, l, l, d, causal)).sum();
            for max_given in [true, false] {
                let m = max_given.then_some(max);
                let varlen = Varlen { cu_seqlens_q: &cu, cu_seqlens_k: &cu, max_seqlen_q: m, max_seqlen_k: m, seqused_q: None, seqused_k: None };
                let opts = AttnOptions { causal, ..Default::default() };
                bench(&mut c, "ours", &varlen_name(batch, causal, max_given), flops, || varlen_fwd(&q, &k, &v, &varlen, &opts).map(|o| drop(std::hint::black_box(o))));
            }
        }
    }
    let lens = ragged_lengths();
    let total: usize = lens.iter().sum();
    let cu = cu_seqlens(&lens);
    let q = device_tensor(&[total, h, d], 4);
    let max = *lens.iter().max().unwrap();
    // `FA_BENCH_PAGES=16,32`: other page sizes than these.
    let pages: Vec<usize> = std::env::var("FA_BENCH_PAGES").ok().map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).filter(|&x| x > 0).collect()).unwrap_or_else(|| vec![16, 64, 256]);
    for page in pages {
        let max_blocks = max.div_ceil(page);
        let blocks: usize = lens.iter().map(|l| l.div_ceil(page)).sum::<usize>() + 7;
        // Sequence b's i-th page: a fixed scatter over the pool (stride coprime with its size);
        // `FA_BENCH_PAGE_STRIDE=1` lays the pages out in order (the contiguous rows' layout).
        let scatter = (1..).map(|s| 2 * s + 1).find(|s| gcd(*s, blocks) == 1).unwrap();
        let stride = std::env::var("FA_BENCH_PAGE_STRIDE").ok().and_then(|s| s.parse::<usize>().ok()).filter(|s| gcd(*s, blocks) == 1).unwrap_or(scatter);
        let mut next = 0;
        let mut table = vec![0i32; lens.len() * max_blocks];
        for (b, l) in lens.iter().enumerate() {
            for i in 0..l.div_ceil(page) {
                table[b * max_blocks + i] = ((next * stride) % blocks) as i32;
                next += 1;
            }
        }
        let table = Tensor::from_i32(table, &[lens.len(), max_blocks]).unwrap().to_device(Device::Cuda(0)).unwrap();
        let (kp, vp) = (device_tensor(&[blocks, page, h, d], 7), device_tensor(&[blocks, page, h, d], 8));
        for causal in [false, true] {
            let flops: f64 = lens.iter().map(|&l| fwd_flops(h, l, l, d, causal)).sum();
            let paged = PagedVarlen { cu_seqlens_q: &cu, cu_seqlens_k: Some(&cu), max_seqlen_q: Some(max), max_seqlen_k: Some(max), seqused_q: None, seqused_k: None, block_table: &table };
            let opts = AttnOptions { causal, ..Default::default() };
            let name = format!("paged/hdim{d}/ragged64/page{page}/h{h}/causal{}", causal as u8);
            bench(&mut c, "ours", &name, flops, || varlen_fwd_paged(&q, &kp, &vp, &paged, &opts).map(|o| drop(std::hint::black_box(o))));
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}
