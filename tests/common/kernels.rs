//! Which kernel family a CUDA call runs on, and a per-test tally of the families that passed, for the GPU
//! suites (gpu.rs, gpu_bwd.rs). On a Hopper GPU (compute capability 9.0) the default choice runs the
//! wgmma kernels where the variant table has them (forward: head dims 64-256; backward dK/dV: 64-256,
//! deterministic too where the workspace holds split dq accumulators) and mma.sync elsewhere; `no_wgmma` keeps every call on mma.sync, so the suites run
//! their cases under both to cover both families at every head dim. `bwd_chain_all` is a third backward
//! path (one CTA walks every key block and converts dq itself) where a wgmma backward has several key
//! blocks. The rules mirror host/src/dispatch.rs (`fwd_launch`, `bwd_launches`; pinned by its
//! `hopper_dispatch_picks_wgmma_kernels_where_they_exist`) over the same table (host/src/shared/).
//! The labels only name what ran; a case runs under `no_wgmma` on Hopper whatever they say.
#![allow(dead_code)]

#[path = "../../host/src/shared/variants.rs"]
#[allow(unused_macros)]
mod variants;

use flash_attn::{DType, KernelChoice};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::OnceLock;

/// The GPU suites' skip guard: whether a test of `suite` runs here (a CUDA GPU, or `dry_run`: the suite's
/// CPU-against-CPU dry run). If not, the notice is written past the test harness's capture (so CI's log
/// shows the skip) and the test returns (`require_gpu!` in each suite).
pub fn gpu_or_skip(suite: &str, dry_run: bool, line: u32) -> bool {
    if dry_run || flash_attn::cuda::available() {
        return true;
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {suite} test at line {line}: no CUDA GPU on this machine (the GPU suite runs on the GPU machine)");
    false
}

pub const DEFAULT: KernelChoice = KernelChoice { no_wgmma: false, bwd_chain_all: false, fwd_no_ws: false, bwd_no_ws: false, bwd_ordered_all: false };
pub const NO_WGMMA: KernelChoice = KernelChoice { no_wgmma: true, ..DEFAULT };
pub const CHAIN_ALL: KernelChoice = KernelChoice { bwd_chain_all: true, ..DEFAULT };
pub const FWD_NO_WS: KernelChoice = KernelChoice { fwd_no_ws: true, ..DEFAULT };
pub const ORDERED_ALL: KernelChoice = KernelChoice { bwd_ordered_all: true, ..DEFAULT };
pub const BWD_NO_WS: KernelChoice = KernelChoice { bwd_no_ws: true, ..DEFAULT };

/// GPU 0 as the dispatch sees it: (name, compute capability, multiprocessors); None without CUDA.
pub fn gpu() -> Option<&'static (String, (i32, i32), i32)> {
    static GPU: OnceLock<Option<(String, (i32, i32), i32)>> = OnceLock::new();
    GPU.get_or_init(|| {
        if !flash_attn::cuda::available() {
            return None;
        }
        // The library's context first (the primary one, which this retains too), so that dropping ours
        // does not tear it down.
        let name = flash_attn::cuda::device_name(0).ok()?;
        let ctx = cudarc::driver::CudaContext::new(0).ok()?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        let a = |x| ctx.attribute(x).ok();
        Some((name, (a(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, a(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?), a(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?))
    })
    .as_ref()
}

/// Compute capability 9.0: the sm_90a module and its wgmma kernels (host/src/module.rs).
pub fn hopper() -> bool {
    gpu().is_some_and(|g| g.1 == (9, 0))
}

fn kernel_dtype(dtype: DType) -> variants::KernelDType {
    if dtype == DType::F16 { variants::KernelDType::F16 } else { variants::KernelDType::BF16 }
}

/// The forward kernel family `choice` runs at head dim `d`: "wgmma ws" (the warp-specialized kernel; the
/// suites' operands are ones the copy engine can address), "wgmma" or "mma.sync".
pub fn fwd_family(d: usize, dtype: DType, choice: KernelChoice) -> &'static str {
    if hopper() && !choice.no_wgmma && !choice.fwd_no_ws && variants::fwd_ws_kernel_name(d, kernel_dtype(dtype)).is_some() {
        "wgmma ws"
    } else if hopper() && !choice.no_wgmma && variants::fwd_wg_kernel_name(d, kernel_dtype(dtype)).is_some() {
        "wgmma"
    } else {
        "mma.sync"
    }
}

/// Keys from which a plain problem (and ALiBi alone) runs the wide-tile ws forward where there is one.
pub const FWD_WS_WIDE_MIN_KEYS: usize = variants::FWD_WS_WIDE_MIN_KEYS;
/// Keys from which dropout alone runs the wide-tile ws forward's `_dropout` copy.
pub const FWD_WS_WIDE_DROPOUT_MIN_KEYS: usize = variants::FWD_WS_WIDE_DROPOUT_MIN_KEYS;

/// `fwd_family` of a plain problem with `max_seqlen_k` keys: "wgmma ws wide" where the dispatch runs the
/// wide-tile ws kernel (`fwd_ws_wide_kernel`, from `FWD_WS_WIDE_MIN_KEYS` keys on).
pub fn fwd_family_keys(d: usize, dtype: DType, choice: KernelChoice, max_seqlen_k: usize) -> &'static str {
    match fwd_family(d, dtype, choice) {
        "wgmma ws" if max_seqlen_k >= variants::FWD_WS_WIDE_MIN_KEYS && variants::fwd_ws_wide_kernel(d, kernel_dtype(dtype)).is_some() => "wgmma ws wide",
        f => f,
    }
}

/// The backward's dK/dV kernel family without score modifiers: "wgmma ws" (the warp-specialized kernel,
/// default mode at head dims 64-128; the suites' operands are ones the copy engine can address), "wgmma"
/// (a CTA per key block; one block is the chained kernel too), "wgmma chained" (`bwd_chain_all` over
/// several key blocks; "wgmma ws chained"), "mma.sync" (atomic dq) or "mma.sync deterministic" (the
/// separate dq kernel). `max_seqlen_k`: sk, or varlen's max_seqlen_k. With score modifiers: `no_ws` of it.
pub fn bwd_family(d: usize, dtype: DType, deterministic: bool, choice: KernelChoice, max_seqlen_k: usize) -> &'static str {
    if hopper() && !choice.no_wgmma && variants::bwd_wg_kernel_name(d, kernel_dtype(dtype)).is_some() {
        // (Deterministic: through the `Tensor` API, whose workspace holds the split dq accumulators.)
        let chained = choice.bwd_chain_all && max_seqlen_k > variants::bwd_wg_block_n(d);
        let ws = !choice.bwd_no_ws && variants::bwd_ws_kernel_name(d, kernel_dtype(dtype)).is_some();
        let ordered = !choice.bwd_chain_all && (choice.bwd_ordered_all || variants::bwd_ordered_by_default(d));
        match (deterministic, chained) {
            (false, false) if ws => "wgmma ws",
            (false, true) if ws => "wgmma ws chained",
            // The ordered twins (one accumulator, turn counters; with score modifiers at 192 / 256 only:
            // bwd_mods_family), not under bwd_chain_all; by default at every head dim (64-256).
            (true, _) if ws && ordered => "wgmma ws deterministic ordered",
            (true, _) if ordered => "wgmma deterministic ordered",
            (false, false) => "wgmma",
            (false, true) => "wgmma chained",
            (true, false) => "wgmma deterministic",
            (true, true) => "wgmma deterministic chained",
        }
    } else if deterministic {
        "mma.sync deterministic"
    } else {
        "mma.sync"
    }
}

/// The forward's choices worth running here: the default, and on Hopper `no_wgmma` and `fwd_no_ws`
/// (elsewhere they change nothing).
pub fn fwd_choices() -> Vec<(&'static str, KernelChoice)> {
    if hopper() { vec![("default", DEFAULT), ("no_wgmma", NO_WGMMA), ("fwd_no_ws", FWD_NO_WS)] } else { vec![("default", DEFAULT)] }
}

/// The backward's: the default and `no_wgmma` on Hopper, plus `bwd_chain_all` where it picks another path than the default
/// (the chained wgmma kernel over several key blocks), `bwd_no_ws` where the default is the
/// warp-specialized kernel (the wgmma one without it) and `bwd_ordered_all` where the deterministic
/// default is the split copies (the ordered `_det` twins at head dims 64 and 96).
pub fn bwd_choices(d: usize, dtype: DType, deterministic: bool, max_seqlen_k: usize) -> Vec<(&'static str, KernelChoice)> {
    let mut c = if hopper() { vec![("default", DEFAULT), ("no_wgmma", NO_WGMMA)] } else { vec![("default", DEFAULT)] };
    if bwd_family(d, dtype, deterministic, CHAIN_ALL, max_seqlen_k) != bwd_family(d, dtype, deterministic, DEFAULT, max_seqlen_k) {
        c.push(("bwd_chain_all", CHAIN_ALL));
    }
    if bwd_family(d, dtype, deterministic, BWD_NO_WS, max_seqlen_k) != bwd_family(d, dtype, deterministic, DEFAULT, max_seqlen_k) {
        c.push(("bwd_no_ws", BWD_NO_WS));
    }
    if bwd_family(d, dtype, deterministic, ORDERED_ALL, max_seqlen_k) != bwd_family(d, dtype, deterministic, DEFAULT, max_seqlen_k) {
        c.push(("bwd_ordered_all", ORDERED_ALL));
    }
    c
}

/// The backward family with score modifiers, which run the `_mods` twins of the same kernels, except the ordered
/// deterministic mode, which has a `_mods_det` twin at the wide head dims (192, 256) only (elsewhere the split
/// copies run).
pub fn bwd_mods_family(family: &'static str, d: usize) -> &'static str {
    match family {
        "wgmma ws deterministic ordered" | "wgmma deterministic ordered" if d <= 128 => "wgmma deterministic",
        f => f,
    }
}

/// What one test ran and passed: per (kernel choice, family), the runs and head dims.
pub struct Tally {
    test: &'static str,
    runs: BTreeMap<(&'static str, &'static str), (usize, BTreeSet<usize>)>,
}

impl Tally {
    pub fn new(test: &'static str) -> Tally {
        Tally { test, runs: BTreeMap::new() }
    }

    pub fn add(&mut self, choice: &'static str, family: &'static str, d: usize) {
        let e = self.runs.entry((choice, family)).or_default();
        e.0 += 1;
        e.1.insert(d);
    }

    /// One line per (choice, family), written past the test harness's capture so that the GPU
    /// machine's log shows which kernels each passing test ran.
    pub fn report(&self) {
        let dev = match gpu() {
            Some((name, (ma, mi), _)) => format!("{name}, sm_{ma}{mi}{}", if hopper() { "" } else { ": not Hopper, no_wgmma not repeated" }),
            None => "no GPU (the CPU path)".to_string(),
        };
        let mut s = format!("KERNELS {} passed on {dev}:\n", self.test);
        for ((choice, family), (n, dims)) in &self.runs {
            let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            s += &format!("    {choice:<14} -> {family:<23} {n:>4} runs, head dims {}\n", dims.join(","));
        }
        let _ = std::io::stderr().write_all(s.as_bytes());
    }
}
