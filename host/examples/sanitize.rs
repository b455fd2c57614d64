//! The driver benches/sanitize.sh runs under compute-sanitizer: every kernel family on small problems, once
//! each. Both dtypes, every head dim, dense and packed (varlen with seqused padding, an empty sequence and
//! tail rows), causal and window + softcap, GQA, forward, backward and deterministic backward, on the wgmma
//! kernels (Hopper) and on the mma.sync ones (`no_wgmma`). Prints one line per case and `SANITIZE done
//! <n> cases`; an error from the library exits 1.
//!
//! `sanitize [head dims, comma-separated] [wgmma|mma]` restricts the cases (racecheck is slow).

use flash_attn::{bwd, fwd, varlen_bwd, varlen_fwd, AttnOptions, DType, Device, KernelChoice, Tensor, Varlen, HEAD_DIMS};

fn values(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

fn main() -> flash_attn::Result<()> {
    if !flash_attn::cuda::available() {
        println!("SKIPPED sanitize: no CUDA GPU on this machine");
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let dims: Vec<usize> = args.get(1).map_or(HEAD_DIMS.to_vec(), |a| a.split(',').filter_map(|d| d.parse().ok()).collect());
    let paths: &[bool] = match args.get(2).map(String::as_str) {
        Some("wgmma") => &[false],
        Some("mma") => &[true],
        _ => &[false, true],
    };
    let gpu = Device::Cuda(0);
    let mut seed = 11u64;
    let mut cases = 0;
    let (hq, hk) = (4, 2);
    for dtype in [DType::BF16, DType::F16] {
        for &d in &dims {
            let mut t = |shape: &[usize]| Tensor::from_f32(&values(shape.iter().product(), &mut seed), shape, dtype)?.to_device(gpu);
            // Dense: b=2, sq=70, sk=150.
            let (q, k, v, g) = (t(&[2, 70, hq, d])?, t(&[2, 150, hk, d])?, t(&[2, 150, hk, d])?, t(&[2, 70, hq, d])?);
            // Packed: slots of 50, 0 and 80 queries (keys 60, 40, 90), seqused below each slot, 7 + 5 tail rows.
            let (tq, tk) = (137, 195);
            let (pq, pk, pv, pg) = (t(&[tq, hq, d])?, t(&[tk, hk, d])?, t(&[tk, hk, d])?, t(&[tq, hq, d])?);
            let i32s = |x: &[i32]| Tensor::from_i32(x.to_vec(), &[x.len()])?.to_device(gpu);
            let (cu_q, cu_k, used_q, used_k) = (i32s(&[0, 50, 50, 130])?, i32s(&[0, 60, 100, 190])?, i32s(&[45, 0, 80])?, i32s(&[60, 33, 70])?);
            let varlen = Varlen { cu_seqlens_q: &cu_q, cu_seqlens_k: &cu_k, max_seqlen_q: 80, max_seqlen_k: 70, seqused_q: Some(&used_q), seqused_k: Some(&used_k) };
            for &no_wgmma in paths {
                for (causal, window, softcap) in [(true, (-1, -1), 0.0), (false, (20, 10), 3.0)] {
                    let opts = AttnOptions { causal, window, softcap, kernels: KernelChoice { no_wgmma, ..Default::default() }, ..Default::default() };
                    let f = fwd(&q, &k, &v, &opts)?;
                    let pf = varlen_fwd(&pq, &pk, &pv, &varlen, &opts)?;
                    for det in [false, true] {
                        bwd(&g, &q, &k, &v, &f.out, &f.lse, &opts, det)?;
                        varlen_bwd(&pg, &pq, &pk, &pv, &pf.out, &pf.lse, &varlen, &opts, det)?;
                    }
                    // Copying a result back waits for the kernels, so an error surfaces in this case.
                    f.out.to_f32_vec()?;
                    cases += 1;
                    println!("case {dtype} d{d} {} causal={causal} window={window:?} softcap={softcap}: fwd, varlen fwd, bwd, varlen bwd (atomic and deterministic)", if no_wgmma { "mma.sync" } else { "default kernels" });
                }
            }
        }
    }
    println!("SANITIZE done {cases} cases");
    Ok(())
}
