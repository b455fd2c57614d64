//! CPU timing (the CPU path), median of 7: `cargo run --release -p flash-attn --example cpu_bench [case] [bwd|dec]`:
//! the forward, or with `bwd` the backward, or with `dec` a decoding step (one query row against a KV cache, Hq 32
//! / Hk 8, D 128). `FA_CPU_VECTORS=baseline|avx2|avx512` caps the vector variant.
use flash_attn::{bwd, fwd, fwd_kvcache, AttnOptions, DType, KvCache, KvCacheOptions, Tensor};
use std::time::Instant;

fn main() {
    let only: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let backward = std::env::args().any(|a| a == "bwd");
    let decode = std::env::args().any(|a| a == "dec");
    use flash_attn::cpu::{set_vectors, Vectors};
    match std::env::var("FA_CPU_VECTORS").as_deref() {
        Ok("baseline") => set_vectors(Vectors::Baseline),
        Ok("avx2") => set_vectors(Vectors::Avx2),
        Ok("avx512") => set_vectors(Vectors::Avx512),
        _ => {}
    }
    if decode {
        return decode_steps(only);
    }
    let cases = [(1usize, 1024usize, 8usize, 64usize, true), (4, 256, 8, 128, true), (1, 2048, 4, 64, false), (1, 1024, 8, 128, true)];
    for &(b, s, h, d, causal) in cases.iter().enumerate().filter(|(i, _)| only.is_none_or(|o| o == *i)).map(|(_, c)| c) {
        let n = b * s * h * d;
        let mut x = 0x1234_5678u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let data: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| rnd()).collect()).collect();
        let t: Vec<Tensor> = data.iter().map(|v| Tensor::from_f32(v, &[b, s, h, d], DType::BF16).unwrap()).collect();
        let opts = AttnOptions { causal, ..Default::default() };
        let o = fwd(&t[0], &t[1], &t[2], &opts).unwrap();
        let mut times = Vec::new();
        for _ in 0..7 {
            let t0 = Instant::now();
            if backward {
                std::hint::black_box(bwd(&t[0], &t[0], &t[1], &t[2], &o.out, &o.lse, &opts, false).unwrap());
            } else {
                std::hint::black_box(fwd(&t[0], &t[1], &t[2], &opts).unwrap());
            }
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let flops = 4.0 * (b * h * s * s * d) as f64 / if causal { 2.0 } else { 1.0 } * if backward { 2.5 } else { 1.0 };
        let what = if backward { "bwd" } else { "fwd" };
        println!("{what} B{b} S{s} H{h} D{d} causal={causal}: {:.2} ms, {:.1} GFLOP/s", times[3], flops / times[3] / 1e6);
    }
}

/// `dec`: a decoding step of batch b against `sk` cached keys.
fn decode_steps(only: Option<usize>) {
    let cases = [(1usize, 1024usize), (1, 16384), (4, 4096)];
    let (hq, hk, d) = (32, 8, 128);
    for &(b, sk) in cases.iter().enumerate().filter(|(i, _)| only.is_none_or(|o| o == *i)).map(|(_, c)| c) {
        let mut x = 0x1234_5678u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        };
        let q = Tensor::from_f32(&rnd(b * hq * d), &[b, 1, hq, d], DType::BF16).unwrap();
        let mut kc = Tensor::from_f32(&rnd(b * sk * hk * d), &[b, sk, hk, d], DType::BF16).unwrap();
        let mut vc = Tensor::from_f32(&rnd(b * sk * hk * d), &[b, sk, hk, d], DType::BF16).unwrap();
        let lens = Tensor::from_i32(vec![sk as i32; b], &[b]).unwrap();
        let step = |kc: &mut Tensor, vc: &mut Tensor| fwd_kvcache(&q, kc, vc, &KvCache::new(&lens), &AttnOptions::default(), &KvCacheOptions::default()).unwrap();
        step(&mut kc, &mut vc);
        let mut times = Vec::new();
        for _ in 0..7 {
            let t0 = Instant::now();
            std::hint::black_box(step(&mut kc, &mut vc));
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let bytes = (2 * b * sk * hk * d * 2) as f64;
        println!("dec B{b} Sk{sk} H{hq}/{hk} D{d}: {:.3} ms, {:.1} GB/s of K/V", times[3], bytes / times[3] / 1e6);
    }
}
