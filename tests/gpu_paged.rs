//! Paged K/V on CUDA (issue 13): `varlen_fwd_paged` on the GPU against the f64 reference (tests/gpu.rs's
//! tolerance), against the CPU paged path (the oracle, which kvcache.rs checks bitwise against the
//! contiguous CPU path), and against CUDA `varlen_fwd` over the same keys in contiguous rows: bit for bit
//! where the same kernel family runs both (the paged kernels are the contiguous ones with other
//! addresses). Page sizes 1, 3, 16, 64, 256 (multiples of 8 run on Hopper's warp-specialized kernel,
//! others on the cp.async wgmma kernel), shuffled block pools with spare blocks, block-table entries
//! past each sequence's pages left as garbage, unused page rows NaN (a read of one shows), key counts
//! from cu_seqlens_k, cu_seqlens_k cut by seqused_k, or seqused_k alone, GQA, causal / window / softcap,
//! both dtypes, every head dim, every kernel choice (`fwd_choices`). A bogus block table and bogus
//! lengths must not fault (run under compute-sanitizer memcheck too). Each test prints its seed.
//!
//! Without a CUDA GPU every test prints a notice and passes vacuously.

#[path = "common/mod.rs"]
mod common;
#[path = "common/kernels.rs"]
mod kernels;

use common::*;
use flash_attn::{varlen_fwd, varlen_fwd_paged, AttnOptions, DType, Device, FwdOutput, KernelChoice, PagedVarlen, Tensor, Varlen};
use kernels::{fwd_choices, fwd_family, fwd_family_keys, Tally};
use rand::rngs::StdRng;
use rand::Rng;

const GPU: Device = Device::Cuda(0);

macro_rules! require_gpu {
    () => {
        if !kernels::gpu_or_skip("gpu_paged", false, line!()) {
            return;
        }
    };
}


/// The family a paged call runs on: the contiguous call's, except that the warp-specialized kernel takes
/// only page sizes that are multiples of 8 (host/src/dispatch.rs `fwd_ws_launch`).
fn paged_family(d: usize, dtype: DType, choice: KernelChoice, page: usize) -> &'static str {
    match fwd_family(d, dtype, choice) {
        "wgmma ws" if page % 8 != 0 => "wgmma",
        f => f,
    }
}

fn i32_tensor(v: &[i32], shape: &[usize], device: Device) -> Tensor {
    Tensor::from_i32(v.to_vec(), shape).unwrap().to_device(device).unwrap()
}

/// Key counts: 0 cu_seqlens_k alone, 1 cu_seqlens_k cut by seqused_k, 2 seqused_k alone.
#[derive(Clone, Copy, Debug)]
enum Counts {
    CuSeqlens,
    CuAndUsed,
    UsedOnly,
}

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    d: usize,
    hq: usize,
    hk: usize,
    causal: bool,
    window: (i64, i64),
    softcap: f32,
    /// Per sequence (queries, key slot, used keys <= slot).
    seqs: Vec<(usize, usize, usize)>,
    page: usize,
    counts: Counts,
    extra_blocks: usize,
    /// The paged call gets max_seqlen_q/k (else none: scheduled by the mean lengths).
    give_max: bool,
}

impl Case {
    fn opts(&self, kernels: KernelChoice) -> AttnOptions {
        AttnOptions { softmax_scale: None, causal: self.causal, window: self.window, softcap: self.softcap, kernels, ..Default::default() }
    }
    fn ref_opts(&self) -> RefOpts {
        RefOpts { scale: 1.0 / (self.d as f64).sqrt(), softcap: self.softcap as f64, causal: self.causal, window: self.window }
    }
    fn smax(&self) -> f64 {
        if self.softcap > 0.0 { self.softcap as f64 } else { (self.d as f64).sqrt() }
    }
    /// Keys sequence b attends to.
    fn keys(&self, b: usize) -> usize {
        match self.counts {
            Counts::CuSeqlens => self.seqs[b].1,
            _ => self.seqs[b].2,
        }
    }
    /// max_seqlen_k: the most keys any sequence attends to.
    fn max_keys(&self) -> usize {
        (0..self.seqs.len()).map(|b| self.keys(b)).max().unwrap_or(0)
    }
    fn describe(&self) -> String {
        format!(
            "{} d={} hq={} hk={} causal={} window={:?} softcap={} page={} counts={:?} seqs={:?} extra_blocks={} give_max={}",
            self.dtype, self.d, self.hq, self.hk, self.causal, self.window, self.softcap, self.page, self.counts, self.seqs, self.extra_blocks, self.give_max
        )
    }
}

/// One case's inputs, host side: q and the keys packed (contiguous varlen layout), the same keys in
/// pages, and the lengths.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kp: Vec<f32>,
    vp: Vec<f32>,
    table: Vec<i32>,
    max_blocks: usize,
    num_blocks: usize,
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    used_k: Vec<usize>,
}

fn prefix(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    std::iter::once(0).chain(lens.scan(0, |a, l| {
        *a += l;
        Some(*a)
    }))
    .collect()
}

fn inputs(c: &Case, rng: &mut StdRng) -> Inputs {
    let (hq, hk, d, page) = (c.hq, c.hk, c.d, c.page);
    let cu_q = prefix(c.seqs.iter().map(|s| s.0));
    let cu_k = prefix(c.seqs.iter().map(|s| s.1));
    let used_k: Vec<usize> = c.seqs.iter().map(|s| s.2).collect();
    let (tq, tk) = (*cu_q.last().unwrap(), *cu_k.last().unwrap());
    let q = random_values(rng, tq * hq * d, 1.0, c.dtype);
    let k = random_values(rng, tk * hk * d, 1.0, c.dtype);
    let v = random_values(rng, tk * hk * d, 1.0, c.dtype);
    // Each sequence gets the blocks its keys need from a shuffled pool with spare blocks; its table row
    // is garbage past them (never read for keys: the kernels' clamped tile copies may read them, and the
    // blocks they name, only for keys they mask or zero). Rows no key lives in are NaN.
    let keys: Vec<usize> = (0..c.seqs.len()).map(|b| c.keys(b)).collect();
    let PagedCopy { kp, vp, table, max_blocks, num_blocks } = paged_copy(rng, &k, &v, &cu_k, &keys, hk, d, page, c.extra_blocks, 1, 0..3, -1000..1000);
    Inputs { q, k, v, kp, vp, table, max_blocks, num_blocks, cu_q, cu_k, used_k }
}

/// `varlen_fwd_paged` of `x` on `device`.
fn run_paged(c: &Case, x: &Inputs, device: Device, kernels: KernelChoice) -> flash_attn::Result<FwdOutput> {
    let (tq, b) = (*x.cu_q.last().unwrap(), c.seqs.len());
    let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, c.dtype).unwrap().to_device(device).unwrap();
    let ints = |v: &[usize]| i32_tensor(&v.iter().map(|&x| x as i32).collect::<Vec<_>>(), &[v.len()], device);
    let (cu_q, cu_k, used_k) = (ints(&x.cu_q), ints(&x.cu_k), ints(&x.used_k));
    let table = i32_tensor(&x.table, &[b, x.max_blocks], device);
    let shape = [x.num_blocks, c.page, c.hk, c.d];
    let max_q = c.seqs.iter().map(|s| s.0).max().unwrap_or(0);
    let max_k = c.max_keys();
    let paged = PagedVarlen {
        cu_seqlens_q: &cu_q,
        cu_seqlens_k: (!matches!(c.counts, Counts::UsedOnly)).then_some(&cu_k),
        max_seqlen_q: c.give_max.then_some(max_q),
        max_seqlen_k: c.give_max.then_some(max_k),
        seqused_q: None,
        seqused_k: (!matches!(c.counts, Counts::CuSeqlens)).then_some(&used_k),
        block_table: &table,
    };
    varlen_fwd_paged(&t(&x.q, &[tq, c.hq, c.d]), &t(&x.kp, &shape), &t(&x.vp, &shape), &paged, &c.opts(kernels))
}

/// CUDA `varlen_fwd` over the same keys, contiguous.
fn run_contiguous(c: &Case, x: &Inputs, kernels: KernelChoice) -> FwdOutput {
    let (tq, tk) = (*x.cu_q.last().unwrap(), *x.cu_k.last().unwrap());
    let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, c.dtype).unwrap().to_device(GPU).unwrap();
    let ints = |v: &[usize]| i32_tensor(&v.iter().map(|&x| x as i32).collect::<Vec<_>>(), &[v.len()], GPU);
    let (cu_q, cu_k, used_k) = (ints(&x.cu_q), ints(&x.cu_k), ints(&x.used_k));
    let max_q = c.seqs.iter().map(|s| s.0).max().unwrap_or(0);
    let max_k = c.max_keys();
    let vl = Varlen { cu_seqlens_q: &cu_q, cu_seqlens_k: &cu_k, max_seqlen_q: Some(max_q), max_seqlen_k: Some(max_k), seqused_q: None, seqused_k: (!matches!(c.counts, Counts::CuSeqlens)).then_some(&used_k) };
    varlen_fwd(&t(&x.q, &[tq, c.hq, c.d]), &t(&x.k, &[tk, c.hk, c.d]), &t(&x.v, &[tk, c.hk, c.d]), &vl, &c.opts(kernels)).unwrap()
}

fn host(o: &FwdOutput) -> (Vec<f32>, Vec<f32>) {
    (o.out.to_f32_vec().unwrap(), o.lse.to_f32_vec().unwrap())
}

/// GPU against the CPU path's output: each rounds its own f32 result once, so twice the GPU tolerance.
fn check_against_cpu(gpu: &(Vec<f32>, Vec<f32>), cpu: &(Vec<f32>, Vec<f32>), dtype: DType, smax: f64) -> Result<(), String> {
    let tol = gpu_tolerance(dtype, 1.0, smax);
    for (i, (&g, &r)) in gpu.0.iter().zip(&cpu.0).enumerate() {
        let bound = 2.0 * (tol.u * (r as f64).abs() + tol.atol_out);
        if !(g.is_finite() && ((g - r) as f64).abs() <= bound) {
            return Err(format!("out[{i}] = {g}, CPU paged path {r}"));
        }
    }
    for (i, (&g, &r)) in gpu.1.iter().zip(&cpu.1).enumerate() {
        let ok = if r == f32::NEG_INFINITY { g == r } else { g.is_finite() && ((g - r) as f64).abs() <= 2.0 * tol.atol_lse };
        if !ok {
            return Err(format!("lse[{i}] = {g}, CPU paged path {r}"));
        }
    }
    Ok(())
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One case under every kernel choice: against the reference, the CPU paged path and CUDA contiguous.
fn paged_case(c: &Case, rng: &mut StdRng, tally: &mut Tally) -> Result<(), String> {
    let x = inputs(c, rng);
    let tq = *x.cu_q.last().unwrap();
    let used_q: Vec<usize> = c.seqs.iter().map(|s| s.0).collect();
    let keys: Vec<usize> = (0..c.seqs.len()).map(|b| c.keys(b)).collect();
    let (ro, rl) = reference_varlen_fwd(&x.q, &x.k, &x.v, &x.cu_q, &x.cu_k, &used_q, &keys, tq, c.hq, c.hk, c.d, &c.ref_opts());
    let tol = gpu_tolerance(c.dtype, 1.0, c.smax());
    let cpu = host(&run_paged(c, &x, Device::Cpu, KernelChoice::default()).map_err(|e| format!("CPU paged path: {e}"))?);
    for (name, choice) in fwd_choices() {
        let family = paged_family(c.d, c.dtype, choice, c.page);
        let at = |e: String| format!("[{name}: {family}] {e}");
        let got = host(&run_paged(c, &x, GPU, choice).map_err(|e| at(e.to_string()))?);
        check_close(&got.0, &got.1, &ro, &rl, &tol).map_err(|e| at(format!("vs the reference: {e}")))?;
        check_against_cpu(&got, &cpu, c.dtype, c.smax()).map_err(at)?;
        let want = host(&run_contiguous(c, &x, choice));
        let max_k = c.max_keys();
        if family == fwd_family_keys(c.d, c.dtype, choice, max_k) {
            if bits(&got.0) != bits(&want.0) || bits(&got.1) != bits(&want.1) {
                return Err(at("paged differs from contiguous varlen_fwd on the same keys (the same kernel family: expected bit for bit)".into()));
            }
        } else {
            check_close(&want.0, &want.1, &ro, &rl, &tol).map_err(|e| at(format!("contiguous vs the reference: {e}")))?;
        }
        tally.add(name, family, c.d);
    }
    Ok(())
}

const MASKS: [(bool, (i64, i64), f32); 5] = [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (false, (37, 5), 0.0), (true, (70, -1), 0.0), (false, (-1, -1), 15.0)];
/// 16 and 24: the ws forward's page boxes issued by its whole producer warpgroup (24: 8-row boxes at
/// three offsets of a page, pages not aligned with the tiles); 64 / 256: by its first warp (two boxes
/// per column group at 128-key tiles, one at 64-key tiles / one); 1, 3: the cp.async kernels.
const PAGES: [usize; 6] = [1, 3, 16, 24, 64, 256];

fn random_seqs(rng: &mut StdRng, n: usize, max_q: usize, max_k: usize) -> Vec<(usize, usize, usize)> {
    (0..n)
        .map(|_| {
            let q = if rng.gen_bool(0.15) { 0 } else { rng.gen_range(1..=max_q) };
            let slot = if rng.gen_bool(0.1) { 0 } else { rng.gen_range(1..=max_k) };
            (q, slot, rng.gen_range(0..=slot))
        })
        .collect()
}

#[test]
fn paged_every_page_size_head_dim_and_mask() {
    require_gpu!();
    let (_, mut rng) = seeded("gpu_paged::paged_every_page_size_head_dim_and_mask");
    let mut tally = Tally::new("gpu_paged::paged_every_page_size_head_dim_and_mask");
    let mut i = 0;
    for dtype in [DType::BF16, DType::F16] {
        for d in HEAD_DIMS {
            for page in PAGES {
                let (causal, window, softcap) = MASKS[i % MASKS.len()];
                let (hq, hk) = [(2, 2), (4, 2), (3, 1), (8, 2)][i % 4];
                let counts = [Counts::CuSeqlens, Counts::CuAndUsed, Counts::UsedOnly][i % 3];
                i += 1;
                let n = rng.gen_range(1..=4);
                let seqs = random_seqs(&mut rng, n, 150, 330);
                let c = Case { dtype, d, hq, hk, causal, window, softcap, seqs, page, counts, extra_blocks: rng.gen_range(0..4), give_max: rng.gen_bool(0.7) };
                paged_case(&c, &mut rng, &mut tally).unwrap_or_else(|e| panic!("{}: {e}", c.describe()));
            }
        }
    }
    tally.report();
}

/// Batches of many more tiles than the grid has blocks (the ws forward's blocks draw tiles from its
/// counter and its producer walks many of them), over every page size the ws kernel takes at 128- and
/// 64-key tiles (boxes issued by the whole producer warpgroup or by its first warp): the paged result
/// must be the contiguous one bit for bit (the same kernel family), with finite outputs. Pages of 64
/// with every producer warp waiting for each stage once hung such a batch (a warp without a box of
/// its own fell behind a stage's barrier phases).
#[test]
fn paged_many_tiles_match_contiguous_bitwise() {
    require_gpu!();
    let (_, mut rng) = seeded("gpu_paged::paged_many_tiles_match_contiguous_bitwise");
    let mut tally = Tally::new("gpu_paged::paged_many_tiles_match_contiguous_bitwise");
    let choice = KernelChoice::default();
    for (i, d) in [128usize, 256].into_iter().enumerate() {
        for (j, page) in [8usize, 16, 24, 32, 64, 128, 256].into_iter().enumerate() {
            let seqs: Vec<(usize, usize, usize)> = (0..32).map(|_| rng.gen_range(64..=768)).map(|l| (l, l, l)).collect();
            let causal = (i + j) % 2 == 1;
            let c = Case { dtype: DType::BF16, d, hq: 4, hk: 4, causal, window: (-1, -1), softcap: 0.0, seqs, page, counts: Counts::CuSeqlens, extra_blocks: 3, give_max: true };
            let x = inputs(&c, &mut rng);
            let family = paged_family(c.d, c.dtype, choice, c.page);
            assert_eq!(family, fwd_family_keys(c.d, c.dtype, choice, c.max_keys()), "{}: the paged and contiguous calls run one family", c.describe());
            let got = host(&run_paged(&c, &x, GPU, choice).unwrap_or_else(|e| panic!("{}: {e}", c.describe())));
            let want = host(&run_contiguous(&c, &x, choice));
            assert!(got.0.iter().all(|v| v.is_finite()) && got.1.iter().all(|v| v.is_finite()), "{}: non-finite output", c.describe());
            assert!(bits(&got.0) == bits(&want.0) && bits(&got.1) == bits(&want.1), "{}: paged differs from contiguous varlen_fwd ({family})", c.describe());
            tally.add("default", family, c.d);
        }
    }
    tally.report();
}

/// Decode (one and four queries over long contexts, GQA 4) and a long causal prefill.
#[test]
fn paged_decode_and_long_prefill() {
    require_gpu!();
    let (_, mut rng) = seeded("gpu_paged::paged_decode_and_long_prefill");
    let mut tally = Tally::new("gpu_paged::paged_decode_and_long_prefill");
    for (d, page, sq, sk, causal) in [(128, 16, 1, 3000, true), (128, 256, 4, 2500, true), (64, 64, 1, 1500, false), (256, 16, 4, 900, true), (128, 64, 700, 700, true), (96, 3, 300, 500, true)] {
        let seqs: Vec<(usize, usize, usize)> = (0..3).map(|_| sk - rng.gen_range(0..sk / 4)).map(|k| (sq, k, k)).collect();
        let c = Case { dtype: DType::BF16, d, hq: 8, hk: 2, causal, window: (-1, -1), softcap: 0.0, seqs, page, counts: Counts::CuAndUsed, extra_blocks: 2, give_max: true };
        paged_case(&c, &mut rng, &mut tally).unwrap_or_else(|e| panic!("{}: {e}", c.describe()));
    }
    tally.report();
}

/// A block table of garbage (entries anywhere in i32, negative ones included) and bogus key counts
/// (decreasing cu_seqlens_k, seqused_k past any slot or negative): the kernels clamp every index, so the
/// call runs, reads only inside k and v (finite here), and writes finite outputs. Nothing is compared;
/// run it under `compute-sanitizer --tool memcheck` to see every access stay inside.
#[test]
fn bogus_block_table_does_not_fault() {
    require_gpu!();
    let (_, mut rng) = seeded("gpu_paged::bogus_block_table_does_not_fault");
    let mut tally = Tally::new("gpu_paged::bogus_block_table_does_not_fault");
    for dtype in [DType::BF16, DType::F16] {
        for d in [32, 64, 128, 256] {
            for page in PAGES {
                let (b, hq, hk, num_blocks, max_blocks) = (3, 4, 2, rng.gen_range(1..6), rng.gen_range(1..8));
                let cu_q = [0, 5, 5, 140];
                let tq = 140;
                let q = random_values(&mut rng, tq * hq * d, 1.0, dtype);
                let kv = random_values(&mut rng, num_blocks * page * hk * d, 1.0, dtype);
                let table: Vec<i32> = (0..b * max_blocks).map(|_| match rng.gen_range(0..4) { 0 => i32::MIN, 1 => i32::MAX, 2 => rng.gen_range(-10..10), _ => rng.r#gen() }).collect();
                let cu_k = [0, i32::MAX, 7, rng.r#gen()];
                let used_k = [-3, i32::MAX, rng.r#gen()];
                let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, dtype).unwrap().to_device(GPU).unwrap();
                let (qt, kt, vt) = (t(&q, &[tq, hq, d]), t(&kv, &[num_blocks, page, hk, d]), t(&kv, &[num_blocks, page, hk, d]));
                let (cu_q_t, cu_k_t, used_t) = (i32_tensor(&cu_q, &[4], GPU), i32_tensor(&cu_k, &[4], GPU), i32_tensor(&used_k, &[3], GPU));
                let table_t = i32_tensor(&table, &[b, max_blocks], GPU);
                for (name, choice) in fwd_choices() {
                    for counts in [Counts::CuSeqlens, Counts::CuAndUsed, Counts::UsedOnly] {
                        let family = paged_family(d, dtype, choice, page);
                        let paged = PagedVarlen {
                            cu_seqlens_q: &cu_q_t,
                            cu_seqlens_k: (!matches!(counts, Counts::UsedOnly)).then_some(&cu_k_t),
                            max_seqlen_q: Some(135),
                            max_seqlen_k: Some(1000),
                            seqused_q: None,
                            seqused_k: (!matches!(counts, Counts::CuSeqlens)).then_some(&used_t),
                            block_table: &table_t,
                        };
                        let opts = AttnOptions { causal: rng.gen_bool(0.5), kernels: choice, ..Default::default() };
                        let at = format!("[{name}: {family}] {dtype} d={d} page={page} num_blocks={num_blocks} max_blocks={max_blocks} counts={counts:?}");
                        let o = varlen_fwd_paged(&qt, &kt, &vt, &paged, &opts).unwrap_or_else(|e| panic!("{at}: {e}"));
                        let (out, lse) = host(&o);
                        assert!(out.iter().all(|x| x.is_finite()), "{at}: non-finite out");
                        assert!(lse.iter().all(|x| !x.is_nan()), "{at}: NaN lse");
                        tally.add(name, family, d);
                    }
                }
            }
        }
    }
    tally.report();
}
