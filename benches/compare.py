"""Join RESULT lines (ours, flash, cudnn) from one run into the markdown table for benches/RESULTS.md."""
import sys
from collections import defaultdict

rows = defaultdict(dict)
order = []
device = ""
for line in sys.stdin:
    if line.startswith("device:"):
        device = line.split(":", 1)[1].strip()
    if not line.startswith("RESULT "):
        continue
    parts = line.split()
    backend, name, tflops = parts[1], parts[2], parts[4]
    if name not in rows:
        order.append(name)
    rows[name][backend] = float(tflops)

print(f"GPU: {device}\n")
print("| shape | ours TFLOP/s | flash TFLOP/s | cuDNN TFLOP/s | ours/flash | ours/cuDNN |")
print("|---|---:|---:|---:|---:|---:|")
for name in order:
    r = rows[name]
    ours, fl, cu = r.get("ours", float("nan")), r.get("flash", float("nan")), r.get("cudnn", float("nan"))
    ratio = lambda a, b: f"{a / b:.2f}" if b == b and b > 0 and a == a else "n/a"
    fmt = lambda x: f"{x:.1f}" if x == x else "n/a"
    print(f"| {name} | {fmt(ours)} | {fmt(fl)} | {fmt(cu)} | {ratio(ours, fl)} | {ratio(ours, cu)} |")
