#!/usr/bin/env python3
"""DRAM bytes of the warp-specialized forward's tile order under an LRU model of the L2, no GPU needed.

    python3 scripts/tile_order_l2.py [--l2-mb 50] [--sms 132]

Replays the order `Tiles` (kernels-gpu/src/fwd/ws.rs) hands out causal tiles in: (sequence, head) pairs in
sections, inside a section row block `m_blocks - 1 - r / n` of pair `r % n` (heaviest first), each block drawing
the next tile when it finishes its last (the dynamic scheduler), a key tile taking one time unit and a row block
one more. Every Q tile, K/V key tile and O tile goes through an LRU cache of `--l2-mb`: misses of Q and K/V and
every O write count as DRAM bytes. Prints, per shape, the section before 2cb69a9 (the L2 share, at least
`WS_MASKED_WAVES` = 4 waves, now static scheduling's only) against sections capped at twice and once the L2 share
(once: ws launches since 2cb69a9 whose tiles come from the counter, nearly all): DRAM MB and the makespan in key tiles.
A model: the H100 / H200 L2 is two partitions, not one LRU, and timing is not modelled beyond order.
"""
import argparse, collections, heapq

L2_SECTION_BYTES = 16 << 20  # FWD_WS_L2_SECTION_BYTES
MASKED_WAVES = 4             # WS_MASKED_WAVES
BM = 128


def simulate(b, h, s, d, section, sms, l2_bytes):
    bn = 64 if d >= 192 else 128
    m_blocks, pairs = s // BM, b * h
    kv_bytes, q_bytes = bn * d * 4, BM * d * 2
    section = min(section, pairs)
    tiles = []
    for first in range(0, pairs, section):
        n = min(section, pairs - first)
        for r in range(m_blocks * n):
            m, j = divmod(r, n)
            tiles.append((first + j, m_blocks - 1 - m))
    cache, size, dram = collections.OrderedDict(), 0, 0

    def touch(key, nbytes, write):
        nonlocal size, dram
        if key in cache:
            cache.move_to_end(key)
            return
        if not write:
            dram += nbytes
        cache[key] = nbytes
        size += nbytes
        while size > l2_bytes:
            size -= cache.popitem(last=False)[1]

    events, free, seq = [], [(0.0, c) for c in range(sms)], 0
    for pair, mb in tiles:
        t0, c = heapq.heappop(free)
        nt = -(-((mb + 1) * BM) // bn)  # causal: keys up to the block's last row
        events.append((t0, seq, "q", pair, mb))
        for i in range(nt):
            events.append((t0 + i + 0.5, seq + 1 + i, "kv", pair, nt - 1 - i))
        events.append((t0 + nt + 0.7, seq + 1 + nt, "o", pair, mb))
        seq += nt + 2
        heapq.heappush(free, (t0 + nt + 1.0, c))
    for _, _, kind, pair, x in sorted(events):
        if kind == "o":
            touch((kind, pair, x), q_bytes, True)
            dram += q_bytes
        else:
            touch((kind, pair, x), kv_bytes if kind == "kv" else q_bytes, False)
    return dram / 1e6, max(t for t, _ in free)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--l2-mb", type=float, default=50.0)
    ap.add_argument("--sms", type=int, default=132)
    a = ap.parse_args()
    l2 = int(a.l2_mb * (1 << 20))
    for b, h, s, d in [(32, 8, 512, 256), (8, 8, 2048, 256), (2, 8, 8192, 256), (32, 16, 512, 128), (8, 16, 2048, 128), (2, 16, 8192, 128)]:
        l2_pairs = max(1, L2_SECTION_BYTES // (4 * d) // s)
        waves = (MASKED_WAVES * a.sms + s // BM - 1) // (s // BM)
        # Before 2cb69a9 (static scheduling's rule still): the L2 share, at least `MASKED_WAVES` waves.
        waves_section = max(l2_pairs, waves)
        cells = []
        for name, sec in [("4 waves", waves_section), ("cap 2x", min(waves_section, 2 * l2_pairs)), ("cap 1x (main)", l2_pairs)]:
            mb, span = simulate(b, h, s, d, sec, a.sms, l2)
            cells.append(f"{name} ({sec} pairs) {mb:.0f} MB, {span:.0f}")
        print(f"causal hdim {d} S={s} B={b} H={h}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
