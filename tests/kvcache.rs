//! Inference on the CPU (issue 13): paged K/V, the KV-cache forward (append, rotary, cache_batch_idx,
//! cache_leftpad), split-KV and the public combine, each against an f64 reference written here from the
//! definitions (plus `common`'s attention reference), over random layouts; paged == contiguous bit for
//! bit; every bad input a typed error naming the argument. The `gpu_` tests run the KV-cache forward
//! and the combine on CUDA against the same references (and the CPU path), and bogus device indices
//! under the kernels' clamps; without a CUDA GPU they print a notice and pass vacuously.
//!
//! Rotary exactness. The library rotates in f32 and rounds the rotated q and k_new to their dtype (as the
//! kernels hold them); the reference rotates in f64. To compare the rounded values bit for bit the
//! rotary cases draw q and k_new from multiples of 2^-6 in [-2, 2] and cos / sin from multiples of 2^-8
//! (true angles, rounded): every product and sum of a rotation is then exact in f32, so both round the
//! same real number. Everything else (the cache, v, v_new) is arbitrary dtype values.
//!
//! Tolerances are cpu_reference.rs's (the attention is the same arithmetic); split results against the
//! unsplit one: out within one unit of the dtype's rounding on top of f32 noise, lse within 2^-20
//! relative. Proptest prints each failing case with its seed; the other tests print theirs.

#[path = "common/mod.rs"]
mod common;

use common::*;
use flash_attn::raw::{self, Workspace};
use flash_attn::{
    combine, fwd, fwd_kvcache, varlen_fwd, varlen_fwd_paged, AttnOptions, CombineViews, DType, Device, Error, FwdOutput, KvCache, KvCacheOptions, KvCacheViews, PagedVarlen, PagedVarlenViews,
    Result, Target, Tensor, Varlen, View,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn i32s(x: &[usize]) -> Tensor {
    Tensor::from_i32(x.iter().map(|&v| v as i32).collect(), &[x.len()]).unwrap()
}

fn outputs(o: &FwdOutput) -> (Vec<f32>, Vec<f32>) {
    (o.out.to_f32_vec().unwrap(), o.lse.to_f32_vec().unwrap())
}

/// Tolerance of one case (cpu_reference.rs): |score| <= |scale| * D * max|q| * max|k|, or the softcap.
fn tolerance(o: &RefOpts, dtype: DType, d: usize, qmax: f64, kmax: f64, vmax: f64) -> Tolerance {
    let mut smax = o.scale.abs() * d as f64 * qmax * kmax;
    if o.softcap > 0.0 {
        smax = smax.min(o.softcap);
    }
    Tolerance::new(dtype, vmax, smax)
}

/// `n` multiples of 2^-6 in `[-amp, amp]` (amp a power of two <= 2): exact in bf16 and f16.
fn grid_values(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    let k = (amp * 64.0) as i32;
    (0..n).map(|_| rng.gen_range(-k..=k) as f32 / 64.0).collect()
}

/// Rotary tables `[s_ro, half]`: cos and sin of position * 10000^(-i/half), rounded to multiples of 2^-8.
fn rotary_tables(s_ro: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
    let q8 = |x: f64| ((x * 256.0).round() / 256.0) as f32;
    let angle = |p: usize, i: usize| p as f64 * 10000f64.powf(-(i as f64) / half as f64);
    let cos = (0..s_ro * half).map(|x| q8(angle(x / half, x % half).cos())).collect();
    let sin = (0..s_ro * half).map(|x| q8(angle(x / half, x % half).sin())).collect();
    (cos, sin)
}

/// Rotates one head (`d` values, f64) to position `pos`: pairs (2i, 2i+1) interleaved, else
/// (i, i + half), each turned by (cos, sin) of column i.
fn rotate_ref(x: &mut [f64], pos: usize, cos: &[f32], sin: &[f32], half: usize, interleaved: bool) {
    for i in 0..half {
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (c, s) = (cos[pos * half + i] as f64, sin[pos * half + i] as f64);
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

// ---------------------------------------------------------------------------------------------------
// Paged varlen

/// A packed batch whose keys also live in pages: per sequence (q rows, key slot, used keys).
#[derive(Clone, Debug)]
struct PagedCase {
    dtype: DType,
    d: usize,
    heads: (usize, usize),
    opts: Opts,
    seqs: Vec<(usize, usize, usize)>,
    page_size: usize,
    /// 0: cu_seqlens_k only; 1: cu_seqlens_k and seqused_k; 2: seqused_k only.
    counts: u8,
    extra_blocks: usize,
    seed: u64,
}

fn paged_case() -> impl Strategy<Value = PagedCase> {
    let seq = (0usize..=70, 0usize..=150, any::<u32>());
    let seqs = proptest::collection::vec(seq, 0..=4).prop_map(|v| v.into_iter().map(|(q, slot, u)| (q, slot, u as usize % (slot + 1))).collect());
    let page = prop_oneof![Just(1usize), Just(3), Just(16), Just(64), Just(100), 1usize..=40];
    (dtype(), proptest::sample::select(vec![32usize, 64, 128]), heads(), opts(), seqs, page, 0u8..3, 0usize..4, any::<u64>()).prop_map(
        |(dtype, d, heads, opts, seqs, page_size, counts, extra_blocks, seed)| PagedCase { dtype, d, heads, opts, seqs, page_size, counts, extra_blocks, seed },
    )
}

/// Runs `c` contiguously (varlen_fwd) and paged (varlen_fwd_paged) on the same keys.
fn run_paged(c: &PagedCase) -> (FwdOutput, FwdOutput) {
    let (hq, hk) = c.heads;
    let d = c.d;
    let mut rng = rng(c.seed);
    let prefix = |lens: Vec<usize>| -> Vec<usize> { std::iter::once(0).chain(lens.iter().scan(0, |a, &l| { *a += l; Some(*a) })).collect() };
    let cu_q = prefix(c.seqs.iter().map(|s| s.0).collect());
    let cu_k = prefix(c.seqs.iter().map(|s| s.1).collect());
    let used_k: Vec<usize> = c.seqs.iter().map(|s| s.2).collect();
    let (tq, tk) = (*cu_q.last().unwrap(), *cu_k.last().unwrap());
    let q = random_values(&mut rng, tq * hq * d, 1.0, c.dtype);
    let k = random_values(&mut rng, tk * hk * d, 1.0, c.dtype);
    let v = random_values(&mut rng, tk * hk * d, 1.0, c.dtype);
    // Pages: each sequence gets the blocks its keys need (with seqused_k only, its used keys), spread
    // over a shuffled pool with spare blocks; unused rows and blocks are NaN, so reading one shows.
    let page = c.page_size;
    let keys_of = |b: usize| if c.counts == 2 { used_k[b] } else { c.seqs[b].1 };
    let keys: Vec<usize> = (0..c.seqs.len()).map(keys_of).collect();
    let PagedCopy { kp, vp, table, max_blocks, num_blocks } = paged_copy(&mut rng, &k, &v, &cu_k, &keys, hk, d, page, c.extra_blocks, 0, 0..2, -5..1000);
    let t = |x: &[f32], shape: &[usize]| Tensor::from_f32(x, shape, c.dtype).unwrap();
    let (cu_q_t, cu_k_t, used_t) = (i32s(&cu_q), i32s(&cu_k), i32s(&used_k));
    let max_q = c.seqs.iter().map(|s| s.0).max().unwrap_or(0);
    let max_k = (0..c.seqs.len()).map(|b| if c.counts == 0 { c.seqs[b].1 } else { used_k[b] }).max().unwrap_or(0);
    let seqused_k = (c.counts > 0).then_some(&used_t);
    let contiguous = Varlen { cu_seqlens_q: &cu_q_t, cu_seqlens_k: &cu_k_t, max_seqlen_q: Some(max_q), max_seqlen_k: Some(max_k), seqused_q: None, seqused_k };
    let want = varlen_fwd(&t(&q, &[tq, hq, d]), &t(&k, &[tk, hk, d]), &t(&v, &[tk, hk, d]), &contiguous, &c.opts.attn()).unwrap();
    let table_t = Tensor::from_i32(table, &[c.seqs.len(), max_blocks]).unwrap();
    let paged = PagedVarlen {
        cu_seqlens_q: &cu_q_t,
        cu_seqlens_k: (c.counts < 2).then_some(&cu_k_t),
        max_seqlen_q: Some(max_q),
        max_seqlen_k: Some(max_k),
        seqused_q: None,
        seqused_k,
        block_table: &table_t,
    };
    let shape = [num_blocks, page, hk, d];
    let got = varlen_fwd_paged(&t(&q, &[tq, hq, d]), &t(&kp, &shape), &t(&vp, &shape), &paged, &c.opts.attn()).unwrap();
    (want, got)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Paged keys give bitwise the contiguous result (which cpu_reference.rs checks against the f64
    /// reference): any page size, block order, spare blocks and table entries past the used ones.
    #[test]
    fn paged_varlen_is_bitwise_contiguous(c in paged_case()) {
        let (want, got) = run_paged(&c);
        let ((wo, wl), (go, gl)) = (outputs(&want), outputs(&got));
        prop_assert_eq!(got.out.shape(), want.out.shape());
        prop_assert_eq!(bits(&go), bits(&wo), "out");
        prop_assert_eq!(bits(&gl), bits(&wl), "lse");
    }
}

// ---------------------------------------------------------------------------------------------------
// KV cache

/// One KV-cache call. Per batch entry (cache_seqlens, cache_leftpad); the caches hold `capacity`
/// entries per row (a multiple of the page size when paged).
#[derive(Clone, Debug)]
struct KvCase {
    dtype: DType,
    d: usize,
    heads: (usize, usize),
    opts: Opts,
    sq: usize,
    s_new: usize,
    capacity: usize,
    rows: Vec<(usize, usize)>,
    leftpad: bool,
    /// Contiguous caches only: rows picked through cache_batch_idx from a larger cache.
    batch_idx: bool,
    page_size: Option<usize>,
    /// (rotary_dim / 2 as a fraction of D / 2, interleaved, tables in f32).
    rotary: Option<(usize, bool, bool)>,
    num_splits: usize,
    seed: u64,
}

fn kv_case() -> impl Strategy<Value = KvCase> {
    let shape = (prop_oneof![3 => 1usize..=2, 1 => 0usize..=5, 1 => 60usize..=70], prop_oneof![Just(0usize), Just(1), 2usize..=5], 1usize..=160, proptest::collection::vec(any::<(u32, u32)>(), 1..=3));
    let layout = (any::<bool>(), any::<bool>(), prop_oneof![2 => Just(None), 1 => Just(Some(1usize)), 1 => Just(Some(16)), 1 => (2usize..=40).prop_map(Some)]);
    let rotary = prop_oneof![1 => Just(None), 2 => (1usize..=4, any::<bool>(), any::<bool>()).prop_map(Some)];
    (dtype(), proptest::sample::select(vec![32usize, 64, 128]), heads(), opts(), shape, layout, rotary, 0usize..=5, any::<u64>()).prop_map(
        |(dtype, d, heads, opts, (sq, s_new, cap, raw), (leftpad, batch_idx, page_size), rotary, num_splits, seed)| {
            let capacity = match page_size {
                Some(p) => (cap + s_new).div_ceil(p) * p,
                None => cap + s_new,
            };
            let rows = raw
                .iter()
                .map(|&(a, b)| {
                    let seqlen = a as usize % (capacity - s_new + 1);
                    (seqlen, b as usize % (seqlen + 1))
                })
                .collect();
            KvCase { dtype, d, heads, opts, sq, s_new, capacity, rows, leftpad, batch_idx: batch_idx && page_size.is_none(), page_size, rotary, num_splits, seed }
        },
    )
}

/// A case's inputs, laid out, with what the reference needs.
struct KvInputs {
    q: Vec<f32>,
    k_new: Vec<f32>,
    v_new: Vec<f32>,
    /// Per batch entry, the logical cache row `[capacity, Hk, D]` before the call (NaN where not valid).
    k_rows: Vec<Vec<f32>>,
    v_rows: Vec<Vec<f32>>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    /// Where batch entry b's row lives: a row of the contiguous cache, or its pages.
    cache_row: Vec<usize>,
    table: Vec<Vec<usize>>,
    cache_entries: usize,
}

impl KvCase {
    fn b(&self) -> usize {
        self.rows.len()
    }

    fn inputs(&self) -> KvInputs {
        let (hq, hk) = self.heads;
        let (b, d, cap) = (self.b(), self.d, self.capacity);
        let mut rng = rng(self.seed);
        let rotary = self.rotary.is_some();
        let draw = |rng: &mut StdRng, n: usize, amp: f32| if rotary { grid_values(rng, n, amp) } else { random_values(rng, n, amp, self.dtype) };
        let q = draw(&mut rng, b * self.sq * hq * d, 2.0);
        let k_new = draw(&mut rng, b * self.s_new * hk * d, 2.0);
        let v_new = random_values(&mut rng, b * self.s_new * hk * d, 1.0, self.dtype);
        let row = |rng: &mut StdRng, (seqlen, leftpad): (usize, usize), amp: f32| {
            let mut x = vec![f32::NAN; cap * hk * d];
            let first = if self.leftpad { leftpad } else { 0 };
            x[first * hk * d..seqlen * hk * d].copy_from_slice(&random_values(rng, (seqlen - first) * hk * d, amp, self.dtype));
            x
        };
        let k_rows: Vec<Vec<f32>> = self.rows.iter().map(|&r| row(&mut rng, r, 2.0)).collect();
        let v_rows: Vec<Vec<f32>> = self.rows.iter().map(|&r| row(&mut rng, r, 1.0)).collect();
        let (half, (cos, sin)) = match self.rotary {
            Some((frac, ..)) => {
                let half = d / 2 * frac / 4;
                (half.max(1), rotary_tables(cap + self.sq + 2, half.max(1)))
            }
            None => (0, (vec![], vec![])),
        };
        let (cache_row, table, cache_entries) = match self.page_size {
            Some(page) => {
                let per_row = cap / page;
                let num_blocks = b * per_row + rng.gen_range(0..3);
                let mut pool: Vec<usize> = (0..num_blocks).collect();
                pool.shuffle(&mut rng);
                let table = (0..b).map(|i| pool[i * per_row..(i + 1) * per_row].to_vec()).collect();
                (vec![], table, num_blocks)
            }
            None if self.batch_idx => {
                let rows = b + rng.gen_range(0..3);
                let mut pool: Vec<usize> = (0..rows).collect();
                pool.shuffle(&mut rng);
                (pool[..b].to_vec(), vec![], rows)
            }
            None => (vec![], vec![], b + rng.gen_range(0..2)),
        };
        KvInputs { q, k_new, v_new, k_rows, v_rows, cos, sin, half, cache_row, table, cache_entries }
    }

    /// The caches laid out from logical rows: `[entries, capacity or page, Hk, D]`, NaN where unused.
    fn lay_out(&self, x: &KvInputs, rows: &[Vec<f32>]) -> (Vec<f32>, Vec<usize>) {
        let (hk, d) = (self.heads.1, self.d);
        let w = hk * d;
        match self.page_size {
            Some(page) => {
                let mut out = vec![f32::NAN; x.cache_entries * page * w];
                for (b, r) in rows.iter().enumerate() {
                    for t in 0..self.capacity {
                        let at = (x.table[b][t / page] * page + t % page) * w;
                        out[at..at + w].copy_from_slice(&r[t * w..][..w]);
                    }
                }
                (out, vec![x.cache_entries, page, hk, d])
            }
            None => {
                let mut out = vec![f32::NAN; x.cache_entries * self.capacity * w];
                for (b, r) in rows.iter().enumerate() {
                    let row = if self.batch_idx { x.cache_row[b] } else { b };
                    out[row * self.capacity * w..][..self.capacity * w].copy_from_slice(r);
                }
                (out, vec![x.cache_entries, self.capacity, hk, d])
            }
        }
    }

    fn kv_options(&self) -> KvCacheOptions {
        KvCacheOptions { rotary_interleaved: self.rotary.is_some_and(|r| r.1), num_splits: self.num_splits }
    }

    /// Runs the library on the case; returns its out and lse and the caches afterwards.
    fn run(&self, x: &KvInputs, num_splits: usize) -> Result<(FwdOutput, Tensor, Tensor)> {
        self.run_on(x, num_splits, Device::Cpu, None)
    }

    /// `run` on `device` (the results brought back to the host), with ALiBi `[Hq]` if given.
    fn run_on(&self, x: &KvInputs, num_splits: usize, device: Device, alibi: Option<&[f32]>) -> Result<(FwdOutput, Tensor, Tensor)> {
        let (hq, hk) = self.heads;
        let (b, d) = (self.b(), self.d);
        let t = |v: &[f32], shape: &[usize], dtype: DType| Tensor::from_f32(v, shape, dtype).unwrap().to_device(device).unwrap();
        let i32s = |x: &[usize]| i32s(x).to_device(device).unwrap();
        let (kc, shape) = self.lay_out(x, &x.k_rows);
        let (vc, _) = self.lay_out(x, &x.v_rows);
        let (mut k_cache, mut v_cache) = (t(&kc, &shape, self.dtype), t(&vc, &shape, self.dtype));
        let q = t(&x.q, &[b, self.sq, hq, d], self.dtype);
        let new_shape = [b, self.s_new, hk, d];
        let (k_new, v_new) = (t(&x.k_new, &new_shape, self.dtype), t(&x.v_new, &new_shape, self.dtype));
        let seqlens = i32s(&self.rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let leftpad = i32s(&self.rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let batch_idx = i32s(&x.cache_row);
        let table = self.page_size.map(|page| Tensor::from_i32(x.table.iter().flatten().map(|&e| e as i32).collect(), &[b, self.capacity / page]).unwrap().to_device(device).unwrap());
        let table_dtype = if self.rotary.is_some_and(|r| r.2) { DType::F32 } else { self.dtype };
        let s_ro = x.cos.len() / x.half.max(1);
        let (cos, sin) = (t(&x.cos, &[s_ro, x.half], table_dtype), t(&x.sin, &[s_ro, x.half], table_dtype));
        let mut cache = KvCache::new(&seqlens);
        if self.s_new > 0 {
            (cache.k_new, cache.v_new) = (Some(&k_new), Some(&v_new));
        }
        if self.rotary.is_some() {
            (cache.rotary_cos, cache.rotary_sin) = (Some(&cos), Some(&sin));
        }
        if self.leftpad {
            cache.cache_leftpad = Some(&leftpad);
        }
        if self.batch_idx {
            cache.cache_batch_idx = Some(&batch_idx);
        }
        cache.block_table = table.as_ref();
        let slopes = alibi.map(|s| Tensor::from_f32(s, &[s.len()], DType::F32).unwrap().to_device(device).unwrap());
        cache.alibi_slopes = slopes.as_ref();
        let kv = KvCacheOptions { num_splits, ..self.kv_options() };
        let o = fwd_kvcache(&q, &mut k_cache, &mut v_cache, &cache, &self.opts.attn(), &kv)?;
        let host = |t: &Tensor| t.to_device(Device::Cpu).unwrap();
        Ok((FwdOutput { out: host(&o.out), lse: host(&o.lse), s_dmask: None }, host(&k_cache), host(&v_cache)))
    }

    /// The reference: out `[B, Sq, Hq, D]`, lse `[B, Hq, Sq]` in f64, and the logical cache rows after the
    /// append.
    fn reference(&self, x: &KvInputs) -> (Vec<f64>, Vec<f64>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (hq, hk) = self.heads;
        let (d, sq, s_new) = (self.d, self.sq, self.s_new);
        let w = hk * d;
        let interleaved = self.rotary.is_some_and(|r| r.1);
        let o = self.opts.reference(d);
        // flash-attn: q rows take their own positions under causal or local attention: a window side
        // below the capacity (flash-attn drops the others), or a right side below the query count (it
        // masks some row, also with more queries than the cache holds).
        let binds = |s: i64, n: usize| s >= 0 && (s as usize) < n;
        let q_per_row = o.causal || binds(o.window.0, self.capacity) || binds(o.window.1, self.capacity) || binds(o.window.1, sq);
        let (mut out, mut lse) = (Vec::new(), Vec::new());
        let (mut k_after, mut v_after) = (x.k_rows.clone(), x.v_rows.clone());
        for (b, &(seqlen, leftpad)) in self.rows.iter().enumerate() {
            let first = if self.leftpad { leftpad } else { 0 };
            for i in 0..s_new {
                for h in 0..hk {
                    let at = ((b * s_new + i) * hk + h) * d;
                    let mut kr: Vec<f64> = x.k_new[at..at + d].iter().map(|&v| v as f64).collect();
                    if self.rotary.is_some() {
                        rotate_ref(&mut kr, seqlen + i, &x.cos, &x.sin, x.half, interleaved);
                    }
                    let dst = (seqlen + i) * w + h * d;
                    for (e, &v) in kr.iter().enumerate() {
                        k_after[b][dst + e] = round(v as f32, self.dtype);
                        v_after[b][dst + e] = x.v_new[at + e];
                    }
                }
            }
            let mut q: Vec<f32> = x.q[b * sq * hq * d..][..sq * hq * d].to_vec();
            if self.rotary.is_some() {
                for (r, head) in q.chunks_exact_mut(d).enumerate() {
                    let i = r / hq;
                    let mut h64: Vec<f64> = head.iter().map(|&v| v as f64).collect();
                    rotate_ref(&mut h64, seqlen + if q_per_row { i } else { 0 }, &x.cos, &x.sin, x.half, interleaved);
                    head.iter_mut().zip(&h64).for_each(|(a, &v)| *a = round(v as f32, self.dtype));
                }
            }
            let end = seqlen + s_new;
            let (k, v) = (&k_after[b][first * w..end * w], &v_after[b][first * w..end * w]);
            let (o1, l1) = reference_attention(&q, k, v, sq, end - first, hq, hk, d, &o);
            out.extend(o1);
            lse.extend(l1);
        }
        (out, lse, k_after, v_after)
    }
}

fn run_kv_case(c: &KvCase) -> std::result::Result<(), String> {
    run_kv_case_on(c, Device::Cpu)
}

/// The case on `device` against the reference (the GPU kernels' tolerance on CUDA); the caches
/// afterwards bitwise what the reference appends (every other entry, NaN or not, unchanged).
fn run_kv_case_on(c: &KvCase, device: Device) -> std::result::Result<(), String> {
    let x = c.inputs();
    let (o, k_cache, v_cache) = c.run_on(&x, c.num_splits, device, None).map_err(|e| e.to_string())?;
    let (ref_out, ref_lse, k_after, v_after) = c.reference(&x);
    let (out, lse) = outputs(&o);
    let r = c.opts.reference(c.d);
    let qmax = if c.rotary.is_some() { 4.0 } else { 2.0 };
    let tol = match device {
        Device::Cpu => tolerance(&r, c.dtype, c.d, qmax, 4.0, 1.0),
        Device::Cuda(_) => {
            let mut smax = r.scale.abs() * c.d as f64 * qmax * 4.0;
            if r.softcap > 0.0 {
                smax = smax.min(r.softcap);
            }
            gpu_tolerance(c.dtype, 1.0, smax)
        }
    };
    check_close(&out, &lse, &ref_out, &ref_lse, &tol)?;
    // Only the appended entries of the caches change, to the rounded rotated k_new and to v_new.
    for (name, got, rows) in [("k_cache", &k_cache, &k_after), ("v_cache", &v_cache, &v_after)] {
        let (want, shape) = c.lay_out(&x, rows);
        let want = Tensor::from_f32(&want, &shape, c.dtype).unwrap().to_bytes().unwrap();
        if got.to_bytes().unwrap() != want {
            return Err(format!("{name} after the call differs from the expected append"));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Append + rotary (both layouts, tables in q's dtype or f32), leftpad, batch_idx, paged or not, any
    /// split count: out and lse against the f64 reference, the caches exactly as the reference appends.
    #[test]
    fn kvcache_matches_reference(c in kv_case()) {
        run_kv_case(&c).map_err(TestCaseError::fail)?;
    }

    /// The same cache paged gives bitwise what it gives contiguous, caches included.
    #[test]
    fn paged_kvcache_is_bitwise_contiguous(c in kv_case(), page in prop_oneof![Just(1usize), Just(7), Just(16), Just(64)]) {
        let mut contiguous = KvCase { page_size: None, batch_idx: false, ..c.clone() };
        contiguous.capacity = c.capacity.div_ceil(page) * page;
        let paged = KvCase { page_size: Some(page), ..contiguous.clone() };
        let (xc, xp) = (contiguous.inputs(), paged.inputs());
        let (oc, kc, vc) = contiguous.run(&xc, c.num_splits).unwrap();
        let (op, kp, vp) = paged.run(&xp, c.num_splits).unwrap();
        prop_assert_eq!(bits(&outputs(&op).0), bits(&outputs(&oc).0), "out");
        prop_assert_eq!(bits(&outputs(&op).1), bits(&outputs(&oc).1), "lse");
        // The caches, gathered back to logical rows through each layout.
        for (name, got_p, got_c) in [("k_cache", &kp, &kc), ("v_cache", &vp, &vc)] {
            let (p, cc) = (got_p.to_f32_vec().unwrap(), got_c.to_f32_vec().unwrap());
            let (hk, d) = (c.heads.1, c.d);
            let w = hk * d;
            for (b, table) in xp.table.iter().enumerate() {
                for t in 0..paged.capacity {
                    let at_p = (table[t / page] * page + t % page) * w;
                    let at_c = (b * contiguous.capacity + t) * w;
                    prop_assert_eq!(bits(&p[at_p..at_p + w]), bits(&cc[at_c..at_c + w]), "{} row {} entry {}", name, b, t);
                }
            }
        }
    }

    /// Every split count gives the unsplit result up to rounding; one split is bitwise the default
    /// path's (the heuristic picks one for these small problems on few threads or some other count).
    #[test]
    fn splits_agree_within_rounding(c in kv_case(), n in 2usize..=9) {
        let x = c.inputs();
        let (one, ..) = c.run(&x, 1).unwrap();
        let (o1, l1) = outputs(&one);
        let u = unit_roundoff(c.dtype) as f32;
        for splits in [n, 0] {
            let (many, ..) = c.run(&x, splits).unwrap();
            let (on, ln) = outputs(&many);
            for (i, (&a, &b)) in on.iter().zip(&o1).enumerate() {
                prop_assert!((a - b).abs() <= 2.0 * u * a.abs().max(b.abs()) + 1e-5, "splits {}: out[{}] {} vs {}", splits, i, a, b);
            }
            for (i, (&a, &b)) in ln.iter().zip(&l1).enumerate() {
                let ok = if b == f32::NEG_INFINITY { a == b } else { (a - b).abs() <= 2f32.powi(-20) * (1.0 + b.abs()) };
                prop_assert!(ok, "splits {}: lse[{}] {} vs {}", splits, i, a, b);
            }
        }
    }
}

/// Hand-made rows: leftpad entries and rows cache_batch_idx does not pick are NaN and never read; the
/// appended rows land at cache_seqlens[b] of the picked row; rotary positions count from the cache
/// start, not from the leftpad.
#[test]
fn leftpad_and_batch_idx() {
    let (seed, mut rng) = seeded("leftpad_and_batch_idx");
    for c in leftpad_cases(&mut rng) {
        run_kv_case(&c).unwrap_or_else(|e| panic!("seed {seed}: {c:?}: {e}"));
    }
}

/// `leftpad_and_batch_idx`'s rows, causal or not, paged (pages of 8) or picked by cache_batch_idx.
fn leftpad_cases(rng: &mut StdRng) -> Vec<KvCase> {
    let mut cases = Vec::new();
    for (causal, paged) in [(false, false), (true, false), (true, true), (false, true)] {
        cases.push(KvCase {
            dtype: DType::BF16,
            d: 64,
            heads: (4, 2),
            opts: Opts { causal, window: (-1, -1), softcap: 0.0, scale: None, kernels: Default::default() },
            sq: 3,
            s_new: 2,
            capacity: 48,
            rows: vec![(20, 5), (0, 0), (46, 46), (31, 30)],
            leftpad: true,
            batch_idx: !paged,
            page_size: paged.then_some(8),
            rotary: Some((4, rng.r#gen(), rng.r#gen())),
            num_splits: rng.gen_range(0..4),
            seed: rng.r#gen(),
        });
    }
    cases
}

/// q's rotary positions follow the window: more query rows (8) than the cache holds (4), where a right
/// side between the two still masks some rows (per-row positions, as causal) and one of at least the
/// query count does not (every row at cache_seqlens); and few query rows (2) on a larger cache (16),
/// where a side below the capacity makes the call local as in flash-attn (per-row positions) although it
/// masks nothing, and one at or above it does not.
#[test]
fn rotary_positions_follow_the_window() {
    let (seed, mut rng) = seeded("rotary_positions_follow_the_window");
    for (window, sq, capacity, rows) in [
        ((-1, 5), 8, 4, vec![(2, 0), (3, 0)]),
        ((-1, 3), 8, 4, vec![(2, 0), (3, 0)]),
        ((-1, 8), 8, 4, vec![(2, 0), (3, 0)]),
        ((2, 6), 8, 4, vec![(2, 0), (3, 0)]),
        ((-1, 3), 2, 16, vec![(5, 0), (9, 0)]),
        ((-1, 15), 2, 16, vec![(5, 0), (9, 0)]),
        ((-1, 16), 2, 16, vec![(5, 0), (9, 0)]),
        ((40, -1), 2, 16, vec![(5, 0), (9, 0)]),
        ((12, 30), 2, 16, vec![(5, 0), (14, 0)]),
    ] {
        let c = KvCase {
            dtype: DType::F16,
            d: 32,
            heads: (2, 1),
            opts: Opts { causal: false, window, softcap: 0.0, scale: None, kernels: Default::default() },
            sq,
            s_new: 1,
            capacity,
            rows,
            leftpad: false,
            batch_idx: false,
            page_size: None,
            rotary: Some((4, rng.r#gen(), rng.r#gen())),
            num_splits: 1,
            seed: rng.r#gen(),
        };
        run_kv_case(&c).unwrap_or_else(|e| panic!("seed {seed}: window {window:?}: {e}"));
    }
}

/// A decode call on long caches (one new key, rotary on f32 tables, pages of 64): `heads`, `capacity`
/// and `rows` (cache_seqlens, no leftpad) given.
fn decode_case(dtype: DType, heads: (usize, usize), capacity: usize, rows: Vec<(usize, usize)>, seed: u64) -> KvCase {
    KvCase {
        dtype,
        d: 128,
        heads,
        opts: Opts { causal: true, window: (-1, -1), softcap: 0.0, scale: None, kernels: Default::default() },
        sq: 1,
        s_new: 1,
        capacity,
        rows,
        leftpad: false,
        batch_idx: false,
        page_size: Some(64),
        rotary: Some((4, false, true)),
        num_splits: 1,
        seed,
    }
}

/// Decode on a long cache: one query row per sequence, many keys, the splits the heuristic would
/// choose on a GPU and more, all within rounding of one split and of the reference.
#[test]
fn decode_with_many_splits() {
    let (seed, mut rng) = seeded("decode_with_many_splits");
    let base = decode_case(DType::BF16, (8, 2), 1024, vec![(1000, 0), (700, 0)], rng.r#gen());
    for num_splits in [1, 3, 16, 17, 128] {
        let c = KvCase { num_splits, ..base.clone() };
        run_kv_case(&c).unwrap_or_else(|e| panic!("seed {seed}: splits {num_splits}: {e}"));
    }
}

#[test]
fn num_splits_heuristic() {
    use flash_attn::problem::{num_splits_heuristic as h, MAX_SPLITS};
    // Enough tiles for the processors: no split.
    assert_eq!(h(132, 1000, 132), 1);
    assert_eq!(h(106, 1000, 132), 1);
    // Decode, 32 heads on 132 processors: the first count that fills most of a wave.
    let s = h(32, 1000, 132);
    assert!((2..=8).contains(&s), "{s}");
    assert!(32 * s <= 2 * 132);
    // Never more splits than key blocks, nor than MAX_SPLITS; degenerate inputs give 1.
    assert_eq!(h(1, 3, 132), 3);
    assert!(h(1, 100_000, 100_000) <= MAX_SPLITS);
    for (t, k, p) in [(0, 10, 10), (1, 0, 10), (1, 1, 10), (1, 10, 0)] {
        assert_eq!(h(t, k, p), 1, "{t} {k} {p}");
    }
}

/// The decode kernels' split count: the cheapest count in the model within 5% (brute force); within 70%
/// of the ideal time (equal work on every processor, one key block of overhead per unit of work) where
/// splits of at least four key blocks can make four units of work per processor; the counts measured best on the H200 (Hq 32, Hk 8, 396 decode blocks: batch 64 / 8 / 1 at 32k and at
/// 1k keys), and the same bounds and degenerate inputs.
#[test]
fn num_splits_waves() {
    use flash_attn::problem::{num_splits_waves as w, MAX_SPLITS};
    assert_eq!(w(512, 512, 396), 3);
    assert_eq!(w(8, 512, 396), 47);
    assert_eq!(w(64, 512, 396), 6);
    assert_eq!(w(512, 16, 396), 2);
    assert_eq!(w(64, 16, 396), 6);
    assert_eq!(w(8, 16, 396), 16);
    for (t, k, p) in [(0, 10, 10), (1, 0, 10), (1, 1, 10), (1, 10, 0), (1000, 1, 396)] {
        assert_eq!(w(t, k, p), 1, "{t} {k} {p}");
    }
    let (seed, mut rng) = seeded("num_splits_waves");
    for _ in 0..2000 {
        let (t, k, p) = (rng.gen_range(1..5000usize), rng.gen_range(32..5000usize), rng.gen_range(1..2000usize));
        let s = w(t, k, p);
        assert!((1..=MAX_SPLITS.min(k)).contains(&s), "seed {seed}: {t} {k} {p}: {s}");
        let cost_of = |s: usize| (t * s).div_ceil(p) * (k.div_ceil(s) + 1);
        let (cost, best) = (cost_of(s), (1..=MAX_SPLITS.min(k)).map(cost_of).min().unwrap());
        assert!(cost as f64 <= 1.05 * best as f64, "seed {seed}: tiles {t}, key blocks {k}, processors {p}: {s} splits cost {cost}, the best {best}");
        let ideal = (t * (k + 1)) as f64 / p as f64;
        // Where splits of four key blocks or more can make at least four units of work per processor.
        assert!(ideal / cost as f64 >= 0.7 || t * (k / 4).min(MAX_SPLITS) < 4 * p, "seed {seed}: tiles {t}, key blocks {k}, processors {p}: {s} splits at {:.2} of the ideal", ideal / cost as f64);
    }
}

// ---------------------------------------------------------------------------------------------------
// Combine

/// The merge in f64, from the definition: lse = log sum exp(lse_i), out = sum exp(lse_i - lse) out_i.
fn merge_ref(lses: &[f64], outs: &[&[f64]]) -> (Vec<f64>, f64) {
    let d = outs.first().map_or(0, |o| o.len());
    let total: f64 = lses.iter().map(|l| l.exp()).sum();
    if total == 0.0 {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let lse = total.ln();
    let out = (0..d).map(|x| lses.iter().zip(outs).map(|(l, o)| (l - lse).exp() * o[x]).sum()).collect();
    (out, lse)
}

/// |a - b| within one unit in the last place of `dtype` at b's magnitude (the merge is rounded once),
/// or among f16's subnormals one unit of their fixed spacing, 2^-24.
fn within_ulp(a: f32, b: f64, dtype: DType) -> bool {
    if b == 0.0 || b == f64::NEG_INFINITY {
        return a as f64 == b;
    }
    let subnormal = if dtype == DType::F16 { 2f64.powi(-24) } else { 0.0 };
    (a as f64 - b).abs() <= 2.0 * unit_roundoff(dtype) * b.abs() + subnormal
}

#[test]
fn combine_is_the_exact_merge() {
    let (seed, mut rng) = seeded("combine_is_the_exact_merge");
    for trial in 0..40 {
        let n = rng.gen_range(0..6);
        let packed = rng.gen_bool(0.5);
        let (b, s, h, d) = (rng.gen_range(1..3), rng.gen_range(0..9), rng.gen_range(1..4), [1, 8, 64][rng.gen_range(0..3)]);
        let dtype = [DType::F32, DType::BF16, DType::F16][trial % 3];
        let (out_shape, lse_shape) = if packed { (vec![n, s, h, d], vec![n, h, s]) } else { (vec![n, b, s, h, d], vec![n, b, h, s]) };
        let bb = if packed { 1 } else { b };
        let po: Vec<f32> = random_values(&mut rng, n * bb * s * h * d, 3.0, dtype);
        // LSEs spread over a wide range, some partials empty (-inf), some rows empty in every partial.
        let pl: Vec<f32> = (0..n * bb * h * s).map(|i| if i % 7 == 3 || rng.gen_bool(0.15) { f32::NEG_INFINITY } else { rng.gen_range(-40.0f32..40.0) }).collect();
        let o = combine(&Tensor::from_f32(&po, &out_shape, dtype).unwrap(), &Tensor::from_f32(&pl, &lse_shape, DType::F32).unwrap()).unwrap();
        assert_eq!(o.out.shape(), &out_shape[1..]);
        assert_eq!(o.lse.shape(), &lse_shape[1..]);
        let (out, lse) = outputs(&o);
        for bi in 0..bb {
            for si in 0..s {
                for hi in 0..h {
                    let lses: Vec<f64> = (0..n).map(|i| pl[((i * bb + bi) * h + hi) * s + si] as f64).collect();
                    let rows: Vec<Vec<f64>> = (0..n).map(|i| po[(((i * bb + bi) * s + si) * h + hi) * d..][..d].iter().map(|&x| x as f64).collect()).collect();
                    let (ro, rl) = merge_ref(&lses, &rows.iter().map(|r| &r[..]).collect::<Vec<_>>());
                    let l = lse[(bi * h + hi) * s + si];
                    assert!(within_ulp(l, rl, DType::F32), "seed {seed} trial {trial}: lse {l} vs {rl}");
                    for (x, &r) in ro.iter().enumerate() {
                        let g = out[((bi * s + si) * h + hi) * d + x];
                        assert!(within_ulp(g, r, dtype), "seed {seed} trial {trial}: out {g} vs {r} ({dtype})");
                    }
                }
            }
        }
    }
}

/// Context parallelism in small: attention over two halves of the keys, combined, is attention over all
/// of them (up to rounding), in the library's own out / lse layouts.
#[test]
fn combine_of_key_shards_is_attention_over_all_keys() {
    let (seed, mut rng) = seeded("combine_of_key_shards_is_attention_over_all_keys");
    let (b, sq, sk, hq, hk, d) = (2, 19, 150, 4, 2, 64);
    let q = random_values(&mut rng, b * sq * hq * d, 1.0, DType::F16);
    let k = random_values(&mut rng, b * sk * hk * d, 1.0, DType::F16);
    let v = random_values(&mut rng, b * sk * hk * d, 1.0, DType::F16);
    let cut = rng.gen_range(1..sk);
    let keys = |x: &[f32], lo: usize, hi: usize| {
        let rows: Vec<f32> = (0..b).flat_map(|bi| x[(bi * sk + lo) * hk * d..(bi * sk + hi) * hk * d].to_vec()).collect();
        Tensor::from_f32(&rows, &[b, hi - lo, hk, d], DType::F32).unwrap()
    };
    let f16 = |t: Tensor| Tensor::from_f32(&t.to_f32_vec().unwrap(), t.shape(), DType::F16).unwrap();
    let qt = Tensor::from_f32(&q, &[b, sq, hq, d], DType::F16).unwrap();
    let opts = AttnOptions { softcap: 3.0, ..Default::default() };
    let whole = fwd(&qt, &f16(keys(&k, 0, sk)), &f16(keys(&v, 0, sk)), &opts).unwrap();
    let a = fwd(&qt, &f16(keys(&k, 0, cut)), &f16(keys(&v, 0, cut)), &opts).unwrap();
    let c = fwd(&qt, &f16(keys(&k, cut, sk)), &f16(keys(&v, cut, sk)), &opts).unwrap();
    let stack = |x: &Tensor, y: &Tensor, dtype| {
        let mut all = x.to_f32_vec().unwrap();
        all.extend(y.to_f32_vec().unwrap());
        let mut shape = vec![2];
        shape.extend_from_slice(x.shape());
        Tensor::from_f32(&all, &shape, dtype).unwrap()
    };
    let merged = combine(&stack(&a.out, &c.out, DType::F16), &stack(&a.lse, &c.lse, DType::F32)).unwrap();
    let (mo, ml) = outputs(&merged);
    let (wo, wl) = outputs(&whole);
    let u = unit_roundoff(DType::F16) as f32;
    for (i, (&x, &y)) in mo.iter().zip(&wo).enumerate() {
        // Each half's out was rounded to f16 before the merge: two roundings, plus f32 noise.
        assert!((x - y).abs() <= 3.0 * u * y.abs() + 1e-4, "seed {seed}: out[{i}] {x} vs {y}");
    }
    for (i, (&x, &y)) in ml.iter().zip(&wl).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "seed {seed}: lse[{i}] {x} vs {y}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Errors

/// Asserts `r` failed with an error `is` accepts, whose message mentions `name`.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: Result<T>, is: impl Fn(&Error) -> bool, name: &str) {
    let e = r.expect_err("call must fail");
    assert!(is(&e), "unexpected error variant: {e:?}");
    assert!(e.to_string().contains(name), "message {:?} does not name {name:?}", e.to_string());
}

/// A valid KV-cache call whose parts the error tests replace one at a time: B = 2, Sq = 1, S_new = 2,
/// caches `[3, 16, 2, 64]` (or 6 pages of 8), rotary `[20, 16]`.
struct Bad {
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    k_new: Option<Tensor>,
    v_new: Option<Tensor>,
    cos: Option<Tensor>,
    sin: Option<Tensor>,
    batch_idx: Option<Tensor>,
    leftpad: Option<Tensor>,
    table: Option<Tensor>,
    opts: AttnOptions,
    kv: KvCacheOptions,
}

fn zeros(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(shape, dtype, flash_attn::Device::Cpu).unwrap()
}

fn ints(x: &[i32], shape: &[usize]) -> Tensor {
    Tensor::from_i32(x.to_vec(), shape).unwrap()
}

impl Bad {
    fn contiguous() -> Bad {
        Bad {
            q: zeros(&[2, 1, 4, 64], DType::BF16),
            k_cache: zeros(&[3, 16, 2, 64], DType::BF16),
            v_cache: zeros(&[3, 16, 2, 64], DType::BF16),
            seqlens: ints(&[5, 14], &[2]),
            k_new: Some(zeros(&[2, 2, 2, 64], DType::BF16)),
            v_new: Some(zeros(&[2, 2, 2, 64], DType::BF16)),
            cos: Some(zeros(&[20, 16], DType::F32)),
            sin: Some(zeros(&[20, 16], DType::F32)),
            batch_idx: Some(ints(&[2, 0], &[2])),
            leftpad: Some(ints(&[1, 0], &[2])),
            table: None,
            opts: AttnOptions { causal: true, ..Default::default() },
            kv: KvCacheOptions::default(),
        }
    }
    fn paged() -> Bad {
        Bad {
            k_cache: zeros(&[6, 8, 2, 64], DType::BF16),
            v_cache: zeros(&[6, 8, 2, 64], DType::BF16),
            batch_idx: None,
            table: Some(ints(&[0, 1, 5, 3, 2, 4], &[2, 3])),
            seqlens: ints(&[5, 20], &[2]),
            cos: Some(zeros(&[23, 16], DType::F32)),
            sin: Some(zeros(&[23, 16], DType::F32)),
            ..Bad::contiguous()
        }
    }
    fn run(&mut self) -> Result<FwdOutput> {
        let cache = KvCache {
            cache_seqlens: &self.seqlens,
            block_table: self.table.as_ref(),
            k_new: self.k_new.as_ref(),
            v_new: self.v_new.as_ref(),
            rotary_cos: self.cos.as_ref(),
            rotary_sin: self.sin.as_ref(),
            cache_batch_idx: self.batch_idx.as_ref(),
            cache_leftpad: self.leftpad.as_ref(),
            alibi_slopes: None,
        };
        fwd_kvcache(&self.q, &mut self.k_cache, &mut self.v_cache, &cache, &self.opts, &self.kv)
    }
}

#[test]
fn kvcache_errors_name_the_argument() {
    assert!(Bad::contiguous().run().is_ok());
    assert!(Bad::paged().run().is_ok());
    let shape = |e: &Error, a: &str| matches!(e, Error::Shape { arg, .. } if *arg == a);
    let value = |e: &Error, a: &str| matches!(e, Error::Value { arg, .. } if *arg == a);
    let seqlens = |e: &Error, a: &str| matches!(e, Error::SeqLens { arg, .. } if *arg == a);

    // Dtypes and shapes.
    let mut b = Bad::contiguous();
    b.k_cache = zeros(&[3, 16, 2, 64], DType::F16);
    expect_err(b.run(), |e| matches!(e, Error::DTypeMismatch { arg: "k_cache", .. }), "k_cache");
    let mut b = Bad::contiguous();
    b.v_cache = zeros(&[3, 15, 2, 64], DType::BF16);
    expect_err(b.run(), |e| shape(e, "v_cache"), "v_cache");
    let mut b = Bad::contiguous();
    b.q = zeros(&[2, 4, 64], DType::BF16);
    expect_err(b.run(), |e| matches!(e, Error::Rank { arg: "q", .. }), "q");
    let mut b = Bad::contiguous();
    b.k_new = Some(zeros(&[2, 2, 2, 64], DType::F16));
    expect_err(b.run(), |e| matches!(e, Error::DTypeMismatch { arg: "k_new", .. }), "k_new");
    let mut b = Bad::contiguous();
    b.v_new = Some(zeros(&[2, 3, 2, 64], DType::BF16));
    expect_err(b.run(), |e| shape(e, "v_new"), "v_new");
    let mut b = Bad::contiguous();
    b.k_new = Some(zeros(&[1, 2, 2, 64], DType::BF16));
    expect_err(b.run(), |e| shape(e, "k_new"), "k_new");
    let mut b = Bad::contiguous();
    b.v_new = None;
    expect_err(b.run(), |e| value(e, "v_new"), "v_new");
    let mut b = Bad::contiguous();
    b.seqlens = ints(&[5, 14, 1], &[3]);
    expect_err(b.run(), |e| shape(e, "cache_seqlens"), "cache_seqlens");
    let mut b = Bad::contiguous();
    b.seqlens = Tensor::from_f32(&[5.0, 14.0], &[2], DType::F32).unwrap();
    expect_err(b.run(), |e| matches!(e, Error::DType { arg: "cache_seqlens", .. }), "cache_seqlens");
    let mut b = Bad::contiguous();
    b.leftpad = Some(ints(&[0], &[1]));
    expect_err(b.run(), |e| shape(e, "cache_leftpad"), "cache_leftpad");
    let mut b = Bad::contiguous();
    (b.batch_idx, b.q) = (None, zeros(&[4, 1, 4, 64], DType::BF16));
    (b.seqlens, b.leftpad, b.k_new, b.v_new) = (ints(&[1, 1, 1, 1], &[4]), None, None, None);
    expect_err(b.run(), |e| shape(e, "k_cache"), "k_cache");

    // Rotary: odd or too large dims, mismatched tables, a wrong dtype, too few positions.
    let mut b = Bad::contiguous();
    (b.cos, b.sin) = (Some(zeros(&[20, 33], DType::F32)), Some(zeros(&[20, 33], DType::F32)));
    expect_err(b.run(), |e| value(e, "rotary_cos"), "rotary_cos");
    let mut b = Bad::contiguous();
    (b.cos, b.sin) = (Some(zeros(&[20, 0], DType::F32)), Some(zeros(&[20, 0], DType::F32)));
    expect_err(b.run(), |e| value(e, "rotary_cos"), "rotary_cos");
    // No positions at all: an error of the shape on both devices (CUDA never reads the positions).
    let mut b = Bad::contiguous();
    (b.cos, b.sin) = (Some(zeros(&[0, 16], DType::F32)), Some(zeros(&[0, 16], DType::F32)));
    expect_err(b.run(), |e| value(e, "rotary_cos"), "rotary_cos");
    let mut b = Bad::contiguous();
    b.sin = Some(zeros(&[20, 15], DType::F32));
    expect_err(b.run(), |e| shape(e, "rotary_sin"), "rotary_sin");
    let mut b = Bad::contiguous();
    b.sin = Some(zeros(&[20, 16], DType::BF16));
    expect_err(b.run(), |e| matches!(e, Error::DTypeMismatch { arg: "rotary_sin", .. }), "rotary_sin");
    let mut b = Bad::contiguous();
    (b.cos, b.sin) = (Some(zeros(&[20, 16], DType::F16)), Some(zeros(&[20, 16], DType::F16)));
    expect_err(b.run(), |e| matches!(e, Error::DType { arg: "rotary_cos", .. }), "rotary_cos");
    let mut b = Bad::contiguous();
    b.sin = None;
    expect_err(b.run(), |e| value(e, "rotary_sin"), "rotary_sin");
    let mut b = Bad::contiguous();
    (b.cos, b.sin) = (Some(zeros(&[15, 16], DType::F32)), Some(zeros(&[15, 16], DType::F32)));
    expect_err(b.run(), |e| value(e, "rotary_cos"), "rotary_cos"); // the new keys of row 1 reach position 15

    // Contents: negative lengths, leftpad past the end, capacity, batch rows.
    let mut b = Bad::contiguous();
    b.seqlens = ints(&[-1, 3], &[2]);
    expect_err(b.run(), |e| seqlens(e, "cache_seqlens"), "cache_seqlens");
    let mut b = Bad::contiguous();
    b.seqlens = ints(&[5, 15], &[2]);
    expect_err(b.run(), |e| seqlens(e, "cache_seqlens"), "cache_seqlens"); // 15 + 2 > 16
    let mut b = Bad::contiguous();
    b.leftpad = Some(ints(&[6, 0], &[2]));
    expect_err(b.run(), |e| seqlens(e, "cache_leftpad"), "cache_leftpad");
    let mut b = Bad::contiguous();
    b.leftpad = Some(ints(&[-1, 0], &[2]));
    expect_err(b.run(), |e| seqlens(e, "cache_leftpad"), "cache_leftpad");
    let mut b = Bad::contiguous();
    b.batch_idx = Some(ints(&[3, 0], &[2]));
    expect_err(b.run(), |e| value(e, "cache_batch_idx"), "cache_batch_idx");
    let mut b = Bad::contiguous();
    b.batch_idx = Some(ints(&[-1, 0], &[2]));
    expect_err(b.run(), |e| value(e, "cache_batch_idx"), "cache_batch_idx");
    // Two entries appending to one row at overlapping positions; without new keys sharing is fine.
    let mut b = Bad::contiguous();
    (b.batch_idx, b.seqlens) = (Some(ints(&[1, 1], &[2])), ints(&[5, 6], &[2]));
    expect_err(b.run(), |e| value(e, "cache_batch_idx"), "cache_batch_idx");
    (b.k_new, b.v_new) = (None, None);
    assert!(b.run().is_ok());

    // Paged: batch_idx refused, table entries outside the blocks, too few blocks, shared appends.
    let mut b = Bad::paged();
    b.batch_idx = Some(ints(&[0, 1], &[2]));
    expect_err(b.run(), |e| value(e, "cache_batch_idx"), "block_table");
    let mut b = Bad::paged();
    b.table = Some(ints(&[0, 1, 5, 3, 6, 4], &[2, 3]));
    expect_err(b.run(), |e| value(e, "block_table"), "block_table");
    let mut b = Bad::paged();
    b.table = Some(ints(&[0, 1, 5, 3, -1, 4], &[2, 3]));
    expect_err(b.run(), |e| value(e, "block_table"), "block_table");
    let mut b = Bad::paged();
    b.seqlens = ints(&[5, 23], &[2]);
    expect_err(b.run(), |e| seqlens(e, "cache_seqlens"), "block_table"); // 25 keys in 3 blocks of 8
    let mut b = Bad::paged();
    b.table = Some(ints(&[4, 1, 5, 3, 2, 4], &[2, 3]));
    expect_err(b.run(), |e| value(e, "block_table"), "both append"); // rows 0 and 1 append to block 4 row 5
    let mut b = Bad::paged();
    b.table = Some(ints(&[0, 1, 5], &[1, 3]));
    expect_err(b.run(), |e| shape(e, "block_table"), "block_table");
    let mut b = Bad::paged();
    b.table = Some(ints(&[0, 1, 5, 3, 2, 4], &[6]));
    expect_err(b.run(), |e| matches!(e, Error::Rank { arg: "block_table", .. }), "block_table");
    let mut b = Bad::paged();
    (b.k_cache, b.v_cache) = (zeros(&[6, 0, 2, 64], DType::BF16), zeros(&[6, 0, 2, 64], DType::BF16));
    expect_err(b.run(), |e| shape(e, "k_cache"), "page size");
    // Blocks before the leftpad are never read: garbage there is fine.
    let mut b = Bad::paged();
    (b.leftpad, b.table) = (Some(ints(&[0, 16], &[2])), Some(ints(&[0, 1, 5, 99, -7, 4], &[2, 3])));
    assert!(b.run().is_ok());

    // Options.
    let mut b = Bad::contiguous();
    b.kv.num_splits = 129;
    expect_err(b.run(), |e| value(e, "num_splits"), "num_splits");
    let mut b = Bad::contiguous();
    b.opts.window = (-2, 0);
    expect_err(b.run(), |e| value(e, "window"), "window");
}

#[test]
fn kvcache_raw_outputs_and_cuda() {
    // The caches are outputs when appending: they may not overlap each other or an input; the raw
    // layer on CUDA validates, then says the kernels do not exist yet.
    let (b, s, h, d) = (1, 8, 2, 64);
    let buf = vec![half::bf16::ZERO; 8 * b * s * h * d];
    let lse = vec![0.0f32; b * h];
    let seqlens = vec![3i32];
    let leak = |v: Vec<usize>| -> &'static [usize] { Box::leak(v.into_boxed_slice()) };
    let n = b * s * h * d;
    let at = |i: usize, shape: &'static [usize]| View { addr: buf.as_ptr() as u64 + (i * n * 2) as u64, dtype: DType::BF16, shape, strides: leak(contiguous(shape)) };
    let (qs, cs, ns) = (leak(vec![b, 1, h, d]), leak(vec![b, s, h, d]), leak(vec![b, 2, h, d]));
    let good = KvCacheViews {
        q: at(0, qs),
        k_cache: at(1, cs),
        v_cache: at(2, cs),
        cache_seqlens: View { addr: seqlens.as_ptr() as u64, dtype: DType::I32, shape: leak(vec![1]), strides: leak(vec![1]) },
        block_table: None,
        k_new: Some(at(3, ns)),
        v_new: Some(at(4, ns)),
        rotary_cos: None,
        rotary_sin: None,
        cache_batch_idx: None,
        cache_leftpad: None,
        out: at(5, qs),
        lse: View { addr: lse.as_ptr() as u64, dtype: DType::F32, shape: leak(vec![b, h, 1]), strides: leak(vec![h, 1, 1]) },
        alibi_slopes: None,
    };
    let o = AttnOptions::default();
    let kv = KvCacheOptions::default();
    let run = |t: KvCacheViews<'_>, target| unsafe { raw::fwd_kvcache(&t, &o, &kv, Workspace::default(), target) };
    assert!(run(good, Target::Cpu).is_ok());
    // (Host memory on a CUDA target: only calls that fail validation, before any launch, run here.)
    let cuda = Target::Cuda { ordinal: 0, stream: 0 };
    match raw::kvcache_workspace_bytes(&good, &o, &kv, cuda) {
        Ok(_) => assert!(flash_attn::cuda::available()),
        Err(e) => assert!(matches!(e, Error::Cuda(_)) && !flash_attn::cuda::available(), "{e:?}"),
    }
    assert_eq!(raw::kvcache_workspace_bytes(&good, &o, &kv, Target::Cpu).unwrap(), 0);
    for target in [Target::Cpu, cuda] {
        expect_err(run(KvCacheViews { v_cache: at(1, cs), ..good }, target), |e| matches!(e, Error::Value { arg: "k_cache", .. }), "v_cache");
        expect_err(run(KvCacheViews { k_new: Some(at(1, ns)), ..good }, target), |e| matches!(e, Error::Value { arg: "k_cache", .. }), "k_new");
        expect_err(run(KvCacheViews { out: at(0, qs), ..good }, target), |e| matches!(e, Error::Value { arg: "out", .. }), "q");
    }
    // Without new keys the caches are inputs: k_cache == v_cache is fine, out over them is not.
    let read_only = KvCacheViews { k_new: None, v_new: None, v_cache: at(1, cs), ..good };
    assert!(run(read_only, Target::Cpu).is_ok());
    expect_err(run(KvCacheViews { out: at(1, qs), ..read_only }, Target::Cpu), |e| matches!(e, Error::Value { arg: "out", .. }), "k_cache");

    // Paged varlen and combine on CUDA run in tests/gpu_paged.rs and below: here only their validation
    // before any launch.
    let qv = at(0, leak(vec![4, h, d]));
    let pages = at(1, leak(vec![2, 4, h, d]));
    let cu = [0i32, 4];
    let table = [1i32];
    let i32v = |x: &[i32], shape: &'static [usize]| View { addr: x.as_ptr() as u64, dtype: DType::I32, shape, strides: leak(contiguous(shape)) };
    let pv = PagedVarlenViews { cu_seqlens_q: i32v(&cu, leak(vec![2])), cu_seqlens_k: Some(i32v(&cu, leak(vec![2]))), max_seqlen_q: Some(4), max_seqlen_k: Some(4), seqused_q: None, seqused_k: None, block_table: i32v(&table, leak(vec![1, 1])) };
    let lse2 = vec![0.0f32; h * 4];
    let fv = raw::FwdViews { q: qv, k: pages, v: at(2, leak(vec![2, 4, h, d])), out: at(5, leak(vec![4, h, d])), lse: View { addr: lse2.as_ptr() as u64, dtype: DType::F32, shape: leak(vec![h, 4]), strides: leak(vec![4, 1]) }, alibi_slopes: None, s_dmask: None };
    assert!(unsafe { raw::varlen_fwd_paged(&fv, &pv, &o, Target::Cpu) }.is_ok());
    // Rows of k not 16-byte aligned: an error before anything runs.
    let odd_pages = View { addr: pages.addr + 2, ..pages };
    let odd_v = View { addr: fv.v.addr + 2, ..fv.v };
    expect_err(unsafe { raw::varlen_fwd_paged(&raw::FwdViews { k: odd_pages, v: odd_v, ..fv }, &pv, &o, cuda) }, |e| matches!(e, Error::Value { arg: "k" | "q", .. }), "16-byte aligned"); // q too where malloc gave this buffer less than 16-byte alignment
    expect_err(unsafe { raw::varlen_fwd_paged(&fv, &PagedVarlenViews { cu_seqlens_k: None, ..pv }, &o, cuda) }, |e| matches!(e, Error::Value { arg: "seqused_k", .. }), "seqused_k");
    let lse3 = vec![0.0f32; h * 4];
    let lse_out = View { addr: lse3.as_ptr() as u64, ..fv.lse };
    let cv = CombineViews { partial_out: at(6, leak(vec![1, 4, h, d])), partial_lse: View { addr: lse2.as_ptr() as u64, dtype: DType::F32, shape: leak(vec![1, h, 4]), strides: leak(vec![4 * h, 4, 1]) }, out: at(5, leak(vec![4, h, d])), lse: lse_out };
    assert!(unsafe { raw::combine(&cv, Target::Cpu) }.is_ok());
    for target in [Target::Cpu, cuda] {
        expect_err(unsafe { raw::combine(&CombineViews { out: at(6, leak(vec![4, h, d])), ..cv }, target) }, |e| matches!(e, Error::Value { arg: "out", .. }), "partial_out");
    }
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

#[test]
fn paged_varlen_errors_name_the_argument() {
    let q = zeros(&[6, 2, 64], DType::BF16);
    let pages = zeros(&[4, 4, 2, 64], DType::BF16);
    let (cu_q, cu_k) = (ints(&[0, 2, 6], &[3]), ints(&[0, 5, 8], &[3]));
    let table = ints(&[3, 0, 1, 2], &[2, 2]);
    let run = |cu_k: Option<&Tensor>, used_k: Option<&Tensor>, table: &Tensor, max_k: usize, pages: &Tensor| {
        let pv = PagedVarlen { cu_seqlens_q: &cu_q, cu_seqlens_k: cu_k, max_seqlen_q: Some(4), max_seqlen_k: Some(max_k), seqused_q: None, seqused_k: used_k, block_table: table };
        varlen_fwd_paged(&q, pages, pages, &pv, &AttnOptions::default())
    };
    assert!(run(Some(&cu_k), None, &table, 5, &pages).is_ok());
    let used = ints(&[8, 3], &[2]);
    assert!(run(None, Some(&used), &table, 8, &pages).is_ok());
    expect_err(run(None, None, &table, 5, &pages), |e| matches!(e, Error::Value { arg: "seqused_k", .. }), "seqused_k");
    // Too few blocks: 9 keys in 2 blocks of 4.
    expect_err(run(Some(&ints(&[0, 9, 12], &[3])), None, &table, 9, &pages), |e| matches!(e, Error::Value { arg: "block_table", .. }), "too few");
    expect_err(run(None, Some(&ints(&[9, 0], &[2])), &table, 9, &pages), |e| matches!(e, Error::Value { arg: "block_table", .. }), "block_table");
    expect_err(run(None, Some(&ints(&[-1, 0], &[2])), &table, 9, &pages), |e| matches!(e, Error::SeqLens { arg: "seqused_k", .. }), "negative");
    expect_err(run(Some(&cu_k), None, &ints(&[3, 4, 1, 2], &[2, 2]), 5, &pages), |e| matches!(e, Error::Value { arg: "block_table", .. }), "block_table");
    expect_err(run(Some(&cu_k), None, &ints(&[3, 0], &[1, 2]), 5, &pages), |e| matches!(e, Error::Shape { arg: "block_table", .. }), "block_table");
    expect_err(run(Some(&cu_k), None, &table, 4, &pages), |e| matches!(e, Error::SeqLens { arg: "max_seqlen_k", .. }), "max_seqlen_k");
    expect_err(run(Some(&ints(&[0, 5], &[2])), None, &table, 5, &pages), |e| matches!(e, Error::Shape { arg: "cu_seqlens_k", .. }), "cu_seqlens_k");
    expect_err(run(Some(&ints(&[1, 5, 8], &[3])), None, &table, 5, &pages), |e| matches!(e, Error::SeqLens { arg: "cu_seqlens_k", .. }), "cu_seqlens_k");
    let f = Tensor::from_f32(&[0.0; 4], &[2, 2], DType::F32).unwrap();
    expect_err(run(Some(&cu_k), None, &f, 5, &pages), |e| matches!(e, Error::DType { arg: "block_table", .. }), "block_table");
    expect_err(run(Some(&cu_k), None, &table, 5, &zeros(&[4, 4, 2, 64], DType::F16)), |e| matches!(e, Error::DTypeMismatch { arg: "k", .. }), "k");
    expect_err(run(Some(&cu_k), None, &table, 5, &zeros(&[16, 2, 64], DType::BF16)), |e| matches!(e, Error::Rank { arg: "k", .. }), "k");
    expect_err(run(Some(&cu_k), None, &table, 5, &zeros(&[4, 0, 2, 64], DType::BF16)), |e| matches!(e, Error::Shape { arg: "k", .. }), "page size");
}

#[test]
fn combine_errors_name_the_argument() {
    let po = zeros(&[2, 1, 3, 2, 8], DType::F32);
    let pl = zeros(&[2, 1, 2, 3], DType::F32);
    assert!(combine(&po, &pl).is_ok());
    expect_err(combine(&po, &zeros(&[2, 1, 3, 2], DType::F32)), |e| matches!(e, Error::Shape { arg: "partial_lse", .. }), "partial_lse");
    expect_err(combine(&po, &zeros(&[2, 1, 2, 3], DType::BF16)), |e| matches!(e, Error::DType { arg: "partial_lse", .. }), "partial_lse");
    expect_err(combine(&zeros(&[2, 3, 8], DType::F32), &pl), |e| matches!(e, Error::Shape { arg: "partial_out", .. }), "partial_out");
    expect_err(combine(&zeros(&[2, 1, 3, 2, 8], DType::I32), &pl), |e| matches!(e, Error::DType { arg: "partial_out", .. }), "partial_out");
    expect_err(combine(&po, &zeros(&[2, 2, 3], DType::F32)), |e| matches!(e, Error::Rank { arg: "partial_lse", .. }), "partial_lse");
    let strided = zeros(&[2, 1, 3, 2, 16], DType::F32).as_strided(&[2, 1, 3, 2, 8], &[96, 96, 32, 16, 2], 0).unwrap();
    expect_err(combine(&strided, &pl), |e| matches!(e, Error::NotContiguous { arg: "partial_out" }), "partial_out");
}

// ---------------------------------------------------------------------------------------------------
// No panics

/// Random index tensors (lengths, positions, rows, blocks, some absurd) on a small valid layout: every
/// call returns Ok or a typed error, never panics, and an Ok result is finite.
#[derive(Clone, Debug)]
struct Garbage {
    paged: bool,
    seqlens: Vec<i32>,
    leftpad: Option<Vec<i32>>,
    batch_idx: Option<Vec<i32>>,
    table: Vec<i32>,
    s_new: usize,
    s_ro: usize,
    rotary: bool,
    num_splits: usize,
}

impl Garbage {
    /// The call on `device`: zero q and caches (Hk 1, D 32; paged `[5, 4]`, else `[3, 12]`), new keys and
    /// values of 1.0, zero rotary tables of 8 columns, causal with rotary; out, lse and the caches.
    fn run_on(&self, device: Device) -> Result<(FwdOutput, Tensor, Tensor)> {
        let g = self;
        let b = g.seqlens.len();
        let (hk, d) = (1, 32);
        let on = |t: Tensor| t.to_device(device).unwrap();
        let q = on(zeros(&[b, 2, 2, d], DType::F16));
        let cache_shape = if g.paged { [5, 4, hk, d] } else { [3, 12, hk, d] };
        let (mut k_cache, mut v_cache) = (on(zeros(&cache_shape, DType::F16)), on(zeros(&cache_shape, DType::F16)));
        let new = on(Tensor::from_f32(&vec![1.0; b * g.s_new * hk * d], &[b, g.s_new, hk, d], DType::F16).unwrap());
        let seqlens = on(ints(&g.seqlens, &[b]));
        let leftpad = g.leftpad.as_ref().map(|x| on(ints(x, &[x.len()])));
        let batch_idx = g.batch_idx.as_ref().map(|x| on(ints(x, &[x.len()])));
        let cols = if b == 0 { 0 } else { g.table.len() / b.max(1) };
        let table = on(ints(&g.table[..b * cols], &[b, cols]));
        let cos = on(zeros(&[g.s_ro, 8], DType::F32));
        let cache = KvCache {
            cache_seqlens: &seqlens,
            block_table: g.paged.then_some(&table),
            k_new: Some(&new),
            v_new: Some(&new),
            rotary_cos: g.rotary.then_some(&cos),
            rotary_sin: g.rotary.then_some(&cos),
            cache_batch_idx: batch_idx.as_ref(),
            cache_leftpad: leftpad.as_ref(),
            alibi_slopes: None,
        };
        let kv = KvCacheOptions { rotary_interleaved: g.num_splits % 2 == 0, num_splits: g.num_splits };
        let o = fwd_kvcache(&q, &mut k_cache, &mut v_cache, &cache, &AttnOptions { causal: g.rotary, ..Default::default() }, &kv)?;
        Ok((o, k_cache, v_cache))
    }
}

fn garbage() -> impl Strategy<Value = Garbage> {
    let small = || prop_oneof![6 => -2i32..=20, 1 => Just(i32::MAX), 1 => Just(i32::MIN)];
    let vecs = (proptest::collection::vec(small(), 0..=3), proptest::option::of(proptest::collection::vec(small(), 0..=3)), proptest::option::of(proptest::collection::vec(small(), 0..=3)), proptest::collection::vec(small(), 0..=9));
    (any::<bool>(), vecs, 0usize..=3, 0usize..=24, any::<bool>(), 0usize..=200).prop_map(|(paged, (seqlens, leftpad, batch_idx, table), s_new, s_ro, rotary, num_splits)| Garbage {
        paged,
        seqlens,
        leftpad,
        batch_idx,
        table,
        s_new,
        s_ro,
        rotary,
        num_splits,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn kvcache_never_panics(g in garbage()) {
        let r = g.run_on(Device::Cpu);
        if let Ok((o, ..)) = r {
            prop_assert!(o.out.to_f32_vec().unwrap().iter().all(|x| x.is_finite()));
            prop_assert!(o.lse.to_f32_vec().unwrap().iter().all(|x| !x.is_nan()));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// CUDA: the same cases through the kernels (append, paged forward over the cache, combine)

#[path = "common/kernels.rs"]
mod kernels;

const GPU: Device = Device::Cuda(0);

macro_rules! require_gpu {
    () => {
        if !kernels::gpu_or_skip("kvcache (CUDA)", false, line!()) {
            return;
        }
    };
}

/// The CPU cases on CUDA, every head dim: out and lse against the reference, the caches bitwise.
#[test]
fn gpu_kvcache_matches_reference() {
    require_gpu!();
    let (seed, _) = seeded("gpu_kvcache_matches_reference");
    let mut runner = seeded_runner(seed, 300);
    let case = (kv_case(), proptest::sample::select(vec![32usize, 64, 96, 128, 192, 256]));
    let r = runner.run(&case, |(c, d)| {
        let c = KvCase { d, ..c };
        run_kv_case_on(&c, GPU).map_err(|e| TestCaseError::fail(format!("{c:?}: {e}")))
    });
    if let Err(e) = r {
        panic!("seed {seed}: {e}");
    }
}

/// A proptest runner of `cases` cases drawing from `seed` (printed by the test: a failure reproduces).
fn seeded_runner(seed: u64, cases: u32) -> proptest::test_runner::TestRunner {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &b);
    proptest::test_runner::TestRunner::new_with_rng(ProptestConfig { cases, ..ProptestConfig::default() }, rng)
}

/// `got` (out, lse) against `want` within the GPU kernels' rounding: out within 2u relative plus 4u (P is
/// rounded to the input dtype before P V; |v| <= 1), lse within `lse_tol` relative to 1 + |lse| (-inf
/// exactly).
fn within_gpu_rounding(c: &KvCase, what: &str, got: (&[f32], &[f32]), want: (&[f32], &[f32]), lse_tol: f32) -> std::result::Result<(), TestCaseError> {
    let u = unit_roundoff(c.dtype) as f32;
    for (i, (&a, &b)) in got.0.iter().zip(want.0).enumerate() {
        prop_assert!((a - b).abs() <= 2.0 * u * a.abs().max(b.abs()) + 4.0 * u, "{:?} {}: out[{}] {} vs {}", c, what, i, a, b);
    }
    for (i, (&a, &b)) in got.1.iter().zip(want.1).enumerate() {
        let ok = if b == f32::NEG_INFINITY { a == b } else { (a - b).abs() <= lse_tol * (1.0 + b.abs()) };
        prop_assert!(ok, "{:?} {}: lse[{}] {} vs {}", c, what, i, a, b);
    }
    Ok(())
}

/// Hand-made leftpad / cache_batch_idx rows and decode with many splits on CUDA.
#[test]
fn gpu_leftpad_batch_idx_and_decode_splits() {
    require_gpu!();
    let (seed, mut rng) = seeded("gpu_leftpad_batch_idx_and_decode_splits");
    for c in leftpad_cases(&mut rng) {
        run_kv_case_on(&c, GPU).unwrap_or_else(|e| panic!("seed {seed}: {c:?}: {e}"));
    }
    let base = decode_case(DType::F16, (32, 8), 4096, vec![(4000, 0), (1700, 0), (3, 0)], rng.r#gen());
    for (num_splits, page_size) in [(0, Some(64)), (1, Some(16)), (3, None), (16, Some(64)), (17, Some(256)), (128, None)] {
        let c = KvCase { num_splits, page_size, ..base.clone() };
        run_kv_case_on(&c, GPU).unwrap_or_else(|e| panic!("seed {seed}: splits {num_splits} page {page_size:?}: {e}"));
    }
}

/// Every split count on CUDA within rounding of one split (the partials are f32).
#[test]
fn gpu_splits_agree_within_rounding() {
    require_gpu!();
    let (seed, _) = seeded("gpu_splits_agree_within_rounding");
    let mut runner = seeded_runner(seed, 100);
    let r = runner.run(&(kv_case(), 2usize..=40), |(c, n)| {
        let x = c.inputs();
        let (one, ..) = c.run_on(&x, 1, GPU, None).unwrap();
        let (o1, l1) = outputs(&one);
        for splits in [n, 0] {
            let (many, ..) = c.run_on(&x, splits, GPU, None).unwrap();
            let (on, ln) = outputs(&many);
            // P is rounded before P V against each split's own running max: the GPU tolerance's 2u of
            // |V|'s bound per row, not relative to out.
            within_gpu_rounding(&c, &format!("splits {splits} vs 1"), (&on, &ln), (&o1, &l1), 2f32.powi(-16))?;
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("seed {seed}: {e}");
    }
}

/// The public combine on CUDA against the f64 merge: every partial / out dtype pair, packed or not,
/// empty partials and empty rows.
#[test]
fn gpu_combine_matches_the_merge() {
    require_gpu!();
    let (seed, mut rng) = seeded("gpu_combine_matches_the_merge");
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    for trial in 0..60 {
        let n = rng.gen_range(0..40);
        let packed = rng.gen_bool(0.5);
        let (b, s, h, d) = (rng.gen_range(1..3), rng.gen_range(0..9), rng.gen_range(1..4), [8, 40, 64, 96, 128, 200, 256][rng.gen_range(0..7)]);
        let (in_dt, out_dt) = (dtypes[trial % 3], dtypes[trial / 3 % 3]);
        let (out_shape, lse_shape) = if packed { (vec![n, s, h, d], vec![n, h, s]) } else { (vec![n, b, s, h, d], vec![n, b, h, s]) };
        let bb = if packed { 1 } else { b };
        let po: Vec<f32> = random_values(&mut rng, n * bb * s * h * d, 3.0, in_dt);
        let pl: Vec<f32> = (0..n * bb * h * s).map(|i| if i % 7 == 3 || rng.gen_bool(0.15) { f32::NEG_INFINITY } else { rng.gen_range(-40.0f32..40.0) }).collect();
        let dev = |v: &[f32], shape: &[usize], dt| Tensor::from_f32(v, shape, dt).unwrap().to_device(GPU).unwrap();
        let (pot, plt) = (dev(&po, &out_shape, in_dt), dev(&pl, &lse_shape, DType::F32));
        let mut out = Tensor::zeros(&out_shape[1..], out_dt, GPU).unwrap();
        let mut lse = Tensor::zeros(&lse_shape[1..], DType::F32, GPU).unwrap();
        let cv = CombineViews { partial_out: pot.view(), partial_lse: plt.view(), out: out.view_mut(), lse: lse.view_mut() };
        unsafe { raw::combine(&cv, Target::Cuda { ordinal: 0, stream: 0 }) }.unwrap();
        let (out, lse) = (out.to_f32_vec().unwrap(), lse.to_f32_vec().unwrap());
        for bi in 0..bb {
            for si in 0..s {
                for hi in 0..h {
                    let lses: Vec<f64> = (0..n).map(|i| pl[((i * bb + bi) * h + hi) * s + si] as f64).collect();
                    let rows: Vec<Vec<f64>> = (0..n).map(|i| po[(((i * bb + bi) * s + si) * h + hi) * d..][..d].iter().map(|&x| x as f64).collect()).collect();
                    let (ro, rl) = merge_ref(&lses, &rows.iter().map(|r| &r[..]).collect::<Vec<_>>());
                    let l = lse[(bi * h + hi) * s + si] as f64;
                    let ok = if rl == f64::NEG_INFINITY { l == rl } else { (l - rl).abs() <= 1e-5 * (1.0 + rl.abs()) };
                    assert!(ok, "seed {seed} trial {trial}: lse {l} vs {rl}");
                    // The output's rounding, plus the f32 weights' error on the sum of |w_i o_i| (not on
                    // out, which cancels): the kernel's lse is rounded at its magnitude (inputs up to 40,
                    // so 2^-22 relative there is ~1e-5 absolute) and every w_i = exp2(lse_i - lse)
                    // carries that error, ex2.approx adds a few ulps, and n products are summed in f32.
                    let u = unit_roundoff(out_dt).max(1e-6);
                    let eps = 2f64.powi(-20) * (1.0 + rl.abs()) + (n as f64 + 4.0) * 2f64.powi(-22);
                    for (x, &r) in ro.iter().enumerate() {
                        let g = out[((bi * s + si) * h + hi) * d + x] as f64;
                        let tol = if rl == f64::NEG_INFINITY {
                            // No partial saw a key: out is exactly 0.
                            0.0
                        } else {
                            let mass: f64 = lses.iter().zip(&rows).map(|(l, o)| (l - rl).exp() * o[x].abs()).sum();
                            2.0 * u * r.abs() + eps * mass + 1e-7 + if out_dt == DType::F16 { 2f64.powi(-24) } else { 0.0 }
                        };
                        assert!((g - r).abs() <= tol, "seed {seed} trial {trial}: out {g} vs {r}, tolerance {tol:e} ({in_dt} -> {out_dt}, {n} partials, lse {rl})");
                    }
                }
            }
        }
    }
}

/// Bogus device indices (the CPU path's `kvcache_never_panics` inputs that pass validation) on CUDA:
/// the kernels clamp them, nothing faults (compute-sanitizer memcheck runs this too), and out and lse
/// come back finite / not NaN.
#[test]
fn gpu_kvcache_bogus_indices_do_not_fault() {
    require_gpu!();
    let (seed, _) = seeded("gpu_kvcache_bogus_indices_do_not_fault");
    let mut runner = seeded_runner(seed, 300);
    let ran = std::cell::Cell::new(0usize);
    let r = runner.run(&garbage(), |g| {
        let r = g.run_on(GPU);
        if let Ok((o, k_cache, v_cache)) = r {
            ran.set(ran.get() + 1);
            prop_assert!(o.out.to_f32_vec().unwrap().iter().all(|x| x.is_finite()));
            prop_assert!(o.lse.to_f32_vec().unwrap().iter().all(|x| !x.is_nan()));
            // Appended values are 1.0 or rotated zeros-table values (0): nothing else lands in the caches.
            prop_assert!(k_cache.to_f32_vec().unwrap().iter().chain(&v_cache.to_f32_vec().unwrap()).all(|&x| x == 0.0 || x == 1.0));
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("seed {seed}: {e}");
    }
    eprintln!("gpu_kvcache_bogus_indices_do_not_fault: {} calls reached the kernels", ran.get());
    assert!(ran.get() > 0);
}

/// ALiBi over a KV cache on CUDA (the paged forward's `_mods` twin: the decode kernels take no ALiBi)
/// against the CPU path on the same inputs (which alibi_dropout.rs checks against the reference): out
/// and lse within the GPU kernels' tolerance, the caches bitwise equal, any split count.
#[test]
fn gpu_kvcache_alibi_matches_cpu() {
    require_gpu!();
    let (seed, _) = seeded("gpu_kvcache_alibi_matches_cpu");
    let mut runner = seeded_runner(seed, 60);
    let r = runner.run(&(kv_case(), 0usize..=6), |(c, splits)| {
        let x = c.inputs();
        let slopes: Vec<f32> = (0..c.heads.0).map(|h| 0.5f32.powi(h as i32 % 8 + 1)).collect();
        let (oc, kc, vc) = c.run_on(&x, splits, Device::Cpu, Some(&slopes)).unwrap();
        let (og, kg, vg) = c.run_on(&x, splits, GPU, Some(&slopes)).unwrap();
        prop_assert!(kc.to_bytes().unwrap() == kg.to_bytes().unwrap() && vc.to_bytes().unwrap() == vg.to_bytes().unwrap(), "{:?}: caches differ", c);
        let ((o1, l1), (o2, l2)) = (outputs(&oc), outputs(&og));
        within_gpu_rounding(&c, &format!("splits {splits} vs the CPU's"), (&o2, &l2), (&o1, &l1), 2f32.powi(-12))?;
        Ok(())
    });
    if let Err(e) = r {
        panic!("seed {seed}: {e}");
    }
}

/// Caches with no rows (contiguous, rows picked by cache_batch_idx) or no blocks (paged) on CUDA: the
/// append has nowhere to write and is not run, nothing faults, every row sees no key (out 0, lse -inf).
/// (The CPU path rejects the indices; the device cannot read them.)
#[test]
fn gpu_empty_caches_do_not_fault() {
    require_gpu!();
    let (b, hq, hk, d) = (2, 4, 2, 64);
    let on = |t: Tensor| t.to_device(GPU).unwrap();
    let q = on(Tensor::from_f32(&vec![0.5; b * hq * d], &[b, 1, hq, d], DType::BF16).unwrap());
    let new = on(Tensor::from_f32(&vec![1.0; b * hk * d], &[b, 1, hk, d], DType::BF16).unwrap());
    let seqlens = on(ints(&[3, 0], &[b]));
    let rows = on(ints(&[0, 1], &[b]));
    let table = on(ints(&[0, 1, 2, 3], &[b, 2]));
    for paged in [false, true] {
        let shape = if paged { [0, 16, hk, d] } else { [0, 32, hk, d] };
        let (mut kc, mut vc) = (on(zeros(&shape, DType::BF16)), on(zeros(&shape, DType::BF16)));
        let mut cache = KvCache::new(&seqlens);
        (cache.k_new, cache.v_new) = (Some(&new), Some(&new));
        if paged {
            cache.block_table = Some(&table);
        } else {
            cache.cache_batch_idx = Some(&rows);
        }
        for splits in [1, 3] {
            let o = fwd_kvcache(&q, &mut kc, &mut vc, &cache, &AttnOptions { causal: true, ..Default::default() }, &KvCacheOptions { num_splits: splits, ..Default::default() }).unwrap();
            let (out, lse) = outputs(&o);
            assert!(out.iter().all(|&x| x == 0.0), "paged {paged} splits {splits}: out not 0");
            assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY), "paged {paged} splits {splits}: lse not -inf");
        }
    }
}
