//! Warp shuffles.
use core::arch::asm;

/// `shfl.sync.bfly`: the value of lane `lane ^ mask` (all 32 lanes take part).
#[inline(always)]
pub fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    let r: f32;
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 0x1f, 0xffffffff;", r = out(reg32) r, v = in(reg32) v,
            m = in(reg32) mask, options(pure, nomem, nostack))
    }
    r
}
