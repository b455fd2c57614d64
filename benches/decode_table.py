"""Joins decode.rs's and torch_decode.py's RESULT lines (stdin) into a markdown table: per shape our time
and effective bandwidth, its fraction of the copy bandwidth measured in the same run, paged / contiguous,
and PyTorch's SDPA flash and cuDNN times with our speedup over each."""
import math
import sys

rows, copy = {}, None
for line in sys.stdin:
    p = line.split()
    if len(p) < 5 or p[0] != "RESULT":
        continue
    backend, name, ms, gbs = p[1], p[2], float(p[3]), float(p[4])
    if backend == "copy":
        copy = gbs
        continue
    rows.setdefault(name, {})[backend] = (ms, gbs)

print(f"copy bandwidth: {copy:.0f} GB/s" if copy else "copy bandwidth: not measured")
print()
print("| shape | ours ms | GB/s | % of copy | paged / contiguous | SDPA flash ms | x flash | SDPA cuDNN ms | x cuDNN |")
print("|---|---|---|---|---|---|---|---|---|")
fmt = lambda x, f: "-" if x is None or math.isnan(x) else f.format(x)  # noqa: E731
for name in sorted(rows, key=lambda n: [int("".join(c for c in s if c.isdigit()) or 0) for s in n.split("/")]):
    r = rows[name]
    ours = r.get("ours")
    if ours is None:
        continue
    # Rows under CUDA graphs (FA_DECODE_GRAPH=1) end in /graph: their ms cover the 16 calls of a replay.
    suffix = "/graph" if name.endswith("/graph") else ""
    stem = name[: len(name) - len(suffix)]
    base = rows.get(stem.rsplit("/", 1)[0] + "/page0" + suffix, {}).get("ours")
    rel = base[0] / ours[0] if base and not stem.endswith("page0") else None
    fl, cu = r.get("flash"), r.get("cudnn")
    cells = [name, fmt(ours[0], "{:.4f}"), fmt(ours[1], "{:.0f}"), fmt(ours[1] / copy * 100 if copy else None, "{:.0f}%"),
             fmt(rel, "{:.2f}"), fmt(fl[0] if fl else None, "{:.4f}"), fmt(fl[0] / ours[0] if fl else None, "{:.2f}"),
             fmt(cu[0] if cu else None, "{:.4f}"), fmt(cu[0] / ours[0] if cu else None, "{:.2f}")]
    print("| " + " | ".join(cells) + " |")
