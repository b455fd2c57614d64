//! Barriers. Call these only from block-uniform control flow.
use core::arch::asm;

/// `bar.sync 0`: every thread of the block arrives and waits; orders shared-memory accesses.
#[inline(always)]
pub fn sync_threads() {
    unsafe { asm!("bar.sync 0;", options(nostack)) }
}

/// `fence.acq_rel.gpu`: this thread's earlier global accesses (reductions included) are ordered before its
/// later ones for every thread of the GPU; with a barrier after it, the block reads what the block wrote.
#[inline(always)]
pub fn fence_gpu() {
    unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) }
}

/// `bar.sync id, threads`: wait at named barrier `id` until `threads` threads (this warp's included)
/// have arrived. Warp-uniform control flow only.
#[inline(always)]
pub fn named_sync(id: u32, threads: u32) {
    unsafe { asm!("bar.sync {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack)) }
}

/// `bar.arrive id, threads`: count this warp at named barrier `id` without waiting.
#[inline(always)]
pub fn named_arrive(id: u32, threads: u32) {
    unsafe { asm!("bar.arrive {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack)) }
}

/// `bar.warp.sync`: the warp's lanes reconverge here; orders their memory accesses.
#[inline(always)]
pub fn sync_warp() {
    unsafe { asm!("bar.warp.sync 0xffffffff;", options(nostack)) }
}

/// `griddepcontrol.wait` (sm_90, programmatic dependent launch): block until the grids this one was
/// launched after have completed and their memory is visible. Immediate for a grid launched without the
/// programmatic-serialization attribute (the stream already ordered it); nothing before sm_90.
#[inline(always)]
pub fn grid_dependency_wait() {
    #[cfg(fa_sm90)]
    unsafe {
        asm!("griddepcontrol.wait;", options(nostack))
    }
}

/// `griddepcontrol.launch_dependents` (sm_90): once every block of this grid has run this (or exited),
/// a grid launched after it with programmatic serialization may start; it still waits for this grid's
/// completion at its `grid_dependency_wait`. Nothing before sm_90.
#[inline(always)]
pub fn launch_dependents() {
    #[cfg(fa_sm90)]
    unsafe {
        asm!("griddepcontrol.launch_dependents;", options(nostack))
    }
}

/// A barrier over every thread of the block's cluster (sm_90: `barrier.cluster.arrive.release` then
/// `barrier.cluster.wait.acquire`, so each block's shared-memory writes before it are visible to the
/// cluster's `smem::ld_cluster_f32` after it); a block launched without a cluster is a cluster of one. Before
/// sm_90 there are no clusters: `bar.sync 0`. Every thread of every block of the cluster, in uniform
/// control flow.
#[inline(always)]
pub fn cluster_sync() {
    #[cfg(fa_sm90)]
    unsafe {
        asm!("barrier.cluster.arrive.release.aligned;", "barrier.cluster.wait.acquire.aligned;", options(nostack))
    }
    #[cfg(not(fa_sm90))]
    sync_threads();
}
