//! `cp.async` (sm_80+): global -> shared copies that bypass registers, grouped and waited on by count.
use core::arch::asm;

/// Copy 16 bytes from global `src` to shared `dst`; when `valid` is false nothing is read and the 16
/// bytes are zero-filled (src-size 0), so out-of-range rows cost no bounds branch and read no memory.
#[inline(always)]
pub unsafe fn cp_async_16(dst: u32, src: u64, valid: bool) {
    let src_bytes: u32 = if valid { 16 } else { 0 };
    unsafe {
        asm!("cp.async.cg.shared.global [{d}], [{s}], 16, {n};", d = in(reg32) dst, s = in(reg64) src,
            n = in(reg32) src_bytes, options(nostack))
    }
}

/// Close the group of copies issued since the last commit.
#[inline(always)]
pub fn commit_group() {
    unsafe { asm!("cp.async.commit_group;", options(nostack)) }
}

/// Wait until at most `N` committed groups are still in flight (this thread's copies only: follow with
/// a barrier before reading what other threads copied).
#[inline(always)]
pub fn wait_group<const N: u32>() {
    unsafe { asm!("cp.async.wait_group {n};", n = const N, options(nostack)) }
}

/// Copy 4 bytes from global `src` to shared `dst` (both 4-byte aligned); zero-filled when `valid` is false.
#[inline(always)]
pub unsafe fn cp_async_4(dst: u32, src: u64, valid: bool) {
    let src_bytes: u32 = if valid { 4 } else { 0 };
    unsafe {
        asm!("cp.async.ca.shared.global [{d}], [{s}], 4, {n};", d = in(reg32) dst, s = in(reg64) src,
            n = in(reg32) src_bytes, options(nostack))
    }
}
