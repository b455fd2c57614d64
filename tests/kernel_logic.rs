//! The kernels' pure index logic (kernels-gpu/src/{mask,block,seqlen}.rs), compiled for the host and
//! checked exhaustively against the mask's definition: the per-element band test and both fragment
//! walkers agree with it, tile skipping never drops a visible key, the unmasked fast path is taken only
//! where every key is visible (and the backward's per-key-block form of that decision agrees), clamped
//! lengths stay in bounds whatever cu_seqlens/seqused hold, and every dq accumulator word the dk/dv
//! kernels add to was zeroed by prep first.

#[path = "../kernels-gpu/src/mask.rs"]
mod mask;
#[path = "../kernels-gpu/src/block.rs"]
mod block;
#[path = "../kernels-gpu/src/seqlen.rs"]
mod seqlen;
#[allow(dead_code)]
#[path = "../host/src/shared/variants.rs"]
mod variants;

use proptest::prelude::*;

/// The definition (flash-attn 2): bottom-right aligned diagonal, inclusive window, -1 unbounded.
fn visible(i: i64, j: i64, sq: i64, sk: i64, left: i64, right: i64) -> bool {
    let diag = i + sk - sq;
    j >= 0 && j < sk && (left < 0 || j >= diag - left) && (right < 0 || j <= diag + right)
}

fn side() -> impl Strategy<Value = i32> {
    prop_oneof![Just(-1), 0..6i32, 0..300i32, Just(i32::MAX)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn allowed_matches_definition(sq in 0..200i32, sk in 0..200i32, left in side(), right in side(), i in 0..200i32, j in -5..205i32) {
        prop_assert_eq!(mask::allowed(i, j, sq, sk, left, right), visible(i as i64, j as i64, sq as i64, sk as i64, left as i64, right as i64));
    }

    #[test]
    fn band_matches_definition(sq in 0..300i32, sk in 1..300i32, left in side(), right in side(), i in -20..300i32, j_frac in 0.0..1.0f64, dr in 0..200i32, dk in -20..200i32) {
        // Pair (i, j) with j a key, seen from the anchor (i - dr, j - dk).
        let j = ((sk - 1) as f64 * j_frac) as i32;
        let band = mask::Band::new(i - dr, j - dk, sq, sk, left, right);
        prop_assert_eq!(band.sees(dk - dr), visible(i as i64, j as i64, sq as i64, sk as i64, left as i64, right as i64));
    }

    #[test]
    fn query_major_walker_hides_exactly_the_masked_pairs(sq in 0..300i32, sk in 1..300i32, left in side(), right in side(), m_frac in 0.0..1.0f64, n_frac in 0.0..1.0f64, g in 0..8i32, t in 0..4i32) {
        // Thread (g, t) of a warp with two m16 tiles from query m0 and eight n8 tiles from key n0 (the
        // forward's shape), rows past sq included.
        let (m0, n0) = ((sq as f64 * m_frac) as i32 / 16 * 16, (sk as f64 * n_frac) as i32 / 64 * 64);
        let (row0, key0) = (m0 + g, n0 + 2 * t);
        let mut hidden = [[[false; 4]; 8]; 2];
        mask::for_each_hidden_qk::<2, 8>(row0, key0, sq, sk, left, right, |mt, j, i| hidden[mt][j][i] = true);
        for mt in 0..2 {
            for j in 0..8 {
                for i in 0..4 {
                    let (q, k) = (row0 + 16 * mt as i32 + 8 * (i as i32 / 2), key0 + 8 * j as i32 + i as i32 % 2);
                    prop_assert_eq!(hidden[mt][j][i], !visible(q as i64, k as i64, sq as i64, sk as i64, left as i64, right as i64), "query {} key {}", q, k);
                }
            }
        }
    }

    #[test]
    fn key_major_walker_hides_exactly_the_masked_pairs(sq in 0..300i32, sk in 1..300i32, left in side(), right in side(), m_frac in 0.0..1.0f64, n_frac in 0.0..1.0f64, g in 0..8i32, t in 0..4i32, warp_q in 0..2i32, warp_k in 0..4i32) {
        // Thread (g, t) of the dk/dv kernels' shape: two m16 tiles of keys from n0 + 32 warp_k, four n8
        // tiles of queries from m0 + 32 warp_q; queries at or past sq are padding (hidden).
        let (m0, n0) = ((sq as f64 * m_frac) as i32 / 64 * 64, (sk as f64 * n_frac) as i32 / 128 * 128);
        let (row0, key0) = (m0 + 32 * warp_q + 2 * t, n0 + 32 * warp_k + g);
        let mut hidden = [[[false; 4]; 4]; 2];
        mask::for_each_hidden_kq::<2, 4>(row0, sq - row0, key0, sq, sk, left, right, |kt, j, i| hidden[kt][j][i] = true);
        for kt in 0..2 {
            for j in 0..4 {
                for i in 0..4 {
                    let (k, q) = (key0 + 16 * kt as i32 + 8 * (i as i32 / 2), row0 + 8 * j as i32 + i as i32 % 2);
                    let shown = q < sq && visible(q as i64, k as i64, sq as i64, sk as i64, left as i64, right as i64);
                    prop_assert_eq!(hidden[kt][j][i], !shown, "query {} key {}", q, k);
                }
            }
        }
    }

    #[test]
    fn tile_range_and_mask_flags_are_sound(sq in 1..300i32, sk in 0..300i32, left in side(), right in side(), m_frac in 0.0..1.0f64, bm in prop::sample::select(vec![64i32, 128]), bn in prop::sample::select(vec![32i32, 64, 112, 128])) {
        let m0 = ((sq - 1) as f64 * m_frac) as i32 / bm * bm;
        let rows = (sq - m0).min(bm);
        let (n_min, n_max) = block::n_block_range(m0, rows, sq, sk, left, right, bn);
        let tiles = (sk + bn - 1) / bn;
        for n in 0..tiles.max(n_max) {
            let any_visible = (m0..m0 + rows).any(|i| (n * bn..(n + 1) * bn).any(|j| visible(i as i64, j as i64, sq as i64, sk as i64, left as i64, right as i64)));
            let in_range = n >= n_min && n < n_max;
            // Skipped tiles hold no visible key; the first and last visited tiles hold one (tight range).
            prop_assert!(in_range || !any_visible, "tile {} skipped but has a visible key", n);
            if in_range && (n == n_min || n == n_max - 1) {
                prop_assert!(any_visible, "tile {} visited but fully masked", n);
            }
            if in_range && !block::tile_needs_mask(m0, rows, n * bn, bn, sq, sk, left, right) {
                let all_visible = (m0..m0 + rows).all(|i| (n * bn..(n + 1) * bn).all(|j| visible(i as i64, j as i64, sq as i64, sk as i64, left as i64, right as i64)));
                prop_assert!(all_visible, "tile {} runs unmasked but hides a key", n);
            }
        }
    }

    #[test]
    fn interior_rows_decide_exactly_the_unmasked_tiles(sq in 1..300i32, sk in 1..300i32, left in side(), right in side(), n_frac in 0.0..1.0f64, m_frac in 0.0..1.0f64, rows in 1..140i32, bn in prop::sample::select(vec![64i32, 128])) {
        // The backward's per-key-block form of the mask decision: a tile needs the mask iff some (row,
        // key) of it, keys past the sequence included, is hidden; and it agrees with tile_needs_mask.
        let n0 = ((sk - 1) as f64 * n_frac) as i32 / bn * bn;
        let m0 = ((sq - 1) as f64 * m_frac) as i32;
        let needs = block::InteriorRows::of(n0, bn, sq, sk, left, right).needs_mask(m0, rows);
        let all_visible = (m0..m0 + rows).all(|i| (n0..n0 + bn).all(|j| visible(i as i64, j as i64, sq as i64, sk as i64, left as i64, right as i64)));
        prop_assert_eq!(needs, !all_visible);
        prop_assert_eq!(needs, block::tile_needs_mask(m0, rows, n0, bn, sq, sk, left, right));
    }

    #[test]
    fn backward_row_block_range_is_tight(sq in 0..300i32, sk in 1..300i32, left in side(), right in side(), n_frac in 0.0..1.0f64, bm in prop::sample::select(vec![16i32, 32, 64, 128]), bn in prop::sample::select(vec![32i32, 64, 112, 128])) {
        let n0 = ((sk - 1) as f64 * n_frac) as i32 / bn * bn;
        let cols = (sk - n0).min(bn);
        let (m_min, m_max) = block::m_block_range(n0, cols, sq, sk, left, right, bm);
        let sees = |m: i32| (m * bm..((m + 1) * bm).min(sq)).any(|i| (n0..n0 + cols).any(|j| visible(i as i64, j as i64, sq as i64, sk as i64, left as i64, right as i64)));
        for m in 0..(sq + bm - 1) / bm {
            let in_range = m >= m_min && m < m_max;
            prop_assert!(in_range || !sees(m), "row block {} skipped but sees the key tile", m);
        }
        if m_max > m_min {
            prop_assert!(m_min >= 0 && m_max * bm < sq + bm, "range past the rows");
            prop_assert!(sees(m_min) && sees(m_max - 1), "range not tight");
        }
    }

    #[test]
    fn prep_zeroes_every_accumulator_row_the_dkdv_kernels_add_to(lens in prop::collection::vec((0..200i32, 0..200i32), 1..5), padded in any::<bool>(), tail in 0..70i32, dense in any::<bool>(), left in side(), right in side()) {
        // The f32 dq accumulator's rows as the kernels index them: a dense batch's sequence b starts at
        // row b * seqlen_q, a packed one's at cu_seqlens_q[b] (seqused below the slot when `padded`,
        // `tail` rows after the last slot); the host allocates DQ_ACCUM_BLOCK_M rows of slack.
        let lens: Vec<(i32, i32)> = if dense { vec![lens[0]; lens.len()] } else { lens };
        let used = |n: i32| if padded && !dense { n * 2 / 3 } else { n };
        let mut seqs = Vec::new();
        let mut start = 0;
        for &(q, k) in &lens {
            seqs.push((seqlen::SeqlenInfo { start, slot_len: q, used: used(q) }, used(k)));
            start += q;
        }
        let total_rows = start + if dense { 0 } else { tail };
        let slack = variants::DQ_ACCUM_BLOCK_M as i32;
        // Prep (grid z = the sequences, no tail slice) zeroes rows [start, start + dq_accum_rows(used)).
        let mut zeroed = vec![false; (total_rows + slack) as usize];
        for (sq, _) in &seqs {
            for r in 0..block::dq_accum_rows(sq.used, variants::DQ_ACCUM_BLOCK_M as i32) {
                let row = sq.start + r;
                prop_assert!(row < total_rows + slack, "prep zeroes row {} past the slack", row);
                zeroed[row as usize] = true;
            }
        }
        // Every dk/dv kernel's walk: key blocks of block_n, the query blocks of block_m that see them
        // (m_block_range), each adding whole blocks of rows.
        let mut shapes: Vec<(i32, i32)> = [32, 64, 96, 128, 192, 256].iter().map(|&d| { let c = variants::bwd_config(d); (c.block_n as i32, c.block_m as i32) }).collect();
        shapes.push((variants::BWD_WG_BLOCK_N as i32, variants::BWD_WG_BLOCK_M as i32));
        shapes.push((variants::bwd_wg_block_n(256) as i32, variants::BWD_WG_BLOCK_M as i32));
        for &(bn, bm) in &shapes {
            for (sq, used_k) in &seqs {
                for n0 in (0..*used_k).step_by(bn as usize) {
                    let (m_min, m_max) = block::m_block_range(n0, (used_k - n0).min(bn), sq.used, *used_k, left, right, bm);
                    for row in (sq.start + m_min * bm)..(sq.start + m_max.max(m_min) * bm) {
                        prop_assert!(row < total_rows + slack, "block_m {} adds to row {} past the slack", bm, row);
                        prop_assert!(zeroed[row as usize], "block_m {} adds to row {}, which prep never wrote", bm, row);
                    }
                }
            }
        }
    }

    #[test]
    fn varlen_lengths_are_clamped(a in any::<i32>(), b in any::<i32>(), used in proptest::option::of(any::<i32>()), total in -5..100_000i32) {
        let s = seqlen::SeqlenInfo::varlen(a, b, used, total);
        prop_assert!(s.start >= 0 && s.slot_len >= 0 && s.used >= 0 && s.used <= s.slot_len);
        prop_assert!(s.start as i64 + s.slot_len as i64 <= total.max(0) as i64);
        let t = seqlen::SeqlenInfo::tail(a, total);
        prop_assert!(t.start >= 0 && t.used == 0 && t.start + t.slot_len == total.max(0));
    }

    #[test]
    fn grid_slices_find_their_sequences(lens in prop::collection::vec((0..50i32, 0..50i32), 1..6), extra in (0..20i32, 0..20i32), used in any::<bool>(), dense in any::<bool>()) {
        // Device arrays as one host vector; `read(ptr, i)` reads element i of the array starting at ptr.
        let mut mem = vec![0i32];
        for (i, &(q, _)) in lens.iter().enumerate() {
            mem.push(mem[i] + q);
        }
        let cu_k_at = mem.len();
        mem.push(0);
        for (i, &(_, k)) in lens.iter().enumerate() {
            mem.push(mem[cu_k_at + i] + k);
        }
        let used_at = mem.len();
        mem.extend(lens.iter().map(|&(q, _)| q / 2));
        mem.extend(lens.iter().map(|&(_, k)| k / 3));
        let batch = lens.len() as i32;
        let (total_q, total_k) = (mem[cu_k_at - 1] + extra.0, mem[used_at - 1] + extra.1);
        let addr = |at: usize| if dense { 0 } else { at as u64 + 1 };
        let l = seqlen::Lengths {
            cu_seqlens_q: addr(0),
            cu_seqlens_k: addr(cu_k_at),
            seqused_q: if used { addr(used_at) } else { 0 },
            seqused_k: if used { addr(used_at + lens.len()) } else { 0 },
            batch,
            seqlen_q: 7,
            seqlen_k: 9,
            total_q,
            total_k,
            paged_keys: None,
            k_first: 0,
            seqused_k_add: 0,
        };
        let read = |ptr: u64, i: i32| mem[ptr as usize - 1 + i as usize];
        for b in 0..batch {
            let (sq, sk) = l.slice(b, read);
            if dense {
                prop_assert_eq!((sq, sk), (seqlen::SeqlenInfo::dense(7), seqlen::SeqlenInfo::dense(9)));
            } else {
                let (q, k) = lens[b as usize];
                prop_assert_eq!((sq.start, sq.slot_len, sk.start, sk.slot_len), (mem[b as usize], q, mem[cu_k_at + b as usize], k));
                prop_assert_eq!((sq.used, sk.used), if used { (q / 2, k / 3) } else { (q, k) });
            }
        }
        if !dense {
            // The extra slice: the rows past the last sequence, all padding.
            let (tq, tk) = l.slice(batch, read);
            prop_assert_eq!((tq.start, tq.slot_len, tq.used), (total_q - extra.0, extra.0, 0));
            prop_assert_eq!((tk.start, tk.slot_len, tk.used), (total_k - extra.1, extra.1, 0));
        }
    }

    /// Slot scheduling (varlen without max lengths): the `slot_count` virtual row blocks cover every row
    /// block of every slice (the sequences and the tail) exactly once, on both sides; bogus cu_seqlens
    /// give only in-range slices and non-negative blocks.
    #[test]
    fn slots_cover_every_row_block_once(lens in prop::collection::vec(0..700i32, 0..9), tail in 0..300i32, bm in prop::sample::select(vec![16, 64, 128]), keys in any::<bool>(), bogus in prop::collection::vec(any::<i32>(), 0..9)) {
        let mut cu = vec![0i32];
        for (i, &l) in lens.iter().enumerate() {
            cu.push(cu[i] + l);
        }
        let batch = lens.len() as i32;
        let total = cu[lens.len()] + tail;
        let slots = flash_attn::problem::slot_count(total as usize, lens.len(), bm as usize).unwrap() as i32;
        let lengths = |cu_addr: u64| seqlen::Lengths {
            cu_seqlens_q: if keys { 99 } else { cu_addr },
            cu_seqlens_k: if keys { cu_addr } else { 99 },
            seqused_q: 0,
            seqused_k: 0,
            batch,
            seqlen_q: 1,
            seqlen_k: 1,
            total_q: if keys { 0 } else { total },
            total_k: if keys { total } else { 0 },
            paged_keys: None,
            k_first: 0,
            seqused_k_add: 0,
        };
        let l = lengths(1);
        let read = |ptr: u64, i: i32| {
            assert_eq!(ptr, 1, "read of the other side's array");
            cu[i as usize]
        };
        let mut seen = std::collections::HashSet::new();
        for v in 0..slots {
            let (b, m) = l.slot_block(v, bm, keys, slots, read);
            prop_assert!((0..=batch).contains(&b) && m >= 0);
            let (sq, sk) = l.slice(b, |p, i| if p == 1 { cu[i as usize] } else { 0 });
            let s = if keys { sk } else { sq };
            if m * bm < s.slot_len {
                prop_assert!(seen.insert((b, m)), "slot {} repeats slice {} block {}", v, b, m);
            }
        }
        let want: usize = lens.iter().chain(std::iter::once(&tail)).map(|&n| (n as usize).div_ceil(bm as usize)).sum();
        prop_assert_eq!(seen.len(), want);
        // Unsorted entries: still a slice of the batch and a block the kernels stride from safely.
        let mut junk = bogus.clone();
        junk.resize(lens.len() + 1, 0);
        let l = lengths(1);
        for v in 0..slots {
            let (b, m) = l.slot_block(v, bm, keys, slots, |_, i| junk[i as usize]);
            prop_assert!((0..=batch).contains(&b) && (0..=slots).contains(&m));
        }
    }

    /// Paged key counts (the paged forward kernels): within [0, capacity] whatever cu_seqlens_k and
    /// seqused_k hold, exact for valid ones, and no cu_seqlens_k read without one.
    #[test]
    fn paged_key_counts_are_clamped(a in any::<i32>(), b in any::<i32>(), used in proptest::option::of(any::<i32>()), cu in any::<bool>(), capacity in -5..100_000i32) {
        let slot = cu.then_some((a, b));
        let s = seqlen::SeqlenInfo::counted(slot, used, capacity);
        prop_assert!(s.start == 0 && s.used >= 0 && s.used <= s.slot_len && s.slot_len <= capacity.max(0));
        let cap = capacity.max(0) as i64;
        let want_slot = match (slot, used) {
            (Some((a, b)), _) => (b as i64 - a as i64).clamp(0, cap),
            (None, Some(u)) => (u as i64).clamp(0, cap),
            (None, None) => cap,
        };
        prop_assert_eq!(s.slot_len as i64, want_slot);
        prop_assert_eq!(s.used as i64, used.map_or(want_slot, |u| (u as i64).clamp(0, want_slot)));
        let l = seqlen::Lengths { cu_seqlens_q: 1, cu_seqlens_k: if cu { 4 } else { 0 }, seqused_q: 0, seqused_k: if used.is_some() { 7 } else { 0 }, batch: 2, seqlen_q: 0, seqlen_k: 0, total_q: 10, total_k: 0, paged_keys: Some(capacity), k_first: 0, seqused_k_add: 0 };
        let mem = [0, 3, 10, 0, a, b, used.unwrap_or(0), used.unwrap_or(0)];
        let read = |ptr: u64, i: i32| {
            assert!(ptr != 0, "read of an absent array");
            mem[ptr as usize - 1 + i as usize]
        };
        let (_, sk) = l.slice(0, read);
        prop_assert_eq!(sk, seqlen::SeqlenInfo::counted(cu.then_some((0, a)), used, capacity));
        let (tq, tk) = l.slice(2, read);
        prop_assert_eq!((tq.start, tq.slot_len, tk.slot_len, tk.used), (10, 0, 0, 0));
    }

    /// KV-cache keys (dense q over a paged or one-page-per-row cache): key 0 at the row's leftpad and
    /// `cache_seqlens + S_new - leftpad` keys, both clamped into the row whatever the device holds.
    #[test]
    fn cache_key_ranges_are_clamped(seqlen in any::<i32>(), first in proptest::option::of(any::<i32>()), add in 0..100_000i32, capacity in -5..100_000i32, with_seqlens in any::<bool>()) {
        let l = seqlen::Lengths { cu_seqlens_q: 0, cu_seqlens_k: 0, seqused_q: 0, seqused_k: if with_seqlens { 1 } else { 0 }, batch: 1, seqlen_q: 3, seqlen_k: 0, total_q: 3, total_k: 0, paged_keys: Some(capacity), k_first: if first.is_some() { 2 } else { 0 }, seqused_k_add: add };
        let mem = [seqlen, first.unwrap_or(0)];
        let (sq, sk) = l.slice(0, |ptr, i| {
            assert!(ptr != 0 && i == 0, "read of an absent array");
            mem[ptr as usize - 1]
        });
        prop_assert_eq!(sq, seqlen::SeqlenInfo::dense(3));
        let cap = capacity.max(0) as i64;
        let start = first.map_or(0, |f| (f as i64).clamp(0, cap));
        let end = if with_seqlens { seqlen as i64 + add as i64 } else { cap };
        let n = (end - start).clamp(0, cap - start);
        prop_assert_eq!(sk, seqlen::SeqlenInfo { start: start as i32, slot_len: n as i32, used: n as i32 });
        prop_assert!(sk.start as i64 + sk.used as i64 <= cap);
    }

    #[test]
    fn valid_lengths_pass_through(start in 0..1000i32, len in 0..1000i32, extra in 0..100i32, used_frac in 0.0..=1.0f64) {
        let used = (len as f64 * used_frac) as i32;
        let s = seqlen::SeqlenInfo::varlen(start, start + len, Some(used), start + len + extra);
        prop_assert_eq!(s, seqlen::SeqlenInfo { start, slot_len: len, used });
        prop_assert_eq!(seqlen::SeqlenInfo::dense(len), seqlen::SeqlenInfo { start: 0, slot_len: len, used: len });
    }
}
