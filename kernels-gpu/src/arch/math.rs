//! Fast math: the special-function unit's exp2/log2/tanh, and f32 -> 16-bit packing.
use core::arch::asm;

/// 2^x with `ex2.approx.ftz.f32` (2 ulp; exact 0 for -inf).
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    let r: f32;
    unsafe { asm!("ex2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// log2(x) with `lg2.approx.ftz.f32`.
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    let r: f32;
    unsafe { asm!("lg2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// tanh(x) with `tanh.approx.f32` (sm_75+, about 2^-11 relative error).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let r: f32;
    unsafe { asm!("tanh.approx.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// 1/x, IEEE round-to-nearest.
#[inline(always)]
pub fn rcp(x: f32) -> f32 {
    let r: f32;
    unsafe { asm!("rcp.rn.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// `a * b + c` in one rounding.
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    unsafe { asm!("fma.rn.f32 {r}, {a}, {b}, {c};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c, options(pure, nomem, nostack)) }
    r
}

/// `s - |a b + c|` (`ADD`: `s + |a b + c|`) in one asm block: an FMA, then one add with |.| on its
/// operand. One block, so that LLVM neither keeps |.| as an integer AND (it holds asm values in b32
/// registers) nor hoists the FMAs of both signs' loops (`mods::alibi_qk_fast`) above their branch, which
/// kept all of them live at once.
#[inline(always)]
pub fn sub_abs_fma<const ADD: bool>(s: f32, a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    if ADD {
        unsafe { asm!("{{ .reg .f32 t; fma.rn.f32 t, {a}, {b}, {c}; abs.f32 t, t; add.rn.f32 {r}, {s}, t; }}", r = out(reg32) r, s = in(reg32) s, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c, options(pure, nomem, nostack)) }
    } else {
        unsafe { asm!("{{ .reg .f32 t; fma.rn.f32 t, {a}, {b}, {c}; abs.f32 t, t; sub.rn.f32 {r}, {s}, t; }}", r = out(reg32) r, s = in(reg32) s, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c, options(pure, nomem, nostack)) }
    }
    r
}

/// Pack two f32 into bf16x2 (`lo` in the low half), round to nearest even.
#[inline(always)]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    unsafe { asm!("cvt.rn.bf16x2.f32 {r}, {hi}, {lo};", r = out(reg32) r, hi = in(reg32) hi, lo = in(reg32) lo, options(pure, nomem, nostack)) }
    r
}

/// Pack two f32 into f16x2 (`lo` in the low half), round to nearest even.
#[inline(always)]
pub fn pack_f16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    unsafe { asm!("cvt.rn.f16x2.f32 {r}, {hi}, {lo};", r = out(reg32) r, hi = in(reg32) hi, lo = in(reg32) lo, options(pure, nomem, nostack)) }
    r
}

/// The two bf16 halves of `x` as f32 (`lo` from the low half); exact.
#[inline(always)]
pub fn unpack_bf16x2(x: u32) -> (f32, f32) {
    (f32::from_bits(x << 16), f32::from_bits(x & 0xffff_0000))
}

/// The two f16 halves of `x` as f32 (`lo` from the low half); exact.
#[inline(always)]
pub fn unpack_f16x2(x: u32) -> (f32, f32) {
    let (lo, hi): (f32, f32);
    unsafe {
        asm!("{{ .reg .b16 l, h; mov.b32 {{l, h}}, {x}; cvt.f32.f16 {lo}, l; cvt.f32.f16 {hi}, h; }}",
            x = in(reg32) x, lo = out(reg32) lo, hi = out(reg32) hi, options(pure, nomem, nostack))
    }
    (lo, hi)
}

/// `a / b` and `a % b` without Rust's divide-by-zero check, whose `trap` path (reachable from a warp-
/// specialized kernel's consumer code) makes ptxas compile that code against the kernel's entry
/// register count instead of its `setmaxnreg` budget. The callers' divisors are nonzero by validation
/// (head counts, tile counts); a zero gives an unspecified quotient, never a trap.
#[inline(always)]
pub fn div_rem_u32(a: u32, b: u32) -> (u32, u32) {
    let (q, r): (u32, u32);
    unsafe {
        asm!("div.u32 {q}, {a}, {b};", "rem.u32 {r}, {a}, {b};", q = out(reg32) q, r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, options(pure, nomem, nostack))
    }
    (q, r)
}
