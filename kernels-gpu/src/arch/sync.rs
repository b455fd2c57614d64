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
