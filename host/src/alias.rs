//! Whether two strided views share a byte: the raw layer refuses outputs that alias inputs. Views whose
//! byte ranges are disjoint never overlap; interleaved views with the same strides and dtype (q, k, v or
//! dq, dk, dv as slices of one packed qkv tensor) are decided exactly; anything else whose ranges meet
//! counts as overlapping.

use crate::types::View;

/// Nodes the exact search may visit before it gives up and answers "overlapping".
const SEARCH_BUDGET: usize = 4096;

pub fn overlap(a: &View<'_>, b: &View<'_>) -> bool {
    let (Some(span_a), Some(span_b)) = (a.span(), b.span()) else { return true };
    if span_a == 0 || span_b == 0 {
        return false;
    }
    let end = |v: &View<'_>, span: usize| v.addr as u128 + (span as u128) * v.dtype.size() as u128;
    if end(a, span_a) <= b.addr as u128 || end(b, span_b) <= a.addr as u128 {
        return false;
    }
    if a.dtype != b.dtype || a.strides != b.strides || a.rank() != b.rank() {
        return true;
    }
    let size = a.dtype.size() as i128;
    let delta = b.addr as i128 - a.addr as i128;
    if delta % size != 0 {
        return true;
    }
    // An element of both: sum_k (i_k - j_k) s_k = delta / size with 0 <= i_k < na_k, 0 <= j_k < nb_k.
    // Each dimension's difference d_k ranges over [-(nb_k - 1), na_k - 1]; walk dimensions by stride,
    // largest first, keeping only the d_k that leave a remainder the smaller ones can still reach.
    // Fixed arrays: the CUDA path allocates nothing per call.
    if a.rank() > 4 {
        return true;
    }
    let mut all = [(0i128, 0i128, 0i128); 4];
    let mut n = 0;
    for k in (0..a.rank()).filter(|&k| a.strides[k] != 0) {
        all[n] = (a.strides[k] as i128, -(b.shape[k] as i128 - 1), a.shape[k] as i128 - 1);
        n += 1;
    }
    let dims = &mut all[..n];
    dims.sort_unstable_by_key(|x| std::cmp::Reverse(x.0));
    // Reach of the dimensions from k on: the smallest and largest sums they can make.
    let mut reach = [(0i128, 0i128); 5];
    for k in (0..dims.len()).rev() {
        let (s, lo, hi) = dims[k];
        reach[k] = (reach[k + 1].0 + lo * s, reach[k + 1].1 + hi * s);
    }
    let mut budget = SEARCH_BUDGET;
    solvable(dims, &reach, 0, delta / size, &mut budget)
}

/// Whether two elements of one view may share memory (an output written through such a view races with
/// itself, and the result depends on the order of the writes): its dimensions of extent above 1, ordered
/// by stride, must each step past everything the smaller ones span. Every dense, transposed, sliced or
/// packed layout passes; a broadcast (stride 0) one fails, and so does any other that this sufficient
/// test cannot clear. (Fixed arrays: the CUDA path allocates nothing per call.)
pub fn self_overlap(v: &View<'_>) -> bool {
    if v.shape.contains(&0) {
        return false;
    }
    let mut dims = [(0usize, 0usize); 8];
    let mut n = 0;
    for (&extent, &stride) in v.shape.iter().zip(v.strides).filter(|(e, _)| **e > 1) {
        if n == dims.len() {
            return true;
        }
        dims[n] = (stride, extent);
        n += 1;
    }
    let dims = &mut dims[..n];
    dims.sort_unstable();
    // The largest offset the smaller dimensions reach.
    let mut reach = 0usize;
    for &(stride, extent) in dims.iter() {
        if stride <= reach {
            return true;
        }
        match (extent - 1).checked_mul(stride).and_then(|x| x.checked_add(reach)) {
            Some(r) => reach = r,
            None => return true,
        }
    }
    false
}

fn solvable(dims: &[(i128, i128, i128)], reach: &[(i128, i128)], k: usize, rem: i128, budget: &mut usize) -> bool {
    if k == dims.len() {
        return rem == 0;
    }
    if *budget == 0 {
        return true;
    }
    *budget -= 1;
    let (s, lo, hi) = dims[k];
    let (inner_lo, inner_hi) = reach[k + 1];
    // rem - d s must lie in [inner_lo, inner_hi].
    let first = lo.max(div_ceil(rem - inner_hi, s));
    let last = hi.min(div_floor(rem - inner_lo, s));
    (first..=last).any(|d| solvable(dims, reach, k + 1, rem - d * s, budget))
}

fn div_floor(a: i128, b: i128) -> i128 {
    let q = a / b;
    if (a % b != 0) && ((a < 0) != (b < 0)) { q - 1 } else { q }
}

fn div_ceil(a: i128, b: i128) -> i128 {
    -div_floor(-a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DType;

    fn view<'a>(addr: u64, shape: &'a [usize], strides: &'a [usize]) -> View<'a> {
        View { addr, dtype: DType::BF16, shape, strides }
    }

    /// A xorshift64 stream from `state`: `next(n)` draws below n.
    fn xorshift(mut state: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        }
    }

    /// Brute force: the byte sets of both views.
    fn brute(a: &View<'_>, b: &View<'_>) -> bool {
        let bytes = |v: &View<'_>| {
            let mut set = std::collections::HashSet::new();
            let n = v.numel();
            for mut lin in 0..n {
                let mut off = 0;
                for d in (0..v.rank()).rev() {
                    off += (lin % v.shape[d]) * v.strides[d];
                    lin /= v.shape[d];
                }
                for byte in 0..v.dtype.size() as u64 {
                    set.insert(v.addr + (off * v.dtype.size()) as u64 + byte);
                }
            }
            set
        };
        !bytes(a).is_disjoint(&bytes(b))
    }

    #[test]
    fn packed_qkv_slices_are_disjoint_and_overlaps_are_found() {
        // q, k, v as slices of one [B, S, 3, H, D] tensor: strides (S*3*H*D, 3*H*D, D, 1).
        let (b, s, h, d) = (2, 5, 3, 4);
        let shape = [b, s, h, d];
        let strides = [s * 3 * h * d, 3 * h * d, d, 1];
        let at = |i: usize| (i * h * d * 2) as u64;
        for (i, j) in [(0, 1), (0, 2), (1, 2)] {
            assert!(!overlap(&view(at(i), &shape, &strides), &view(at(j), &shape, &strides)));
        }
        assert!(overlap(&view(at(1), &shape, &strides), &view(at(1), &shape, &strides)));
        // A head shifted by one element overlaps.
        assert!(overlap(&view(0, &shape, &strides), &view(2, &shape, &strides)));
    }

    #[test]
    fn self_overlap_is_found_and_common_layouts_pass() {
        let cases: [(&[usize], &[usize], bool); 6] = [
            (&[2, 3, 4], &[12, 4, 1], false),
            (&[2, 3, 4], &[4, 8, 1], false),
            (&[2, 3, 4], &[0, 4, 1], true),
            (&[1, 3, 4], &[0, 4, 1], false),
            (&[2, 3, 4], &[12, 2, 1], true),
            (&[2, 0, 4], &[0, 0, 0], false),
        ];
        for (shape, strides, want) in cases {
            assert_eq!(self_overlap(&view(0, shape, strides)), want, "{shape:?} {strides:?}");
        }
        // Sufficient: a view it clears has no element twice (brute force).
        let mut next = xorshift(0x2545f4914f6cdd1d);
        for _ in 0..3000 {
            let shape = [1 + next(3) as usize, 1 + next(4) as usize, 1 + next(4) as usize];
            let strides = [next(30) as usize, next(10) as usize, next(3) as usize];
            let v = view(0, &shape, &strides);
            if !self_overlap(&v) {
                let mut seen = std::collections::HashSet::new();
                for i in 0..shape[0] {
                    for j in 0..shape[1] {
                        for k in 0..shape[2] {
                            assert!(seen.insert(i * strides[0] + j * strides[1] + k * strides[2]), "{v:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exact_search_matches_brute_force() {
        let mut next = xorshift(0x9e3779b97f4a7c15);
        for _ in 0..3000 {
            let shape_a = [1 + next(3) as usize, 1 + next(3) as usize, 1 + next(4) as usize];
            let shape_b = [1 + next(3) as usize, 1 + next(3) as usize, 1 + next(4) as usize];
            let strides = [next(40) as usize, next(12) as usize, 1];
            let (a, b) = (view(2 * next(30), &shape_a, &strides), view(2 * next(30), &shape_b, &strides));
            assert_eq!(overlap(&a, &b), brute(&a, &b), "{a:?} {b:?}");
        }
    }
}
