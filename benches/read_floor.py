"""Issue 13's read floor: how fast one kernel reads N bytes on this GPU when timed as decode.rs's graph rows
are (16 calls captured in a CUDA graph and replayed; ms per call, median of 30 replays). Reads:
torch.sum(x, dtype=float32) and torch.amax over a bf16 tensor of N bytes; copy: N/2 bytes read and N/2
written. N = the K/V bytes of decode's batch-1 rows at 8k, 32k and 128k keys (Hk 8, D 128, bf16).
Run on the GPU machine: `python3 benches/read_floor.py`."""
import statistics

import torch

STEPS = 16


def timed(fn, reps=30):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(STEPS):
            fn()
    for _ in range(5):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / STEPS)
    return statistics.median(ts)


def main():
    print("torch", torch.__version__, torch.cuda.get_device_name(0))
    for ctx in (8192, 32768, 131072):
        nbytes = 2 * ctx * 8 * 128 * 2
        x = torch.rand(nbytes // 2, device="cuda", dtype=torch.bfloat16)
        for name, fn in (("sum", lambda: torch.sum(x, dtype=torch.float32)), ("amax", lambda: torch.amax(x))):
            ms = timed(fn)
            print(f"read {name} {nbytes / 1e6:.1f} MB: {ms * 1e3:.2f} us, {nbytes / ms / 1e6:.0f} GB/s")
        y = torch.empty(nbytes // 4, device="cuda", dtype=torch.bfloat16)
        xs = x[: nbytes // 4]
        ms = timed(lambda: y.copy_(xs))
        print(f"copy {nbytes / 2e6:.1f}+{nbytes / 2e6:.1f} MB: {ms * 1e3:.2f} us, {nbytes / ms / 1e6:.0f} GB/s")
        del x, y


if __name__ == "__main__":
    main()
