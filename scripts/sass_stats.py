#!/usr/bin/env python3
"""SASS statistics of kernels in a cubin, to compare two builds without a GPU.

    python3 scripts/sass_stats.py CUBIN [CUBIN2] KERNEL [KERNEL...]

For each kernel (and each cubin: e.g. main's host/ptx/kernels_sm90.cubin.zst, unpacked with `zstd -d`, against a
branch's target/ptx/kernels_sm90.cubin): the instruction count, the innermost loop holding both a K-major and a
B-transposed wgmma (the forward's tile loop; else the innermost loop with four or more wgmma: the backward's step
loop) with its op mix and spills (STL / LDL), and the longest chain of dependent FMNMX in straight-line code (the
softmax's row max). `--diff` lists the kernels whose SASS differs between the two cubins (addresses ignored).

cuobjdump and nvdisasm come from PyPI (CUDA 13.x), installed once into target/sass-tools:
    python3 -m venv target/sass-tools && target/sass-tools/bin/pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
"""
import collections
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_path():
    bins = glob.glob(os.path.join(ROOT, "target/sass-tools/lib/python3*/site-packages/nvidia/cu*/bin"))
    return os.pathsep.join(bins + [os.environ.get("PATH", "")])


def sass(cubin, kernel=None):
    args = ["cuobjdump", "-sass"] + (["-fun", kernel] if kernel else []) + [cubin]
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, PATH=tool_path()))
    if out.returncode != 0:
        sys.exit(f"cuobjdump failed: {out.stderr.strip()}")
    return out.stdout


def instructions(text):
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return ins


def op(t):
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", t).split()[0].split(".")[0]


def main_loop(ins):
    loops = []
    for a, t in ins:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            body = [x for b, x in ins if int(m.group(1), 16) <= b <= a]
            fwd = any("tnspB" in x for x in body) and any("HGMMA" in x and "tnspB" not in x for x in body)
            loops.append((not fwd, sum("HGMMA" in x for x in body) < 4, len(body), body))
    loops = [l for l in loops if not (l[0] and l[1])]
    return min(loops, key=lambda l: (l[0], l[2]))[3] if loops else []


def fmnmx_chain(ins):
    depth, best = {}, 0
    for _, t in ins:
        if re.search(r"\bBRA\b|\bEXIT\b", t):
            depth = {}
            continue
        m = re.match(r"(@!?P\d\s+)?FMNMX\S*\s+(R\d+),\s*-?(\w+),\s*-?(\w+),", t)
        if m:
            d = 1 + max(depth.get(m.group(3), 0), depth.get(m.group(4), 0))
            depth[m.group(2)] = d
            best = max(best, d)
        else:
            w = re.match(r"(@!?P\d\s+)?\S+\s+(R\d+)", t)
            if w:
                depth.pop(w.group(2), None)
    return best


def stats(cubin, kernel):
    ins = instructions(sass(cubin, kernel))
    if not ins:
        return f"{kernel}: not in {cubin}"
    body = main_loop(ins)
    mix = collections.Counter(op(x) for x in body)
    top = " ".join(f"{k} {v}" for k, v in mix.most_common(10))
    return (f"{kernel} [{os.path.basename(cubin)}]: {len(ins)} instructions; main loop {len(body)} "
            f"(STL {mix['STL']}, LDL {mix['LDL']}; {top}); longest FMNMX chain {fmnmx_chain(ins)}")


def functions(cubin):
    out, cur, buf = {}, None, []
    for line in sass(cubin).splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            if cur:
                out[cur] = "\n".join(buf)
            cur, buf = m.group(1), []
        else:
            buf.append(re.sub(r"/\*[0-9a-f]+\*/", "", line))
    if cur:
        out[cur] = "\n".join(buf)
    return out


def main(argv):
    if len(argv) >= 3 and argv[0] == "--diff":
        a, b = functions(argv[1]), functions(argv[2])
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        print(f"{len(changed)} of {len(a.keys() | b.keys())} kernels differ")
        for k in changed:
            print(" ", k)
        return
    cubins = [x for x in argv if x.endswith(".cubin")]
    kernels = [x for x in argv if not x.endswith(".cubin")]
    if not cubins or not kernels:
        sys.exit(__doc__)
    for k in kernels:
        for c in cubins:
            print(stats(c, k))


if __name__ == "__main__":
    main(sys.argv[1:])
