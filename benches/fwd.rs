//! Forward benchmarks on the GPU: `fwd` over the comparison table's shapes (hdim 64/128/256, S 512..16384
//! at 16k tokens per batch, causal and not, bf16) and `varlen_fwd` on a ragged batch, timed with CUDA
//! events through criterion's `iter_custom`. Besides criterion's report, each shape prints one line
//! `RESULT ours <shape> <median ms> <TFLOP/s>` that benches/compare.py joins with PyTorch's numbers.
//! Skips with a notice when there is no GPU. FLOPs: 4 * B * H * Sq * Sk * D, halved for causal.
//! Filter shapes with FA_BENCH_FILTER=substring.

use criterion::Criterion;
use flash_attn::{cuda, fwd, varlen_fwd, AttnOptions, DType, Device, Tensor, Varlen};
use std::sync::Mutex;
use std::time::Duration;

/// The ragged batch: 64 sequences from 64 to 4096 tokens (a fixed pseudo-random draw, so every run and
/// PyTorch's side use the same lengths).
pub fn ragged_lengths() -> Vec<usize> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            64 + (x % (4096 - 64 + 1)) as usize
        })
        .collect()
}

fn random_bf16(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn device_tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&random_bf16(n, seed), shape, DType::BF16).unwrap().to_device(Device::Cuda(0)).unwrap()
}

static SAMPLES: Mutex<Vec<f64>> = Mutex::new(Vec::new());

/// Time `f` with criterion (CUDA events per sample) and print the RESULT line from the median sample.
fn bench(c: &mut Criterion, name: &str, flops: f64, mut f: impl FnMut()) {
    if std::env::var("FA_BENCH_FILTER").is_ok_and(|filter| !name.contains(&filter)) {
        return;
    }
    SAMPLES.lock().unwrap().clear();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let ms = cuda::time_ms(0, || {
                for _ in 0..iters {
                    f();
                }
                Ok(())
            })
            .unwrap();
            SAMPLES.lock().unwrap().push(ms as f64 / iters as f64);
            Duration::from_secs_f64(ms as f64 / 1e3)
        })
    });
    let mut s = SAMPLES.lock().unwrap().clone();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = s[s.len() / 2];
    println!("RESULT ours {name} {median:.4} {:.1}", flops / (median * 1e-3) / 1e12);
}

fn main() {
    if !cuda::available() {
        println!("SKIPPED fwd benches: no CUDA GPU on this machine");
        return;
    }
    println!("device: {}", cuda::device_name(0).unwrap());
    let mut c = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_millis(1200)).sample_size(10).configure_from_args();
    let tokens = 16384;
    for d in [64usize, 128, 256] {
        let h = 2048 / d;
        for s in [512usize, 2048, 8192, 16384] {
            let b = tokens / s;
            let (q, k, v) = (device_tensor(&[b, s, h, d], 1), device_tensor(&[b, s, h, d], 2), device_tensor(&[b, s, h, d], 3));
            for causal in [false, true] {
                let flops = 4.0 * (b * h * s * s * d) as f64 / if causal { 2.0 } else { 1.0 };
                let opts = AttnOptions { causal, ..Default::default() };
                bench(&mut c, &format!("fwd/hdim{d}/s{s}/b{b}/h{h}/causal{}", causal as u8), flops, || {
                    std::hint::black_box(fwd(&q, &k, &v, &opts).unwrap());
                });
            }
        }
    }
    let lens = ragged_lengths();
    let (h, d) = (16usize, 128usize);
    let total: usize = lens.iter().sum();
    let cu: Vec<i32> = std::iter::once(0).chain(lens.iter().scan(0i32, |a, &l| {
        *a += l as i32;
        Some(*a)
    })).collect();
    let cu_t = Tensor::from_i32(cu, &[lens.len() + 1]).unwrap().to_device(Device::Cuda(0)).unwrap();
    let (q, k, v) = (device_tensor(&[total, h, d], 4), device_tensor(&[total, h, d], 5), device_tensor(&[total, h, d], 6));
    let max = *lens.iter().max().unwrap();
    for causal in [false, true] {
        let flops: f64 = lens.iter().map(|&l| 4.0 * (h * l * l * d) as f64).sum::<f64>() / if causal { 2.0 } else { 1.0 };
        let varlen = Varlen { cu_seqlens_q: &cu_t, cu_seqlens_k: &cu_t, max_seqlen_q: max, max_seqlen_k: max, seqused_q: None, seqused_k: None };
        let opts = AttnOptions { causal, ..Default::default() };
        bench(&mut c, &format!("varlen/hdim{d}/ragged64/h{h}/causal{}", causal as u8), flops, || {
            std::hint::black_box(varlen_fwd(&q, &k, &v, &varlen, &opts).unwrap());
        });
    }
}
