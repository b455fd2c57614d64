//! The driver benches/sanitize.sh runs under compute-sanitizer (memcheck, racecheck, synccheck,
//! initcheck): every kernel family once per layout and mask, on problems as small as still reach every
//! code path. Run on the GPU machine; without a CUDA GPU it prints a notice and exits 0.
//!
//! `sanitize [HEAD_DIMS|all] [wgmma|mma|both] [bf16|f16] [plain|mods] [--plan]`, in any order: head
//! dims as a comma list (default every one the kernels have), the kernel family (default both), one
//! dtype (default both), runs without or with the score modifiers only (default both). `--plan` prints
//! the cases and the launch count for an H200 without running anything (no GPU needed).
//!
//! Per (dtype, head dim) and for each of two masks, on a dense problem and on a packed one: causal
//! (interior tiles, diagonal tiles, tiles past the diagonal skipped, rows that see no key) and a window
//! (20, 10) with softcap (tiles skipped on both sides, tanh). The kernels decide per tile whether to
//! mask, so an unmasked problem adds no path beyond the interior tiles.
//! - mma.sync (`no_wgmma`): forward, backward with atomic dq (prep, dK/dV, convert) and deterministic
//!   backward (prep, dK/dV, dq kernel);
//! - wgmma, Hopper only and only where the variant table has them (what the default choice runs there):
//!   the forward (head dims 64-256), and at head dims 64 and 128 the backward with a CTA per key block
//!   (prep, dK/dV, convert) and with `bwd_chain_all` (a CTA walks every key block and converts dq; prep,
//!   dK/dV); plus one forward whose grid chains row blocks (one CTA per (head, sequence), as many heads
//!   as multiprocessors: the dispatch's own choice at that size), and the wide-tile ws forward where
//!   there is one (head dim 192: what a plain problem with `FWD_WS_WIDE_MIN_KEYS` keys or more runs),
//!   dense and packed (`WIDE_*`), both masks; with the modifiers its `_alibi` copy (ALiBi alone, slopes
//!   of either sign) and its `_dropout` copy (dropout alone, dense 1x130x8242).
//!
//! - the KV cache (`KV_CASES`, with the mma.sync family): the append kernel (new keys rotated, q rotated
//!   or packed), the decode kernel (packed GQA; its splits merged in a cluster, or beyond the cluster's
//!   size f32 partials and the combine) over a contiguous cache read
//!   through cache_batch_idx and over pages, the paged forward for many query rows and for ALiBi (with
//!   the modifiers' runs), split and not; and the public combine.
//!
//! - wgmma's deterministic backward (the workspace holds the accumulator copies): the ordered `_det`
//!   twins at head dims 192 and 256 (prep, dK/dV with the turn counters, convert), the split copies at
//!   64-128 (prep, dK/dV, the ordered sum of the copies), and there the ordered twin too
//!   (`bwd_ordered_all`, without score modifiers).
//!
//! Everything at head dim 32 is mma.sync under any choice: it runs once.
//! Every run above runs twice: as described, and with the score modifiers (the `_mods` kernels and the
//! paged ones with their modifiers on): ALiBi (dense: slopes `[B, Hq]`, packed and paged: `[Hq]`),
//! dropout (p = 0.17) and the probabilities (s_dmask, f32: the probabilities kernel after each forward),
//! plus, where the ws forward runs, ALiBi alone (its and the default dK/dV kernel's `_alibi` copies, ws
//! at head dims 64-128: the forward and the default backward) and dropout alone (its `_dropout` copy,
//! `_mods` at head dim 96: the forward), dense and packed,
//! forward, backward and deterministic backward; on Hopper the forward's `fwd_no_ws` run is then the
//! mma.sync `_mods` kernel (the cp.async wgmma forward has no such twin). Where the default backward is
//! the warp-specialized kernel (head dims 64-128), the `fwd_no_ws` run also runs the backward without
//! it (`bwd_no_ws`; with modifiers: the wgmma dK/dV kernel's `_mods` twin).
//!
//! Sizes: dense b=2, sq=190 (2 forward row blocks of 128, 3 backward query steps of 64), sk=280 (3 K/V
//! tiles of 128, 5 of 64: both pipeline stages reused; causal: the first row block skips the last
//! tile), 2 q heads on 1 kv head (GQA). Packed: 4 sequences with seqused below the slots (q 70 of 75,
//! 0 of 0, 140 of 140, 30 of 30; k 40 of 60, 33 of 40, 170 of 200, 0 of 20): rows that see no key
//! (sq > sk), keys no query sees, a sequence with no key, an empty slot, 7 + 5 tail rows; max_seqlen_k
//! 170 (2 wgmma key blocks). Every output is copied back after its call (so initcheck also sees any
//! output byte no kernel wrote) and the case's line is printed only then. Prints `SANITIZE plan ...`
//! first and `SANITIZE done <cases> cases, <launches> kernel launches` last; an error from the library
//! exits 1.

#[path = "../src/shared/variants.rs"]
#[allow(dead_code, unused_macros)]
mod variants;

use flash_attn::{bwd_with, combine, fwd, fwd_kvcache, fwd_with, varlen_bwd_with, varlen_fwd_paged_with, varlen_fwd_with, AttnOptions, DType, Device, Dropout, Extras, KernelChoice, KvCache, KvCacheOptions, PagedVarlen, Tensor, Varlen, HEAD_DIMS};
use std::time::Instant;

const NO_WGMMA: KernelChoice = KernelChoice { no_wgmma: true, ..DEFAULT };
const DEFAULT: KernelChoice = KernelChoice { no_wgmma: false, bwd_chain_all: false, fwd_no_ws: false, bwd_no_ws: false, bwd_ordered_all: false };
const CHAIN_ALL: KernelChoice = KernelChoice { bwd_chain_all: true, ..DEFAULT };
const FWD_NO_WS: KernelChoice = KernelChoice { fwd_no_ws: true, ..DEFAULT };
const ORDERED_ALL: KernelChoice = KernelChoice { bwd_ordered_all: true, ..DEFAULT };
const NO_WS: KernelChoice = KernelChoice { fwd_no_ws: true, bwd_no_ws: true, ..DEFAULT };

/// Dense problem: (b, sq, sk, hq, hk).
const DENSE: (usize, usize, usize, usize, usize) = (2, 190, 280, 2, 1);
/// Packed problem: slots, seqused, tail rows (q, k).
const SLOTS_Q: [usize; 4] = [75, 0, 140, 30];
const SLOTS_K: [usize; 4] = [60, 40, 200, 20];
const USED_Q: [usize; 4] = [70, 0, 140, 30];
const USED_K: [usize; 4] = [40, 33, 170, 0];
const TAIL: (usize, usize) = (7, 5);
/// The masks from this index on run their packed problem without the modifiers with no max_seqlen_q/k:
/// slot-scheduled (the grids walk every sequence's row and key blocks from cu_seqlens), the
/// deterministic backward scheduled by the mean lengths (its CTAs stride over the longer sequences).
const NO_MAX_FROM: usize = 1;

/// The mean rows per sequence of slots `slots` plus `tail` rows: the library's stand-in for a
/// max_seqlen not given.
fn mean_len(slots: &[usize], tail: usize) -> usize {
    (slots.iter().sum::<usize>() + tail).div_ceil(slots.len())
}
/// The chained-grid forward: b=1, as many q heads as multiprocessors on one kv head, sq=130 (2 row
/// blocks), sk=200.
const CHAINED: (usize, usize) = (130, 200);
/// The wide-tile forward's problems: dense (b=1, sq, sk = the threshold + 50: 18 tiles of 112 keys and
/// a partial one; causal: the second row block walks them all); packed, slots / seqused (q, k) and tail
/// rows: 2 sequences, q 150 of 160 and 40 of 40, k 2098 of 2150 and 60 of 60 (max_seqlen_k 2098).
const WIDE_DENSE: (usize, usize) = (190, variants::FWD_WS_WIDE_MIN_KEYS + 50);
const WIDE_SLOTS: [(usize, usize); 2] = [(160, 2150), (40, 60)];
const WIDE_USED: [(usize, usize); 2] = [(150, variants::FWD_WS_WIDE_MIN_KEYS + 50), (40, 60)];
const WIDE_TAIL: (usize, usize) = (3, 2);
/// The wide-tile forward's dropout problem: b=1, sq 130, sk `FWD_WS_WIDE_DROPOUT_MIN_KEYS` + 50.
const WIDE_DROPOUT: (usize, usize) = (130, variants::FWD_WS_WIDE_DROPOUT_MIN_KEYS + 50);
/// Page sizes of the paged forward cases: 16 (the ws forward's page boxes issued by its whole producer
/// warpgroup), 64 (by its first warp at 128-key tiles), 3 (the cp.async kernels).
const PAGES: [usize; 3] = [16, 64, 3];

/// KV-cache cases (issue 13), per (dtype, head dim): (page size, 0 = contiguous with cache_batch_idx;
/// query rows; num_splits, 0 = the heuristic; causal, else window (20, 0) + softcap; ALiBi). B = 2, Hq
/// = 2 on Hk = 1, cache rows of 96 keys with cache_seqlens [40, 77], leftpad [3, 0], two new keys
/// rotated (rotary_dim D/2, f32 tables), so: the append kernel, then the decode kernel (q packed, up to
/// 64 packed rows; always merged by the combine) or, with 40 query rows (80 packed) or ALiBi, the paged
/// forward (merged where split).
const KV_CASES: [(usize, usize, usize, bool, bool); 7] = [(0, 1, 0, true, false), (0, 1, 3, false, false), (16, 3, 1, true, false), (16, 3, 4, false, false), (0, 1, 17, false, false), (0, 40, 2, true, false), (16, 1, 2, true, true)];
const KV_CAPACITY: usize = 96;

/// The modifiers' dropout (the slopes are drawn per problem).
const DROPOUT: Dropout = Dropout { p: 0.17, seed: 0x005e_ed0f_d40f, offset: 7 };

/// (name, causal, window, softcap)
const MASKS: [(&str, bool, (i64, i64), f32); 2] = [("causal", true, (-1, -1), 0.0), ("window(20,10)+softcap3", false, (20, 10), 3.0)];

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

fn prefix(x: &[usize]) -> Vec<i32> {
    std::iter::once(0).chain(x.iter().scan(0, |a, &l| {
        *a += l as i32;
        Some(*a)
    })).collect()
}

fn kernel_dtype(dtype: DType) -> variants::KernelDType {
    if dtype == DType::F16 { variants::KernelDType::F16 } else { variants::KernelDType::BF16 }
}

/// What one (dtype, head dim) runs: the wgmma pieces that exist for it on this GPU, and whether the
/// mma.sync pieces run.
struct Plan {
    mma: bool,
    wg_fwd: bool,
    wg_bwd: bool,
    /// The default backward is the warp-specialized one (head dims 64-128): the `fwd_no_ws` run then
    /// also runs the backward without it (`bwd_no_ws`), with and without score modifiers.
    ws_bwd: bool,
    /// The deterministic backward's default is the split accumulator copies (head dims 64-128): the
    /// ordered `_det` twin also runs (`bwd_ordered_all`), without score modifiers.
    ordered_opt_in: bool,
    /// The wide-tile ws forward exists for it (`for_each_fwd_ws_wide_variant`).
    wide: bool,
    /// Keys per block of the Hopper dK/dV kernel at this head dim.
    wg_block_n: usize,
    /// Runs without and with the score modifiers.
    mods: (bool, bool),
}

impl Plan {
    fn new(d: usize, dtype: DType, hopper: bool, families: (bool, bool), mods: (bool, bool)) -> Plan {
        let kd = kernel_dtype(dtype);
        Plan {
            mma: families.1,
            wg_fwd: families.0 && hopper && variants::fwd_wg_kernel_name(d, kd).is_some(),
            wg_bwd: families.0 && hopper && variants::bwd_wg_kernel_name(d, kd).is_some(),
            ws_bwd: families.0 && hopper && variants::fwd_wg_kernel_name(d, kd).is_some() && variants::bwd_ws_kernel_name(d, kd).is_some(),
            ordered_opt_in: families.0 && hopper && variants::bwd_wg_kernel_name(d, kd).is_some() && !variants::bwd_ordered_by_default(d),
            wide: families.0 && hopper && variants::fwd_ws_kernel_name(d, kd).is_some() && variants::fwd_ws_wide_kernel(d, kd).is_some(),
            wg_block_n: variants::bwd_wg_block_n(d),
            mods,
        }
    }
    /// Kernel launches per mask (dense, packed, paged; without and with the modifiers, which add the
    /// probabilities kernel after each forward), and of the chained forward.
    fn launches(&self) -> usize {
        let blocks = |sk: usize| sk.div_ceil(self.wg_block_n);
        // The wgmma backward: prep + dK/dV, + convert unless one CTA covers the key blocks.
        let wg = |gx: usize| if gx == 1 { 2 } else { 3 };
        let max_k = USED_K.iter().copied().max().unwrap();
        // Each forward run: dense, packed, and packed over each page size.
        let fwd = 2 + PAGES.len();
        // The runs' launches, the packed backward taking `packed.0` launches by default and `packed.1`
        // deterministic.
        let runs = |packed: (usize, usize)| {
            let mut n = 0;
            if self.mma {
                n += fwd + 2 * (3 + 3);
            }
            if self.wg_fwd || self.wg_bwd {
                n += fwd;
            }
            if self.wg_fwd {
                // The forward without warp specialization (fwd_no_ws).
                n += fwd;
            }
            if self.wg_bwd {
                // Default, deterministic (ordered or split copies: one CTA or split per key block here), chained.
                n += 2 * wg(blocks(DENSE.2)) + packed.0 + packed.1 + 2 * wg(1);
            }
            n
        };
        let given = (wg(blocks(max_k)), wg(blocks(max_k)));
        let n = runs(given);
        let fwd_runs = [self.mma, self.wg_fwd || self.wg_bwd, self.wg_fwd].iter().filter(|&&r| r).count();
        // With the modifiers, the single-modifier runs: ALiBi alone (the `_alibi` kernels: forward, and
        // backward where the wgmma one runs), then dropout alone (the forward's `_dropout`), each dense
        // and packed.
        let single = usize::from(self.wg_fwd) * (2 + usize::from(self.wg_bwd) * (wg(blocks(DENSE.2)) + wg(blocks(max_k))) + 2);
        let no_ws_bwd = |packed: (usize, usize)| usize::from(self.ws_bwd) * (wg(blocks(DENSE.2)) + packed.0);
        let with_mods = usize::from(self.mods.1) * (n + fwd_runs * fwd + single + no_ws_bwd(given));
        // Without the modifiers the masks from `NO_MAX_FROM` on pass no max lengths: the packed default
        // backward is slot-scheduled (three launches), the deterministic one's grid comes from the mean
        // key count.
        let plain = |packed: (usize, usize)| {
            let ordered = usize::from(self.ordered_opt_in) * (wg(blocks(DENSE.2)) + packed.1);
            usize::from(self.mods.0) * (runs(packed) + no_ws_bwd(packed) + ordered)
        };
        let no_max = (3, wg(blocks(mean_len(&SLOTS_K, TAIL.1))));
        let masks = (0..MASKS.len()).map(|m| plain(if m < NO_MAX_FROM { given } else { no_max }) + with_mods).sum::<usize>();
        masks + usize::from(self.wg_fwd && self.mods.0) + self.wide_launches() + self.kv_launches()
    }
    /// The wide-tile forward's launches: dense and packed, per mask, without the modifiers, and with them
    /// ALiBi alone (its `_alibi` copy; positive slopes dense, negative packed) and dropout alone (its
    /// `_dropout` copy, dense over `WIDE_DROPOUT` keys).
    fn wide_launches(&self) -> usize {
        (2 * usize::from(self.wide && self.mods.0) + 3 * usize::from(self.wide && self.mods.1)) * MASKS.len()
    }
    /// The KV-cache cases' launches (run once per dtype and head dim, with the mma.sync family): the
    /// append, the attention, the combine where split-KV's partials need it (the paged forward's splits,
    /// or the decode kernel's beyond the cluster that merges them on an H200), the public combine.
    fn kv_launches(&self) -> usize {
        if !self.mma {
            return 0;
        }
        let n: usize = KV_CASES.iter().filter(|c| if c.4 { self.mods.1 } else { self.mods.0 }).map(|&(_, sq, splits, _, alibi)| {
            let decode = !alibi && sq * 2 <= 64;
            2 + usize::from(if decode { splits > flash_attn::cuda::MAX_DECODE_CLUSTER } else { splits != 1 })
        }).sum();
        n + usize::from(self.mods.0)
    }
}

/// Every output's bytes back on the host (waits for the kernels; initcheck checks the copy's source).
fn fetch(ts: &[&Tensor]) -> flash_attn::Result<()> {
    for t in ts {
        t.to_bytes()?;
    }
    Ok(())
}

fn main() -> flash_attn::Result<()> {
    let mut dims: Vec<usize> = HEAD_DIMS.to_vec();
    let mut families = (true, true); // (wgmma, mma.sync)
    let mut mods = (true, true); // (without, with the score modifiers)
    let mut dtypes = vec![DType::BF16, DType::F16];
    let mut plan_only = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "wgmma" => families = (true, false),
            "mma" | "mma.sync" => families = (false, true),
            "both" => families = (true, true),
            "plain" => mods = (true, false),
            "mods" => mods = (false, true),
            "bf16" => dtypes = vec![DType::BF16],
            "f16" => dtypes = vec![DType::F16],
            "all" => dims = HEAD_DIMS.to_vec(),
            "--plan" => plan_only = true,
            _ if a.chars().all(|c| c.is_ascii_digit() || c == ',') => {
                dims = a.split(',').filter_map(|d| d.parse().ok()).collect();
                if let Some(bad) = dims.iter().find(|d| !HEAD_DIMS.contains(d)) {
                    eprintln!("sanitize: no kernel for head dim {bad} (have {HEAD_DIMS:?})");
                    std::process::exit(2);
                }
            }
            _ => {
                eprintln!("usage: sanitize [HEAD_DIMS, e.g. 64,128 or all] [wgmma|mma|both] [bf16|f16] [plain|mods] [--plan]");
                std::process::exit(2);
            }
        }
    }
    let (hopper, sms, device) = if plan_only {
        (true, 132, "an H200 (plan only: compute capability 9.0, 132 multiprocessors)".to_string())
    } else {
        if !flash_attn::cuda::available() {
            println!("SKIPPED sanitize: no CUDA GPU on this machine");
            return Ok(());
        }
        let name = flash_attn::cuda::device_name(0)?;
        let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| flash_attn::Error::Cuda(e.to_string()))?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        let attr = |a| ctx.attribute(a).map_err(|e| flash_attn::Error::Cuda(e.to_string()));
        let cc = (attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        (cc == (9, 0), sms, format!("{name} (sm_{}{}, {sms} multiprocessors)", cc.0, cc.1))
    };
    let plans: Vec<(DType, usize, Plan)> = dtypes.iter().flat_map(|&dt| dims.iter().map(move |&d| (dt, d, Plan::new(d, dt, hopper, families, mods)))).collect();
    let total: usize = plans.iter().map(|p| p.2.launches()).sum();
    let cases = plans.iter().filter(|p| p.2.launches() > 0).count() * MASKS.len() + plans.iter().filter(|p| p.2.wg_fwd && mods.0).count() + plans.iter().filter(|p| p.2.wide_launches() > 0).count() + plans.iter().filter(|p| p.2.kv_launches() > 0).count();
    let runs = match mods {
        (true, true) => "without and with the score modifiers",
        (true, false) => "without the score modifiers",
        _ => "with the score modifiers (ALiBi, dropout, s_dmask)",
    };
    println!("SANITIZE plan: {cases} cases, {total} kernel launches on {device}; head dims {dims:?}, dtypes {dtypes:?}, families {}{}, {runs}", if families.0 { "wgmma " } else { "" }, if families.1 { "mma.sync" } else { "" });
    if families.0 && !families.1 && !hopper {
        println!("SANITIZE note: no wgmma kernels on this GPU (they need compute capability 9.0): nothing to run");
    }
    if plan_only {
        for (dtype, d, p) in &plans {
            println!("  {dtype} d{d}: mma.sync {}, wgmma fwd {}, wgmma bwd {}: {} launches", p.mma, p.wg_fwd, p.wg_bwd, p.launches());
        }
        return Ok(());
    }

    let gpu = Device::Cuda(0);
    let mut seed = 11u64;
    let (mut done, mut launched) = (0, 0);
    let start = Instant::now();
    let (b, sq, sk, hq, hk) = DENSE;
    let (cu_q, cu_k) = (prefix(&SLOTS_Q), prefix(&SLOTS_K));
    let (tq, tk) = (*cu_q.last().unwrap() as usize + TAIL.0, *cu_k.last().unwrap() as usize + TAIL.1);
    let i32s = |x: Vec<i32>| -> flash_attn::Result<Tensor> {
        let n = x.len();
        Tensor::from_i32(x, &[n])?.to_device(gpu)
    };
    let used = |x: &[usize]| x.iter().map(|&v| v as i32).collect::<Vec<_>>();
    let (cu_q, cu_k, used_q, used_k) = (i32s(cu_q)?, i32s(cu_k)?, i32s(used(&USED_Q))?, i32s(used(&USED_K))?);
    let varlen = Varlen {
        cu_seqlens_q: &cu_q,
        cu_seqlens_k: &cu_k,
        max_seqlen_q: Some(USED_Q.iter().copied().max().unwrap()),
        max_seqlen_k: Some(USED_K.iter().copied().max().unwrap()),
        seqused_q: Some(&used_q),
        seqused_k: Some(&used_k),
    };
    for (dtype, d, plan) in &plans {
        let (dtype, d) = (*dtype, *d);
        if plan.launches() == 0 {
            continue;
        }
        let mut t = |shape: &[usize]| Tensor::from_f32(&values(shape.iter().product(), &mut seed), shape, dtype)?.to_device(gpu);
        let (q, k, v, g) = (t(&[b, sq, hq, d])?, t(&[b, sk, hk, d])?, t(&[b, sk, hk, d])?, t(&[b, sq, hq, d])?);
        let (pq, pk, pv, pg) = (t(&[tq, hq, d])?, t(&[tk, hk, d])?, t(&[tk, hk, d])?, t(&[tq, hq, d])?);
        // Paged K/V (`PAGES`), each sequence's pages scattered over a pool with spare blocks, key counts
        // from seqused_k.
        let mut pools = Vec::new();
        for page in PAGES {
            let max_blocks = USED_K.iter().copied().max().unwrap().div_ceil(page);
            let blocks = USED_K.len() * max_blocks + 3;
            let table: Vec<i32> = (0..USED_K.len() * max_blocks).map(|i| ((i * 7 + 2) % blocks) as i32).collect();
            let table = Tensor::from_i32(table, &[USED_K.len(), max_blocks])?.to_device(gpu)?;
            pools.push((page, t(&[blocks, page, hk, d])?, t(&[blocks, page, hk, d])?, table));
        }
        // ALiBi slopes (f32 on the device): per sequence for the dense problem, per head for the packed one.
        let slopes = |shape: &[usize], seed: &mut u64| -> flash_attn::Result<Tensor> {
            let v: Vec<f32> = values(shape.iter().product(), seed).iter().map(|x| 0.02 + 0.1 * x.abs()).collect();
            Tensor::from_f32(&v, shape, DType::F32)?.to_device(gpu)
        };
        let (dense_slopes, packed_slopes) = (slopes(&[b, hq], &mut seed)?, slopes(&[hq], &mut seed)?);
        let no_max = Varlen { max_seqlen_q: None, max_seqlen_k: None, ..varlen };
        for (mask_index, (mask, causal, window, softcap)) in MASKS.into_iter().enumerate() {
            let case_start = Instant::now();
            let opts = |kernels, mods: bool| AttnOptions { causal, window, softcap, kernels, dropout: if mods { DROPOUT } else { Dropout::default() }, ..Default::default() };
            let mut ran: Vec<String> = Vec::new();
            // The forward under `kernels`, then the backward from its out and LSE for each (choice,
            // deterministic) in `bwds`; every output fetched. `mods`: with ALiBi, dropout and s_dmask.
            let mut run = |kernels: KernelChoice, label: &str, bwds: &[(KernelChoice, bool, &str)], mods: bool| -> flash_attn::Result<()> {
                let (dense_x, packed_x) = match mods {
                    true => (Extras { alibi_slopes: Some(&dense_slopes), return_attn_probs: true }, Extras { alibi_slopes: Some(&packed_slopes), return_attn_probs: true }),
                    false => (Extras::default(), Extras::default()),
                };
                let (varlen, tag) = match mods {
                    true => (&varlen, " +mods"),
                    false if mask_index >= NO_MAX_FROM => (&no_max, " (packed: no max_seqlen)"),
                    false => (&varlen, ""),
                };
                let f = fwd_with(&q, &k, &v, &dense_x, &opts(kernels, mods))?;
                let pf = varlen_fwd_with(&pq, &pk, &pv, varlen, &packed_x, &opts(kernels, mods))?;
                fetch(&[&f.out, &f.lse, &pf.out, &pf.lse])?;
                fetch(&f.s_dmask.iter().chain(&pf.s_dmask).collect::<Vec<_>>())?;
                ran.push(format!("{label} fwd{tag}"));
                for (page, kp, vp, table) in &pools {
                    let paged = PagedVarlen { cu_seqlens_q: &cu_q, cu_seqlens_k: None, max_seqlen_q: varlen.max_seqlen_q, max_seqlen_k: varlen.max_seqlen_k, seqused_q: Some(&used_q), seqused_k: Some(&used_k), block_table: table };
                    let o = varlen_fwd_paged_with(&pq, kp, vp, &paged, &packed_x, &opts(kernels, mods))?;
                    fetch(&[&o.out, &o.lse])?;
                    fetch(&o.s_dmask.iter().collect::<Vec<_>>())?;
                    ran.push(format!("{label} paged{page} fwd{tag}"));
                }
                for &(choice, det, what) in bwds {
                    let gd = bwd_with(&g, &q, &k, &v, &f.out, &f.lse, &dense_x, &opts(choice, mods), det)?;
                    let gp = varlen_bwd_with(&pg, &pq, &pk, &pv, &pf.out, &pf.lse, varlen, &packed_x, &opts(choice, mods), det)?;
                    fetch(&[&gd.dq, &gd.dk, &gd.dv, &gp.dq, &gp.dk, &gp.dv])?;
                    ran.push(format!("{what}{tag}"));
                }
                Ok(())
            };
            for mods in [false, true].into_iter().filter(|&m| if m { plan.mods.1 } else { plan.mods.0 }) {
                if plan.mma {
                    run(NO_WGMMA, "mma.sync", &[(NO_WGMMA, false, "mma.sync bwd"), (NO_WGMMA, true, "mma.sync deterministic bwd")], mods)?;
                }
                if plan.wg_fwd || plan.wg_bwd {
                    let all: [(bool, (KernelChoice, bool, &str)); 4] = [
                        (true, (DEFAULT, false, "wgmma bwd")),
                        (true, (DEFAULT, true, "wgmma deterministic bwd")),
                        (plan.ordered_opt_in && !mods, (ORDERED_ALL, true, "wgmma deterministic ordered bwd (bwd_ordered_all)")),
                        (true, (CHAIN_ALL, false, "wgmma chained bwd (bwd_chain_all)")),
                    ];
                    let bwds: Vec<_> = all.into_iter().filter(|&(on, _)| on && plan.wg_bwd).map(|(_, b)| b).collect();
                    run(DEFAULT, if plan.wg_fwd { "wgmma ws" } else { "default (mma.sync)" }, &bwds, mods)?;
                }
                if plan.wg_fwd {
                    let bwds: &[(KernelChoice, bool, &str)] = if plan.ws_bwd { &[(NO_WS, false, "wgmma bwd (bwd_no_ws)")] } else { &[] };
                    run(if bwds.is_empty() { FWD_NO_WS } else { NO_WS }, if mods { "mma.sync (fwd_no_ws)" } else { "wgmma (fwd_no_ws)" }, bwds, mods)?;
                }
            }
            if plan.wg_fwd && plan.mods.1 {
                // ALiBi without dropout: the ws forward's and the default dK/dV kernel's `_alibi` copies,
                // dense and packed.
                let o = opts(DEFAULT, false);
                let (dense_x, packed_x) = (Extras { alibi_slopes: Some(&dense_slopes), return_attn_probs: false }, Extras { alibi_slopes: Some(&packed_slopes), return_attn_probs: false });
                let f = fwd_with(&q, &k, &v, &dense_x, &o)?;
                let pf = varlen_fwd_with(&pq, &pk, &pv, &varlen, &packed_x, &o)?;
                fetch(&[&f.out, &f.lse, &pf.out, &pf.lse])?;
                ran.push("wgmma ws fwd +alibi".to_string());
                if plan.wg_bwd {
                    let gd = bwd_with(&g, &q, &k, &v, &f.out, &f.lse, &dense_x, &o, false)?;
                    let gp = varlen_bwd_with(&pg, &pq, &pk, &pv, &pf.out, &pf.lse, &varlen, &packed_x, &o, false)?;
                    fetch(&[&gd.dq, &gd.dk, &gd.dv, &gp.dq, &gp.dk, &gp.dv])?;
                    ran.push("wgmma bwd +alibi".to_string());
                }
                // Dropout without ALiBi: the ws forward's `_dropout` copy, dense and packed.
                let o = opts(DEFAULT, true);
                let f = fwd_with(&q, &k, &v, &Extras::default(), &o)?;
                let pf = varlen_fwd_with(&pq, &pk, &pv, &varlen, &Extras::default(), &o)?;
                fetch(&[&f.out, &f.lse, &pf.out, &pf.lse])?;
                ran.push("wgmma ws fwd +dropout".to_string());
            }
            done += 1;
            println!("case {done}/{cases} {dtype} d{d} {mask}: dense {b}x{sq}x{sk} and packed {tq}x{tk}: {} ({:.2} s, {:.0} s total)", ran.join(", "), case_start.elapsed().as_secs_f64(), start.elapsed().as_secs_f64());
        }
        if plan.wg_fwd && plan.mods.0 {
            // One CTA per (head, sequence) walking both row blocks: as many heads as multiprocessors fill
            // one whole wave, and the problem is masked (dispatch.rs `fwd_launch`).
            let case_start = Instant::now();
            let (cq, ck) = CHAINED;
            let mut t = |shape: &[usize]| Tensor::from_f32(&values(shape.iter().product(), &mut seed), shape, dtype)?.to_device(gpu);
            let (q, k, v) = (t(&[1, cq, sms, d])?, t(&[1, ck, 1, d])?, t(&[1, ck, 1, d])?);
            let f = fwd(&q, &k, &v, &AttnOptions { causal: true, kernels: FWD_NO_WS, ..Default::default() })?;
            fetch(&[&f.out, &f.lse])?;
            done += 1;
            println!("case {done}/{cases} {dtype} d{d} causal: wgmma fwd with chained row blocks, 1x{cq}x{ck}, {sms} q heads on 1 kv head ({:.2} s, {:.0} s total)", case_start.elapsed().as_secs_f64(), start.elapsed().as_secs_f64());
        }
        if plan.wide_launches() > 0 {
            let case_start = Instant::now();
            let (wq, wk) = WIDE_DENSE;
            let cuw = |f: fn(&(usize, usize)) -> usize| prefix(&WIDE_SLOTS.iter().map(f).collect::<Vec<_>>());
            let (cu_wq, cu_wk) = (cuw(|s| s.0), cuw(|s| s.1));
            let (twq, twk) = (*cu_wq.last().unwrap() as usize + WIDE_TAIL.0, *cu_wk.last().unwrap() as usize + WIDE_TAIL.1);
            let mut t = |shape: &[usize]| Tensor::from_f32(&values(shape.iter().product(), &mut seed), shape, dtype)?.to_device(gpu);
            let (q, k, v) = (t(&[1, wq, hq, d])?, t(&[1, wk, hk, d])?, t(&[1, wk, hk, d])?);
            let (pq, pk, pv) = (t(&[twq, hq, d])?, t(&[twk, hk, d])?, t(&[twk, hk, d])?);
            let (cu_wq, cu_wk) = (i32s(cu_wq)?, i32s(cu_wk)?);
            let (used_wq, used_wk) = (i32s(WIDE_USED.iter().map(|u| u.0 as i32).collect())?, i32s(WIDE_USED.iter().map(|u| u.1 as i32).collect())?);
            let wide_varlen = Varlen {
                cu_seqlens_q: &cu_wq,
                cu_seqlens_k: &cu_wk,
                max_seqlen_q: Some(WIDE_USED.iter().map(|u| u.0).max().unwrap()),
                max_seqlen_k: Some(WIDE_USED.iter().map(|u| u.1).max().unwrap()),
                seqused_q: Some(&used_wq),
                seqused_k: Some(&used_wk),
            };
            // ALiBi alone: `[Hq]` slopes, positive (dense) and negative (packed): the copies for each sign.
            let neg_slopes: Vec<f32> = packed_slopes.to_f32_vec()?.iter().map(|s| -0.25 * s).collect();
            let neg_slopes = Tensor::from_f32(&neg_slopes, &[hq], DType::F32)?.to_device(gpu)?;
            let (alibi_x, neg_x) = (Extras { alibi_slopes: Some(&packed_slopes), return_attn_probs: false }, Extras { alibi_slopes: Some(&neg_slopes), return_attn_probs: false });
            let (dq_, dk_) = WIDE_DROPOUT;
            let (lq, lk, lv) = (t(&[1, dq_, hq, d])?, t(&[1, dk_, hk, d])?, t(&[1, dk_, hk, d])?);
            for (_, causal, window, softcap) in MASKS {
                let opts = AttnOptions { causal, window, softcap, kernels: DEFAULT, ..Default::default() };
                if plan.mods.0 {
                    let f = fwd(&q, &k, &v, &opts)?;
                    let pf = varlen_fwd_with(&pq, &pk, &pv, &wide_varlen, &Extras::default(), &opts)?;
                    fetch(&[&f.out, &f.lse, &pf.out, &pf.lse])?;
                }
                if plan.mods.1 {
                    let f = fwd_with(&q, &k, &v, &alibi_x, &opts)?;
                    let pf = varlen_fwd_with(&pq, &pk, &pv, &wide_varlen, &neg_x, &opts)?;
                    fetch(&[&f.out, &f.lse, &pf.out, &pf.lse])?;
                    let f = fwd(&lq, &lk, &lv, &AttnOptions { dropout: DROPOUT, ..opts })?;
                    fetch(&[&f.out, &f.lse])?;
                }
            }
            done += 1;
            println!("case {done}/{cases} {dtype} d{d} causal, window(20,10)+softcap3: wide-tile ws fwd{}, dense 1x{wq}x{wk} and packed {twq}x{twk} ({:.2} s, {:.0} s total)", if plan.mods.1 { " (+alibi, +dropout)" } else { "" }, case_start.elapsed().as_secs_f64(), start.elapsed().as_secs_f64());
        }
        if plan.kv_launches() > 0 {
            // The KV cache: append + rotary, decode or paged forward, split-KV's combine; the public combine.
            let case_start = Instant::now();
            let mut ran = Vec::new();
            let mut t = |shape: &[usize]| Tensor::from_f32(&values(shape.iter().product(), &mut seed), shape, dtype)?.to_device(gpu);
            let half = d / 4;
            let f32t = |v: Vec<f32>, shape: &[usize]| -> flash_attn::Result<Tensor> { Tensor::from_f32(&v, shape, DType::F32)?.to_device(gpu) };
            let cos = f32t((0..160 * half).map(|i| ((i / half) as f32 * 0.01 * (i % half + 1) as f32).cos()).collect(), &[160, half])?;
            let sin = f32t((0..160 * half).map(|i| ((i / half) as f32 * 0.01 * (i % half + 1) as f32).sin()).collect(), &[160, half])?;
            let seqlens = i32s(vec![40, 77])?;
            let leftpad = i32s(vec![3, 0])?;
            let batch_idx = i32s(vec![2, 0])?;
            let slopes = f32t(vec![0.25, 0.0625], &[2])?;
            let (k_new, v_new) = (t(&[2, 2, 1, d])?, t(&[2, 2, 1, d])?);
            let pages = KV_CAPACITY / 16;
            let table = Tensor::from_i32((0..2 * pages as i32).map(|i| (i * 5 + 1) % (2 * pages as i32 + 1)).collect(), &[2, pages])?.to_device(gpu)?;
            for &(page, sq, splits, causal, alibi) in KV_CASES.iter().filter(|c| if c.4 { plan.mods.1 } else { plan.mods.0 }) {
                let q = t(&[2, sq, 2, d])?;
                let shape = if page == 0 { [3, KV_CAPACITY, 1, d] } else { [2 * pages + 1, page, 1, d] };
                let (mut kc, mut vc) = (t(&shape)?, t(&shape)?);
                let mut cache = KvCache::new(&seqlens);
                (cache.k_new, cache.v_new, cache.rotary_cos, cache.rotary_sin, cache.cache_leftpad) = (Some(&k_new), Some(&v_new), Some(&cos), Some(&sin), Some(&leftpad));
                if page == 0 {
                    cache.cache_batch_idx = Some(&batch_idx);
                } else {
                    cache.block_table = Some(&table);
                }
                if alibi {
                    cache.alibi_slopes = Some(&slopes);
                }
                let opts = if causal { AttnOptions { causal: true, ..Default::default() } } else { AttnOptions { window: (20, 0), softcap: 3.0, ..Default::default() } };
                let o = fwd_kvcache(&q, &mut kc, &mut vc, &cache, &opts, &KvCacheOptions { rotary_interleaved: sq == 3, num_splits: splits })?;
                fetch(&[&o.out, &o.lse, &kc, &vc])?;
                ran.push(format!("kvcache page{page} sq{sq} splits{splits}{}", if alibi { " +alibi" } else { "" }));
            }
            if plan.mods.0 {
                let po = t(&[3, 2, 5, 2, d])?;
                let pl = f32t(values(3 * 2 * 2 * 5, &mut seed).iter().enumerate().map(|(i, x)| if i % 7 == 0 { f32::NEG_INFINITY } else { 4.0 * x }).collect(), &[3, 2, 2, 5])?;
                let o = combine(&po, &pl)?;
                fetch(&[&o.out, &o.lse])?;
                ran.push("combine".into());
            }
            done += 1;
            println!("case {done}/{cases} {dtype} d{d} kv cache: {} ({:.2} s, {:.0} s total)", ran.join(", "), case_start.elapsed().as_secs_f64(), start.elapsed().as_secs_f64());
        }
        launched += plan.launches();
    }
    println!("SANITIZE done {done} cases, {launched} kernel launches in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
