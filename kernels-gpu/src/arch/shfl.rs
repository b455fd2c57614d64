//! Warp shuffles.
use core::arch::asm;

/// `shfl.sync.bfly`: the value of lane `lane ^ mask` (all 32 lanes take part). Not `pure`: the compiler
/// must not sink it into a branch where only some lanes use the result (a full-mask shfl.sync reached by
/// part of the warp hangs; it did, in the backward's dq reduction).
#[inline(always)]
pub fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    let r: f32;
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 0x1f, 0xffffffff;", r = out(reg32) r, v = in(reg32) v,
            m = in(reg32) mask, options(nomem, nostack))
    }
    r
}

/// `shfl.sync.bfly` on a 32-bit integer (as `shfl_xor_f32`).
#[inline(always)]
pub fn shfl_xor_u32(v: u32, mask: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 0x1f, 0xffffffff;", r = out(reg32) r, v = in(reg32) v,
            m = in(reg32) mask, options(nomem, nostack))
    }
    r
}

/// `shfl.sync.idx`: lane `src`'s value (all 32 lanes take part; not `pure`, as above).
#[inline(always)]
pub fn shfl_idx_u32(v: u32, src: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("shfl.sync.idx.b32 {r}, {v}, {s}, 0x1f, 0xffffffff;", r = out(reg32) r, v = in(reg32) v,
            s = in(reg32) src, options(nomem, nostack))
    }
    r
}

/// `vote.sync.any`: whether `p` holds on any lane (all 32 lanes take part; not `pure`, as above).
#[inline(always)]
pub fn any_lane(p: bool) -> bool {
    let r: u32;
    unsafe {
        asm!("{{ .reg .pred p, q; setp.ne.u32 p, {v}, 0; vote.sync.any.pred q, p, 0xffffffff; selp.u32 {r}, 1, 0, q; }}",
            r = out(reg32) r, v = in(reg32) p as u32, options(nomem, nostack))
    }
    r != 0
}
