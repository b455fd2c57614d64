//! A candle training step of one attention layer: forward and backward (loss = sum(out * w), `Var`
//! inputs, `loss.backward()`), with `flash_attn::candle::flash_attn` against candle's naive attention
//! composed from its ops (q k^T, causal mask, softmax in f32, times v). On a CUDA GPU when built with
//! `candle-cuda`, else on the CPU with a smaller shape. Prints `CANDLE_STEP <device> <shape> ours <ms>
//! naive <ms> speedup <x>` (medians over timed steps after warm-up, each ended by a device
//! synchronize). Then cached generation's decoding steps (`decode`): `CANDLE_DECODE ...` lines.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::time::Instant;

fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    // [B, S, H, D] -> [B, H, S, D]
    let (q, k, v) = (q.transpose(1, 2)?.contiguous()?, k.transpose(1, 2)?.contiguous()?, v.transpose(1, 2)?.contiguous()?);
    let s = q.dim(2)?;
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let mask: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (s, s), q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(v.dtype())?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

fn step(dev: &Device, x: &[Var; 3], w: &Tensor, ours: bool, scale: f64) -> Result<()> {
    let [q, k, v] = x;
    let out = if ours { flash_attn::candle::flash_attn(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale as f32, true)? } else { naive(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale)? };
    let grads = (out.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
    for t in [q, k, v] {
        std::hint::black_box(grads.get(t.as_tensor()).expect("a gradient"));
    }
    dev.synchronize()
}

fn median_ms(dev: &Device, x: &[Var; 3], w: &Tensor, ours: bool, scale: f64, iters: usize) -> Result<f64> {
    for _ in 0..3 {
        step(dev, x, w, ours, scale)?;
    }
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        step(dev, x, w, ours, scale)?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[iters / 2])
}

fn main() -> Result<()> {
    #[cfg(feature = "candle-cuda")]
    let dev = if flash_attn::cuda::available() { Device::new_cuda(0)? } else { Device::Cpu };
    #[cfg(not(feature = "candle-cuda"))]
    let dev = Device::Cpu;
    let (b, s, h, d, dtype, iters) = if dev.is_cuda() { (4, 2048, 16, 128, DType::BF16, 20) } else { (1, 256, 4, 64, DType::F16, 5) };
    let scale = 1.0 / (d as f64).sqrt();
    let var = |seed: u64| -> Result<Var> {
        let n = b * s * h * d;
        let vals: Vec<f32> = (0..n as u64).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 2001) as f32 / 1000.0 - 1.0).collect();
        Var::from_tensor(&Tensor::from_vec(vals, (b, s, h, d), &dev)?.to_dtype(dtype)?)
    };
    let x = [var(1)?, var(2)?, var(3)?];
    let w = Tensor::randn(0f32, 1.0, (b, s, h, d), &dev)?;
    let ours = median_ms(&dev, &x, &w, true, scale, iters)?;
    let naive = median_ms(&dev, &x, &w, false, scale, iters)?;
    let where_ = if dev.is_cuda() { "cuda" } else { "cpu" };
    println!("CANDLE_STEP {where_} b{b} s{s} h{h} d{d} {dtype:?} causal ours {ours:.3} ms naive {naive:.3} ms speedup {:.2}x", naive / ours);
    let rows: &[(usize, usize)] = if dev.is_cuda() { &[(1, 1024), (1, 8192), (1, 32768), (8, 8192)] } else { &[(1, 1024)] };
    for &(b, sk) in rows {
        decode(&dev, b, sk)?;
    }
    Ok(())
}

/// Cached generation's attention: one query per step over `sk` keys narrowed out of a preallocated cache
/// (candle-nn's KV cache), Hq 32, Hk 8, D 128, bf16, causal; `STEPS` calls queued back to back, one
/// synchronize, microseconds per call (median of 5 such runs). `flash_attn::candle::flash_attn` (the KV
/// cache's decode kernels, or with `FLASH_ATTN_NO_DENSE_DECODE` set the dense forward) against candle's
/// naive attention (k and v repeated to Hq heads, as candle-transformers' models do).
fn decode(dev: &Device, b: usize, sk: usize) -> Result<()> {
    const STEPS: usize = 50;
    let (hq, hk, d) = (32, 8, 128);
    let cache = |s: u64| -> Result<Tensor> { (Tensor::randn(0f32, 1.0, (b, sk + 64, hk, d), dev)? * (s as f64))?.to_dtype(DType::BF16) };
    let (kc, vc) = (cache(1)?, cache(1)?);
    let (k, v) = (kc.narrow(1, 0, sk)?, vc.narrow(1, 0, sk)?);
    let q = Tensor::randn(0f32, 1.0, (b, 1, hq, d), dev)?.to_dtype(DType::BF16)?;
    let scale = 1.0 / (d as f64).sqrt();
    let naive_step = || -> Result<Tensor> {
        let rep = |t: &Tensor| t.unsqueeze(3)?.broadcast_as((b, sk, hk, hq / hk, d))?.reshape((b, sk, hq, d));
        naive_decode(&q, &rep(&k)?, &rep(&v)?, scale)
    };
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        dev.synchronize()?;
        let mut t = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..STEPS {
                std::hint::black_box(f()?);
            }
            dev.synchronize()?;
            t.push(t0.elapsed().as_secs_f64() * 1e6 / STEPS as f64);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[2])
    };
    let ours = time(&|| flash_attn::candle::flash_attn(&q, &k, &v, scale as f32, true))?;
    let naive = time(&naive_step)?;
    let routed = std::env::var_os("FLASH_ATTN_NO_DENSE_DECODE").is_none() && dev.is_cuda();
    println!("CANDLE_DECODE b{b} sk{sk} hq{hq} hk{hk} d{d} bf16 ours{} {ours:.1} us naive {naive:.1} us speedup {:.2}x", if routed { "" } else { "(dense)" }, naive / ours);
    Ok(())
}

/// One query row per sequence: no mask (causal at Sq = 1 sees every key).
fn naive_decode(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.transpose(1, 2)?.contiguous()?, k.transpose(1, 2)?.contiguous()?, v.transpose(1, 2)?.contiguous()?);
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(v.dtype())?;
    p.matmul(&v)?.transpose(1, 2)
}
