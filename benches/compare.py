"""Join RESULT lines from one run into the markdown tables for benches/RESULTS.md: the forward (ours, flash,
cudnn) and, when the run has them, the backward (ours-bwd, flash-bwd, cudnn-bwd and the three -fwdbwd),
then the score modifiers (`mods/<shape>/<none|alibi|dropout0.1>` rows): per shape and pass, each
modifier's TFLOP/s (same FLOPs counted) and its cost against no modifier, ours and PyTorch's.
SKIPPED lines are summed up under the tables, one line per backend and reason."""
import re
import sys
from collections import defaultdict

FWD = ("ours", "flash", "cudnn")
BWD = ("ours-bwd", "flash-bwd", "cudnn-bwd", "ours-fwdbwd", "flash-fwdbwd", "cudnn-fwdbwd")
NAN = float("nan")

rows = defaultdict(dict)
order = []
device = ""
skipped = defaultdict(int)  # (backend, reason) -> shapes
notices = []  # whole-bench SKIPPED lines (no GPU)
for line in sys.stdin:
    if line.startswith("device:"):
        device = line.split(":", 1)[1].strip()
    if line.startswith("SKIPPED "):
        # ours: `SKIPPED <shape>: <reason>`; PyTorch: `SKIPPED <backend> <shape>: <reason>`
        m = re.match(r"SKIPPED (?:([^\s/:]+) )?(\S+/\S+): (.*)", line.strip())
        if m:
            skipped[(m.group(1) or "ours", m.group(3))] += 1
        else:
            notices.append(line.strip())
    if not line.startswith("RESULT "):
        continue
    parts = line.split()
    backend, name, tflops = parts[1], parts[2], parts[4]
    if name not in rows:
        order.append(name)
    rows[name][backend] = float(tflops)


def ratio(a, b):
    return f"{a / b:.2f}" if b == b and b > 0 and a == a else "n/a"


def fmt(x):
    return f"{x:.1f}" if x == x else "n/a"


def has_any(backends):
    return [name for name in order if any(b in rows[name] for b in backends)]


fwd_names, bwd_names = has_any(FWD), has_any(BWD)
mods_names = [name for name in order if name.startswith("mods/")]
fwd_names = [name for name in fwd_names if not name.startswith("mods/")]
bwd_names = [name for name in bwd_names if not name.startswith("mods/")]
print(f"GPU: {device}\n")
if fwd_names or not (bwd_names or mods_names):
    # Ours through the Python package (flash_attn_rs), where the run has it (head dim 128), against ours
    # direct: the native call with precomputed arguments on the same tensors, in the same harness.
    py = any("python" in rows[name] for name in fwd_names)
    extra = (" ours via Python TFLOP/s | ours direct TFLOP/s | Python/direct |", "---:|---:|---:|") if py else ("", "")
    # ours-py: flash_attn_func timed by torch_fwd.py right after the SDPA rows of the same shape (same
    # process, same harness), where the wheel was importable.
    same = any("ours-py" in rows[name] for name in fwd_names)
    if same:
        extra = (" ours in torch_fwd.py TFLOP/s | that/cuDNN |" + extra[0], "---:|---:|" + extra[1])
    print("| shape | ours TFLOP/s | flash TFLOP/s | cuDNN TFLOP/s | ours/flash | ours/cuDNN |" + extra[0])
    print("|---|---:|---:|---:|---:|---:|" + extra[1])
    for name in fwd_names:
        ours, fl, cu = (rows[name].get(b, NAN) for b in FWD)
        line = f"| {name} | {fmt(ours)} | {fmt(fl)} | {fmt(cu)} | {ratio(ours, fl)} | {ratio(ours, cu)} |"
        if same:
            o = rows[name].get("ours-py", NAN)
            line += f" {fmt(o)} | {ratio(o, cu)} |"
        if py:
            p, d = rows[name].get("python", NAN), rows[name].get("direct", NAN)
            line += f" {fmt(p)} | {fmt(d)} | {ratio(p, d)} |"
        print(line)
if bwd_names:
    if fwd_names:
        print()
    print("Backward, TFLOP/s (bwd counts 2.5x the forward's FLOPs, fwd+bwd 3.5x; shapes named as in the forward):\n")
    # ours-py-*: flash_attn_func timed by torch_bwd.py right after the SDPA rows (where the wheel was importable).
    same = any("ours-py-bwd" in rows[name] for name in bwd_names)
    cols = []
    for kind in ("bwd", "fwd+bwd"):
        cols += [f"ours {kind}", f"flash {kind}", f"cuDNN {kind}", "ours/flash", "ours/cuDNN"]
        if same:
            cols += [f"ours {kind} in torch_bwd.py", "that/cuDNN"]
    print("| shape | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name in bwd_names:
        cells = []
        for kind in ("bwd", "fwdbwd"):
            ours, fl, cu = (rows[name].get(f"{b}-{kind}", NAN) for b in FWD)
            cells += [fmt(ours), fmt(fl), fmt(cu), ratio(ours, fl), ratio(ours, cu)]
            if same:
                o = rows[name].get(f"ours-py-{kind}", NAN)
                cells += [fmt(o), ratio(o, cu)]
        print(f"| {name} | " + " | ".join(cells) + " |")
if mods_names:
    # mods/<shape>/<modifier>: one row per (shape, pass), a column per (backend, modifier).
    shapes = []
    for name in mods_names:
        base = name.rsplit("/", 1)[0]
        if base not in shapes:
            shapes.append(base)
    mods = []
    for name in mods_names:
        m = name.rsplit("/", 1)[1]
        if m != "none" and m not in mods:
            mods.append(m)
    print("\nScore modifiers, TFLOP/s (the same FLOPs counted with and without; cost = TFLOP/s without / with):\n")
    cols = ["ours none"] + [f"ours {m}" for m in mods] + [f"ours {m} cost" for m in mods]
    cols += ["flash none"] + [f"flash {m}" for m in mods] + [f"flash {m} cost" for m in mods] + [f"ours/flash {m}" for m in mods]
    print("| shape | pass | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for base in shapes:
        for kind, suffix in (("fwd", ""), ("bwd", "-bwd"), ("fwd+bwd", "-fwdbwd")):
            get = lambda backend, m: rows.get(f"{base}/{m}", {}).get(backend + suffix, NAN)  # noqa: E731
            if all(get(b, m) != get(b, m) for b in ("ours", "flash") for m in ["none"] + mods):
                continue
            ours0, fl0 = get("ours", "none"), get("flash", "none")
            cells = [fmt(ours0)] + [fmt(get("ours", m)) for m in mods] + [ratio(ours0, get("ours", m)) for m in mods]
            cells += [fmt(fl0)] + [fmt(get("flash", m)) for m in mods] + [ratio(fl0, get("flash", m)) for m in mods]
            cells += [ratio(get("ours", m), get("flash", m)) for m in mods]
            print(f"| {base} | {kind} | " + " | ".join(cells) + " |")
if skipped or notices:
    print("\nSkipped:")
    for line in notices:
        print(f"- {line}")
    for (backend, reason), n in skipped.items():
        print(f"- {backend}, {n} shape{'s' if n > 1 else ''}: {reason}")
