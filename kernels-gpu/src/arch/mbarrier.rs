//! Shared-memory transaction barriers (`mbarrier`, sm_90 forms): a barrier completes a phase when its
//! expected arrivals have arrived and its expected transaction bytes (the bulk tensor copies that name
//! it) have landed. Waiting names the parity of the phase waited for.
use core::arch::asm;

/// Initialize the barrier at shared address `bar` to expect `count` arrivals per phase.
#[inline(always)]
pub unsafe fn init(bar: u32, count: u32) {
    unsafe { asm!("mbarrier.init.shared::cta.b64 [{b}], {c};", b = in(reg32) bar, c = in(reg32) count, options(nostack)) }
}

/// Make this thread's `init`s visible to the other threads and to the copy engine (then a barrier).
#[inline(always)]
pub fn fence_init() {
    unsafe { asm!("fence.mbarrier_init.release.cluster;", options(nostack)) }
}

/// Arrive once and add `bytes` to the transaction count the current phase waits for.
#[inline(always)]
pub unsafe fn arrive_expect_tx(bar: u32, bytes: u32) {
    unsafe { asm!("mbarrier.arrive.expect_tx.shared::cta.b64 _, [{b}], {n};", b = in(reg32) bar, n = in(reg32) bytes, options(nostack)) }
}

/// Arrive once (release semantics: this thread's earlier shared-memory reads are done).
#[inline(always)]
pub unsafe fn arrive(bar: u32) {
    unsafe { asm!("mbarrier.arrive.shared::cta.b64 _, [{b}];", b = in(reg32) bar, options(nostack)) }
}

/// Whether the phase of parity `parity` has completed (one bounded wait in hardware).
#[inline(always)]
pub unsafe fn try_wait(bar: u32, parity: u32) -> bool {
    let done: u32;
    unsafe {
        asm!(
            "{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{b}], {ph}; selp.u32 {d}, 1, 0, p; }}",
            b = in(reg32) bar, ph = in(reg32) parity, d = out(reg32) done, options(nostack)
        )
    }
    done != 0
}

/// Block until the phase of parity `parity` has completed; its copies' bytes are then visible.
#[inline(always)]
pub unsafe fn wait(bar: u32, parity: u32) {
    while !unsafe { try_wait(bar, parity) } {}
}
