//! The CPU path's hot loops, compiled per head dim and per vector ISA: `by_head_dim!` calls a
//! `<const D: usize>` function with D the problem's head dim (0 for one not in the list: the loops then
//! read it at run time), and `multiversion!` wraps such a function in copies compiled for AVX-512F and
//! AVX2, picked at run time. The copies perform the same operations in the same order (Rust fuses no
//! multiply-add on its own), so every variant gives the same bits; only the vector width differs.

use std::sync::atomic::{AtomicU8, Ordering};

/// The vector instructions the CPU path's loops may use (`set_vectors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    /// The widest the CPU has (the default).
    Auto = 0,
    /// The target's baseline (SSE2 on x86-64): what other CPUs and architectures run.
    Baseline = 1,
    /// At most AVX2.
    Avx2 = 2,
    /// At most AVX-512F.
    Avx512 = 3,
}

static CAP: AtomicU8 = AtomicU8::new(Vectors::Auto as u8);

/// Caps the vector instructions of the CPU path's loops, process-wide (the CPU's own features still decide
/// what runs: a cap above them changes nothing). Every variant gives the same bits; this is for tests and
/// A/B timing.
pub fn set_vectors(v: Vectors) {
    CAP.store(v as u8, Ordering::Relaxed);
}

fn allows(level: Vectors) -> bool {
    let cap = CAP.load(Ordering::Relaxed);
    cap == Vectors::Auto as u8 || cap >= level as u8
}

/// Whether the loops run their AVX-512F copies.
#[inline]
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return allows(Vectors::Avx512) && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the loops run their AVX2 copies (where not AVX-512F's).
#[inline]
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return allows(Vectors::Avx2) && std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `by_head_dim!(d, f(args..))`: `f::<d>(args..)` for the head dims the kernels take, else `f::<0>`.
macro_rules! by_head_dim {
    ($d:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $d {
            32 => $f::<32>($($arg),*),
            64 => $f::<64>($($arg),*),
            96 => $f::<96>($($arg),*),
            128 => $f::<128>($($arg),*),
            192 => $f::<192>($($arg),*),
            256 => $f::<256>($($arg),*),
            _ => $f::<0>($($arg),*),
        }
    };
}

/// `multiversion!(fn name<const D>(args) -> Ret = body)`: defines `name`, which runs `body::<D, W>` (an
/// `#[inline(always)]` function with the same arguments) compiled with AVX-512F or AVX2 where the CPU
/// has them (and `set_vectors` allows them), else as compiled. `W` is the width of the register-blocked
/// loops, the f32 values of two of the variant's vector registers: 32 with AVX-512F, 16 with AVX2, 8 as
/// compiled (SSE2). Four rows by W keys or columns of accumulators then take 8 of the variant's
/// registers and leave room for the operands (AVX2's 16 registers spilled them at 32); the blocking
/// does not change any element's operations or their order, so every W gives the same bits.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<const D: usize>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $body:ident) => {
        $(#[$meta])*
        $vis fn $name<const D: usize>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<const D: usize>($($arg: $ty),*) -> $ret {
                    $body::<D, 32>($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<const D: usize>($($arg: $ty),*) -> $ret {
                    $body::<D, 16>($($arg),*)
                }
                if $crate::cpu::simd::avx512() {
                    // Safety: the CPU has AVX-512F.
                    return unsafe { avx512::<D>($($arg),*) };
                }
                if $crate::cpu::simd::avx2() {
                    // Safety: the CPU has AVX2.
                    return unsafe { avx2::<D>($($arg),*) };
                }
            }
            $body::<D, 8>($($arg),*)
        }
    };
}

pub(crate) use {by_head_dim, multiversion};
