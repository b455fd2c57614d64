//! What benches/fwd.rs and benches/bwd.rs share: the shape table and its names (benches/compare.py joins
//! on them, benches/torch_*.py restate them), the score-modifier rows, the ragged batch, random device
//! inputs, and the timing loop that prints the `RESULT` lines.
#![allow(dead_code)]

use criterion::Criterion;
use flash_attn::{cuda, DType, Device, Tensor};
use std::sync::Mutex;
use std::time::Duration;

/// Tokens per batch in the dense table (B = TOKENS / S).
pub const TOKENS: usize = 16384;

/// The dense table: `(head_dim, seqlen, batch, heads)` for hdim 64/96/128/192/256 and S 512..16384, with
/// H = 2048 / D (rounded down: 21 heads at 96, 10 at 192).
pub fn dense_shapes() -> Vec<(usize, usize, usize, usize)> {
    let mut shapes = Vec::new();
    for d in [64usize, 96, 128, 192, 256] {
        for s in [512usize, 2048, 8192, 16384] {
            shapes.push((d, s, TOKENS / s, 2048 / d));
        }
    }
    shapes
}

pub fn dense_name(d: usize, s: usize, b: usize, h: usize, causal: bool) -> String {
    format!("fwd/hdim{d}/s{s}/b{b}/h{h}/causal{}", causal as u8)
}

/// The score-modifier rows: hdim 64, 96, 128, 192 and 256 at S 2048 and 8192 (the dense table's batch and heads),
/// each without modifiers, with ALiBi and with dropout (p = `MODS_DROPOUT`), named `mods_name`.
pub fn mods_shapes() -> Vec<(usize, usize, usize, usize)> {
    dense_shapes().into_iter().filter(|&(d, s, _, _)| matches!(d, 64 | 96 | 128 | 192 | 256) && matches!(s, 2048 | 8192)).collect()
}

/// Dropout probability of the `dropout` rows (flash-attn's typical training value).
pub const MODS_DROPOUT: f32 = 0.1;

/// The modifier variants of `mods_shapes`: none, ALiBi, dropout.
pub const MODS: [&str; 3] = ["none", "alibi", "dropout0.1"];

pub fn mods_name(d: usize, s: usize, b: usize, h: usize, causal: bool, m: &str) -> String {
    format!("mods/hdim{d}/s{s}/b{b}/h{h}/causal{}/{m}", causal as u8)
}

/// f32 ALiBi slopes `[h]` on GPU 0: the geometric sequence 2^(-8 (i + 1) / h) of the ALiBi paper.
pub fn alibi_slopes(h: usize) -> Tensor {
    let v: Vec<f32> = (0..h).map(|i| 2f32.powf(-8.0 * (i + 1) as f32 / h as f32)).collect();
    Tensor::from_f32(&v, &[h], DType::F32).unwrap().to_device(Device::Cuda(0)).unwrap()
}

/// Forward FLOPs of one sequence pair: 4 * H * Sq * Sk * D (two matmuls), halved for causal.
pub fn fwd_flops(h: usize, sq: usize, sk: usize, d: usize, causal: bool) -> f64 {
    4.0 * (h * sq * sk * d) as f64 / if causal { 2.0 } else { 1.0 }
}

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

/// Heads and head dim of the ragged batch.
pub const RAGGED_H: usize = 16;
pub const RAGGED_D: usize = 128;

pub fn ragged_name(causal: bool) -> String {
    format!("varlen/hdim{RAGGED_D}/ragged64/h{RAGGED_H}/causal{}", causal as u8)
}

/// A skewed batch: one sequence of 16384 tokens and 63 of 256 (the mean, 500, far below the longest).
pub fn skewed_lengths() -> Vec<usize> {
    std::iter::once(16384).chain(std::iter::repeat_n(256, 63)).collect()
}

/// The varlen rows: `batch` (`ragged64`, `skewed64`), with max_seqlen given or not (`/nomax`: the kernels
/// schedule by the mean length).
pub fn varlen_name(batch: &str, causal: bool, max_given: bool) -> String {
    format!("varlen/hdim{RAGGED_D}/{batch}/h{RAGGED_H}/causal{}{}", causal as u8, if max_given { "" } else { "/nomax" })
}

/// The ragged batch's int32 `cu_seqlens` on the GPU (the same for q and k).
pub fn cu_seqlens(lens: &[usize]) -> Tensor {
    let cu: Vec<i32> = std::iter::once(0)
        .chain(lens.iter().scan(0i32, |a, &l| {
            *a += l as i32;
            Some(*a)
        }))
        .collect();
    Tensor::from_i32(cu, &[lens.len() + 1]).unwrap().to_device(Device::Cuda(0)).unwrap()
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

/// bf16 values uniform in [-0.5, 0.5) on GPU 0.
pub fn device_tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&random_bf16(n, seed), shape, DType::BF16).unwrap().to_device(Device::Cuda(0)).unwrap()
}

/// Whether FA_BENCH_FILTER (a substring of the shape name, or several separated by commas) selects `name`.
pub fn selected(name: &str) -> bool {
    std::env::var("FA_BENCH_FILTER").map_or(true, |filter| filter.split(',').any(|f| name.contains(f)))
}

pub fn criterion() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_millis(1200)).sample_size(10).configure_from_args()
}

static SAMPLES: Mutex<Vec<f64>> = Mutex::new(Vec::new());
static FAILED: Mutex<Option<String>> = Mutex::new(None);

/// Time `f` with criterion (CUDA events per sample) and print `RESULT <backend> <name> <median ms>
/// <TFLOP/s>` from the median sample. Criterion's id is `<backend>/<name>`. An error from `f` ends the
/// timing and prints `SKIPPED <name>: <backend>: <error>` instead, so one failing shape never stops the run.
pub fn bench(c: &mut Criterion, backend: &str, name: &str, flops: f64, mut f: impl FnMut() -> flash_attn::Result<()>) {
    if !selected(name) {
        return;
    }
    SAMPLES.lock().unwrap().clear();
    *FAILED.lock().unwrap() = None;
    // One untimed call first: the module load and first launches of a process stay out of criterion's
    // warm-up estimate (with a short --warm-up-time they made it time one call per sample, and the first
    // shape of a run came out many times too slow).
    if let Err(e) = f() {
        println!("SKIPPED {name}: {backend}: {e}");
        return;
    }
    c.bench_function(&format!("{backend}/{name}"), |b| {
        b.iter_custom(|iters| {
            if FAILED.lock().unwrap().is_some() {
                return Duration::from_nanos(1);
            }
            match cuda::time_ms(0, || (0..iters).try_for_each(|_| f())) {
                Ok(ms) => {
                    SAMPLES.lock().unwrap().push(ms as f64 / iters as f64);
                    Duration::from_secs_f64(ms as f64 / 1e3)
                }
                Err(e) => {
                    *FAILED.lock().unwrap() = Some(e.to_string());
                    Duration::from_nanos(1)
                }
            }
        })
    });
    if let Some(e) = FAILED.lock().unwrap().take() {
        println!("SKIPPED {name}: {backend}: {e}");
        return;
    }
    let mut s = SAMPLES.lock().unwrap().clone();
    s.sort_by(f64::total_cmp);
    let Some(&median) = s.get(s.len() / 2) else { return };
    println!("RESULT {backend} {name} {median:.4} {:.1}", flops / (median * 1e-3) / 1e12);
}
