"""Issue 13's read floor: how fast one kernel reads N bytes on this GPU when timed as decode.rs's graph rows
are (16 calls captured in a CUDA graph and replayed; ms per call, the median of criterion-like samples of
back-to-back replays). Reads:
torch.sum(x, dtype=float32) and torch.amax over a bf16 tensor of N bytes; copy: N/2 bytes read and N/2
written. N = the K/V bytes of decode's batch-1 rows at 8k, 32k and 128k keys (Hk 8, D 128, bf16).
Run on the GPU machine from benches/ (it imports torch_decode and torch_fwd): `python3 read_floor.py`."""
import torch

# decode's graph capture (its `/graph` rows) and torch_fwd's timing (`median_ms`: criterion's scheme).
from torch_decode import GRAPH_STEPS, captured
from torch_fwd import median_ms


def timed(fn):
    """Milliseconds per call of `fn`, timed as decode's graph rows: a replay of GRAPH_STEPS calls / GRAPH_STEPS."""
    return median_ms(captured(fn).replay) / GRAPH_STEPS


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
