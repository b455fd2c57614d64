//! Rotary position embedding: each pair of features (x, y) of the first `rotary_dim` of a head turns by
//! the angle of its position, (x cos - y sin, x sin + y cos). Pairs are (2i, 2i+1) interleaved, else
//! (i, i + rotary_dim/2); pair i uses column i of the cos / sin tables.

use super::{load_rows, HostSlice};
use crate::problem::Rotary;

/// The caller's cos / sin tables.
pub(crate) struct Rope<'a> {
    pub rotary: Rotary,
    pub cos: HostSlice<'a>,
    pub sin: HostSlice<'a>,
}

impl Rope<'_> {
    /// Rotates the head `x` (f32, D wide) to position `pos` (checked against the tables' length).
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        let r = &self.rotary;
        let half = r.dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);
        load_rows(self.cos, pos * r.cos_row, 0, 1, half, &mut cos);
        load_rows(self.sin, pos * r.sin_row, 0, 1, half, &mut sin);
        for i in 0..half {
            let (a, b) = if r.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * cos[i] - x1 * sin[i];
            x[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}
