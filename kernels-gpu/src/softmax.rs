//! Online softmax over K/V tiles, in base 2: scores arrive raw (q.k, softcapped if asked), the running max
//! is kept raw, and `scale_log2 = softmax_scale * log2(e)` (computed once on the host) is folded into the
//! exponent's single FMA. Each thread owns two rows per 16-row m-tile (g and g + 8 of the mma layout); the
//! four threads of a quad share a row, so row reductions are two butterfly shuffles.

use crate::arch::math::{exp2, fma, log2, rcp};
use crate::arch::shfl::shfl_xor_f32;

/// Running max (raw score units) and this thread's partial sum of one row.
#[derive(Clone, Copy)]
pub struct RowState {
    pub max: f32,
    pub sum: f32,
}

impl RowState {
    pub const EMPTY: RowState = RowState { max: f32::NEG_INFINITY, sum: 0.0 };
}

#[inline(always)]
fn quad_max(x: f32) -> f32 {
    let x = x.max(shfl_xor_f32(x, 1));
    x.max(shfl_xor_f32(x, 2))
}

#[inline(always)]
pub(crate) fn quad_sum(x: f32) -> f32 {
    let x = x + shfl_xor_f32(x, 1);
    x + shfl_xor_f32(x, 2)
}

/// How far (base 2) a tile may raise a row's max before the running max follows it, where the max is
/// lazy (the ws forward above head dim 64, without score modifiers; the `_decode` kernels). Below it the
/// row keeps its max, the tile's probabilities are at most 2^8 (f16 and bf16 hold them; O and the sums
/// are f32), and neither O nor the sum is rescaled: the kernel then skips O's rescale for the warp
/// (`any_lane`), which after a row's first tiles is nearly always (FA4's conditional rescale). The sum
/// and the final LSE are taken against the same max, so the result is exact either way. (The wg kernel
/// keeps the eager max: the lazy update there made ptxas serialize its wgmma, C7513. The mma.sync decode
/// kernels take it, each thread skipping its own rows' rescale; the other mma.sync kernels were not
/// measured with it.)
pub const RESCALE_LOG2: f32 = 8.0;

/// Fold one tile of a row into its state. `s` holds this thread's scores of the row (pairs from each n8
/// tile); they are replaced by the unnormalised probabilities. Returns the factor the row's O accumulator
/// must be multiplied by, or `None` when the running max did not move (no rescale needed). `LAZY`: the
/// max moves only past `RESCALE_LOG2`.
#[inline(always)]
pub fn update_row<const NN: usize, const LAZY: bool>(state: &mut RowState, s: &mut [[f32; 2]; NN], scale_log2: f32) -> Option<f32> {
    update_row_with::<NN, false, LAZY>(state, s, scale_log2, 0.0)
}

/// `update_row` of the scores `s + offset` (one offset for this thread's part of the row: ALiBi's linear
/// form, fwd/mod.rs), without forming them: the offset joins the tile max and the exponent's constant.
#[inline(always)]
pub fn update_row_offset<const NN: usize, const LAZY: bool>(state: &mut RowState, s: &mut [[f32; 2]; NN], scale_log2: f32, offset: f32) -> Option<f32> {
    update_row_with::<NN, true, LAZY>(state, s, scale_log2, offset)
}

#[inline(always)]
fn update_row_with<const NN: usize, const OFFSET: bool, const LAZY: bool>(state: &mut RowState, s: &mut [[f32; 2]; NN], scale_log2: f32, offset: f32) -> Option<f32> {
    let mut tile_max = f32::NEG_INFINITY;
    for pair in s.iter() {
        tile_max = tile_max.max(pair[0]).max(pair[1]);
    }
    if OFFSET {
        // -inf (every key of this part hidden) stays -inf.
        tile_max += offset;
    }
    let new_max = quad_max(tile_max.max(state.max));
    // Lazy (`LAZY`): the max moves only by more than `RESCALE_LOG2` (or from -inf), else the tile's
    // probabilities are taken against the old one (each at most 2^RESCALE_LOG2).
    let moved = if LAZY { new_max > state.max && (state.max == f32::NEG_INFINITY || (new_max - state.max) * scale_log2 > RESCALE_LOG2) } else { new_max > state.max };
    let rescale = if moved {
        // exp2(-inf) == 0 handles the first tile; the accumulator is zero then anyway.
        let f = exp2((state.max - new_max) * scale_log2);
        state.sum *= f;
        state.max = new_max;
        Some(f)
    } else {
        None
    };
    // The max the probabilities are taken against (without `LAZY`, new_max == state.max by now).
    let max = if LAZY { state.max } else { new_max };
    // A row with every key masked so far keeps max -inf: subtract 0 so exp2(-inf) gives 0, not NaN.
    let max_scaled = if max == f32::NEG_INFINITY {
        0.0
    } else if OFFSET {
        (max - offset) * scale_log2
    } else {
        max * scale_log2
    };
    let mut sum = 0.0f32;
    for pair in s.iter_mut() {
        pair[0] = exp2(fma(pair[0], scale_log2, -max_scaled));
        pair[1] = exp2(fma(pair[1], scale_log2, -max_scaled));
        sum += pair[0] + pair[1];
    }
    state.sum += sum;
    rescale
}

/// The row's final `(1 / sum, lse)`: `(0, -inf)` for a row that saw no key, so its output is exactly 0.
#[inline(always)]
pub fn finalize_row(state: &RowState, scale_log2: f32) -> (f32, f32) {
    let sum = quad_sum(state.sum);
    if sum == 0.0 || sum != sum {
        (0.0, f32::NEG_INFINITY)
    } else {
        let lse_log2 = state.max * scale_log2 + log2(sum);
        (rcp(sum), lse_log2 * core::f32::consts::LN_2)
    }
}
