//! Scratch check of the CUDA backward against the CPU backward (the oracle): prints, per case, the
//! largest |gpu - cpu| of dq, dk, dv relative to the largest |cpu|. Run on the GPU machine.
use flash_attn::{bwd, fwd, varlen_bwd, varlen_fwd, AttnOptions, DType, Device, Tensor, Varlen};

fn rnd(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let m = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = a.iter().zip(&b).fold(0f32, |m, (x, y)| if (x - y).is_nan() { f32::INFINITY } else { m.max((x - y).abs()) });
    d / m.max(1e-6)
}

/// The benchmark table's shapes whose name contains `filter`: 16k tokens per batch, H * D = 2048, bf16 on
/// the GPU. `run` gets the name, (q, k, v, dout) drawn from one seeded stream, the options and the
/// forward's FLOPs.
fn for_table_shapes(filter: &str, mut run: impl FnMut(&str, [Tensor; 4], AttnOptions, f64)) {
    let gpu = Device::Cuda(0);
    let mut seed = 7u64;
    for &d in &[64usize, 96, 128, 192, 256] {
        for &s in &[512usize, 2048, 8192, 16384] {
            for causal in [false, true] {
                let name = format!("d{d}-s{s}-{}", if causal { "causal" } else { "full" });
                if !name.contains(filter) {
                    continue;
                }
                let (b, h) = (16384 / s, 2048 / d);
                let n = b * s * h * d;
                let mut mk = || Tensor::from_f32(&rnd(n, &mut seed), &[b, s, h, d], DType::BF16).unwrap().to_device(gpu).unwrap();
                let qkvg = [mk(), mk(), mk(), mk()];
                let flops = 4.0 * (b * h * s * s * d) as f64 * if causal { 0.5 } else { 1.0 };
                run(&name, qkvg, AttnOptions { causal, ..Default::default() }, flops);
            }
        }
    }
}

/// Median of `reps` CUDA-event timings of `f`, in ms.
fn median_ms(reps: usize, mut f: impl FnMut() -> flash_attn::Result<()>) -> f32 {
    let mut t: Vec<f32> = (0..reps).map(|_| flash_attn::cuda::time_ms(0, &mut f).unwrap()).collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// `bwd_check bench [filter]`: median ms of bwd (atomic and deterministic) on the table's shapes.
fn bench(filter: &str) {
    for_table_shapes(filter, |name, [q, k, v, g], opts, fwd_flops| {
        let f = fwd(&q, &k, &v, &opts).unwrap();
        let flops = fwd_flops * 2.5;
        let mut line = format!("{name}:");
        for det in [false, true] {
            let ms = median_ms(12, || bwd(&g, &q, &k, &v, &f.out, &f.lse, &opts, det).map(|_| ()));
            line += &format!(" det={det} {ms:.3} ms {:.0} TFLOP/s", flops / ms as f64 / 1e9);
        }
        println!("{line}");
    });
}

/// `bwd_check fwd [filter]`: median ms of fwd on the table's shapes, wgmma kernels and mma.sync ones.
fn bench_fwd(filter: &str) {
    for_table_shapes(filter, |name, [q, k, v, _], opts, flops| {
        let mut line = format!("{name}:");
        for wg in [true, false] {
            let opts = flash_attn::AttnOptions { kernels: flash_attn::KernelChoice { no_wgmma: !wg, ..Default::default() }, ..opts };
            let ms = median_ms(15, || fwd(&q, &k, &v, &opts).map(|_| ()));
            line += &format!(" {} {ms:.3} ms {:.0} TFLOP/s", if wg { "wgmma" } else { "mma" }, flops / ms as f64 / 1e9);
        }
        println!("{line}");
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(|s| s.as_str()) == Some("fwd") {
        bench_fwd(args.get(2).map(|s| s.as_str()).unwrap_or(""));
        return;
    }
    if args.get(1).map(|s| s.as_str()) == Some("bench") {
        bench(args.get(2).map(|s| s.as_str()).unwrap_or(""));
        return;
    }
    let gpu = Device::Cuda(0);
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut worst = 0f32;
    for &dt in &[DType::BF16, DType::F16] {
        for &d in &[32usize, 64, 96, 128, 192, 256] {
            for (name, sq, sk, hq, hk, opts) in [
                ("plain", 77, 77, 2, 2, AttnOptions::default()),
                ("causal", 130, 200, 4, 2, AttnOptions { causal: true, ..Default::default() }),
                ("causal-sq>sk", 200, 70, 2, 1, AttnOptions { causal: true, ..Default::default() }),
                ("window", 150, 150, 2, 2, AttnOptions { window: (20, 5), ..Default::default() }),
                ("softcap", 64, 129, 3, 1, AttnOptions { softcap: 5.0, ..Default::default() }),
            ] {
                let b = 2;
                let q = Tensor::from_f32(&rnd(b * sq * hq * d, &mut seed), &[b, sq, hq, d], dt).unwrap();
                let k = Tensor::from_f32(&rnd(b * sk * hk * d, &mut seed), &[b, sk, hk, d], dt).unwrap();
                let v = Tensor::from_f32(&rnd(b * sk * hk * d, &mut seed), &[b, sk, hk, d], dt).unwrap();
                let g = Tensor::from_f32(&rnd(b * sq * hq * d, &mut seed), &[b, sq, hq, d], dt).unwrap();
                let f = fwd(&q, &k, &v, &opts).unwrap();
                let c = bwd(&g, &q, &k, &v, &f.out, &f.lse, &opts, true).unwrap();
                let on = |t: &Tensor| t.to_device(gpu).unwrap();
                for det in [false, true] {
                    match bwd(&on(&g), &on(&q), &on(&k), &on(&v), &on(&f.out), &on(&f.lse), &opts, det) {
                        Ok(r) => {
                            let e = [rel(&r.dq, &c.dq), rel(&r.dk, &c.dk), rel(&r.dv, &c.dv)];
                            worst = worst.max(e[0]).max(e[1]).max(e[2]);
                            println!("{dt:?} d{d} {name} det={det}: dq {:.2e} dk {:.2e} dv {:.2e}", e[0], e[1], e[2]);
                        }
                        Err(e) => println!("{dt:?} d{d} {name} det={det}: ERR {e}"),
                    }
                }
            }
            // Varlen with seqused and a zero-length sequence.
            let (hq, hk) = (4, 2);
            let lens_q = [5usize, 0, 130, 64];
            let lens_k = [70usize, 3, 129, 1];
            let used_q = [5i32, 0, 100, 60];
            let used_k = [60i32, 3, 129, 1];
            let (tq, tk) = (lens_q.iter().sum::<usize>() + 7, lens_k.iter().sum::<usize>() + 5);
            let cu = |l: &[usize]| {
                let mut v = vec![0i32];
                for &x in l {
                    v.push(v.last().unwrap() + x as i32);
                }
                Tensor::from_i32(v, &[l.len() + 1]).unwrap()
            };
            let (cq, ck) = (cu(&lens_q), cu(&lens_k));
            let (uq, uk) = (Tensor::from_i32(used_q.to_vec(), &[4]).unwrap(), Tensor::from_i32(used_k.to_vec(), &[4]).unwrap());
            let q = Tensor::from_f32(&rnd(tq * hq * d, &mut seed), &[tq, hq, d], dt).unwrap();
            let k = Tensor::from_f32(&rnd(tk * hk * d, &mut seed), &[tk, hk, d], dt).unwrap();
            let v = Tensor::from_f32(&rnd(tk * hk * d, &mut seed), &[tk, hk, d], dt).unwrap();
            let g = Tensor::from_f32(&rnd(tq * hq * d, &mut seed), &[tq, hq, d], dt).unwrap();
            let opts = AttnOptions { causal: true, ..Default::default() };
            let vl = Varlen { cu_seqlens_q: &cq, cu_seqlens_k: &ck, max_seqlen_q: Some(130), max_seqlen_k: Some(129), seqused_q: Some(&uq), seqused_k: Some(&uk) };
            let f = varlen_fwd(&q, &k, &v, &vl, &opts).unwrap();
            let c = varlen_bwd(&g, &q, &k, &v, &f.out, &f.lse, &vl, &opts, true).unwrap();
            let on = |t: &Tensor| t.to_device(gpu).unwrap();
            let (gcq, gck, guq, guk) = (on(&cq), on(&ck), on(&uq), on(&uk));
            let gvl = Varlen { cu_seqlens_q: &gcq, cu_seqlens_k: &gck, max_seqlen_q: Some(130), max_seqlen_k: Some(129), seqused_q: Some(&guq), seqused_k: Some(&guk) };
            for det in [false, true] {
                match varlen_bwd(&on(&g), &on(&q), &on(&k), &on(&v), &on(&f.out), &on(&f.lse), &gvl, &opts, det) {
                    Ok(r) => {
                        let e = [rel(&r.dq, &c.dq), rel(&r.dk, &c.dk), rel(&r.dv, &c.dv)];
                        worst = worst.max(e[0]).max(e[1]).max(e[2]);
                        println!("{dt:?} d{d} varlen det={det}: dq {:.2e} dk {:.2e} dv {:.2e}", e[0], e[1], e[2]);
                    }
                    Err(e) => println!("{dt:?} d{d} varlen det={det}: ERR {e}"),
                }
            }
        }
    }
    println!("WORST {worst:.3e}");
}
