//! Barriers. Call these only from block-uniform control flow.
use core::arch::asm;

/// `bar.sync 0`: every thread of the block arrives and waits; orders shared-memory accesses.
#[inline(always)]
pub fn sync_threads() {
    unsafe { asm!("bar.sync 0;", options(nostack)) }
}
