#!/usr/bin/env python3
"""A compute-sanitizer driver for the Python package on CUDA tensors: the path a framework takes, with every
buffer (outputs, the backward's workspace) from PyTorch's caching allocator, which hands out reused memory.
Forward + backward through flash_attn_func (dense, GQA) and flash_attn_varlen_func (packed, uneven lengths),
causal and not, default and deterministic backward, bf16, at the head dims asked for.

Run from the bundle with the wheel importable and torch's python first on PATH, through sanitize.sh:
    SANITIZE_BIN=./sanitize_torch.py bash sanitize.sh racecheck 64
Arguments: head dims (`64,128`; `all`; default 64); sanitize.sh's other driver words (`wgmma`, `bf16`, ...)
are accepted and ignored. PyTorch's own kernels (random inputs, autograd's) run under the tool too; to check
ours alone pass its kernel-name filter through SANITIZE_EXTRA (`--kernel-name kns=flash` in recent versions,
`--filter kns=flash` in older ones: see `compute-sanitizer --help`). `--plan` prints the plan only (sanitize.sh runs it first). Prints `SANITIZE done
N cases` at the end, as example-sanitize does (the kernel launches are not counted here)."""
import sys
import time

HEAD_DIMS = (64, 96, 128, 192, 256)


def parse(args):
    dims = [64]
    for a in args:
        if a == "--plan":
            continue
        if a == "all":
            dims = list(HEAD_DIMS)
        elif a.replace(",", "").isdigit():
            dims = [int(x) for x in a.split(",")]
            bad = [d for d in dims if d not in HEAD_DIMS]
            if bad:
                sys.exit(f"sanitize_torch: head dims {bad} are not among {HEAD_DIMS}")
    return dims


def cases(dims):
    return [(d, causal, det, varlen) for d in dims for causal in (False, True) for det in (False, True)
            for varlen in (False, True)]


def run(case, torch, fa):
    d, causal, det, varlen = case
    g = torch.Generator(device="cpu").manual_seed(d * 8 + causal * 4 + det * 2 + varlen)
    dev, dt = torch.device("cuda"), torch.bfloat16
    h, hk = 4, 2

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt).requires_grad_()

    if varlen:
        lens = [77, 256, 1, 190]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
        t = sum(lens)
        q, k, v = leaf(t, h, d), leaf(t, hk, d), leaf(t, hk, d)
        out = fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal, deterministic=det)
    else:
        q, k, v = leaf(2, 200, h, d), leaf(2, 333, hk, d), leaf(2, 333, hk, d)
        out = fa.flash_attn_func(q, k, v, causal=causal, deterministic=det)
    out.backward(torch.randn(out.shape, generator=g).to(dev, dt))
    torch.cuda.synchronize()


def main():
    args = sys.argv[1:]
    todo = cases(parse(args))
    print(f"SANITIZE plan: {len(todo)} cases (head dims {sorted({c[0] for c in todo})}, dense and varlen, causal "
          "and not, default and deterministic backward; bf16) through flash_attn_rs on torch tensors", flush=True)
    if "--plan" in args:
        return
    import torch
    import flash_attn_rs as fa
    if not torch.cuda.is_available():
        sys.exit("sanitize_torch: no CUDA device")
    start = time.time()
    for case in todo:
        run(case, torch, fa)
    print(f"SANITIZE done {len(todo)} cases in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
