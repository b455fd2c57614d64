//! e^x for the forward's softmax, in operations that vectorize (libm's `expf` is a call per score: a
//! fifth of the CPU forward's time). Cody-Waite range reduction, x = n ln 2 + r with |r| <= ln 2 / 2, a
//! degree-7 Taylor polynomial for e^r (truncation below 0.1 ulp) and 2^n as two exponent-field factors, so
//! results below f32's normal range come out as the subnormals libm gives (a gradient made of such tiny
//! probabilities is compared against its f64 reference by the tests): within 2 ulp of e^x (the unit test
//! measures it against libm). Below -104, 0; above 88.7, +inf; NaN stays NaN.

/// e^x, see the module.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer (to nearest even), held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n as 2^h 2^(n - h), h = n / 2 rounded down: both normal numbers for n in -150..=128 (the exponent
    // field n + 127), so p 2^h is exact and the one rounding lands on a subnormal where e^x is one.
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let h = n >> 1;
    let pow2 = |e: i32| f32::from_bits((e.wrapping_add(127) as u32) << 23);
    let y = (p * pow2(h)) * pow2(n - h);
    if x < -104.0 {
        0.0
    } else if x > 88.72 {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i32).wrapping_sub(b.to_bits() as i32).unsigned_abs()
    }

    #[test]
    fn within_two_ulp_of_libm() {
        let mut worst = (0u32, 0.0f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = -104.0 + (88.72 + 104.0) * i as f32 / n as f32;
            let u = ulps(exp(x), x.exp());
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
        // Around 0, where a softmax's largest terms are.
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-5;
            assert!(ulps(exp(x), x.exp()) <= 2, "x = {x}");
        }
    }

    #[test]
    fn edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-87.2) > 0.0 && exp(-87.2).is_normal());
        // Subnormal results, as libm's: down to the smallest one, 2^-149 (e^-103.28).
        assert!(exp(-95.0) > 0.0 && !exp(-95.0).is_normal());
        assert_eq!(exp(-103.2), (-103.2f32).exp());
        assert_eq!(exp(88.7), (88.7f32).exp());
    }
}
