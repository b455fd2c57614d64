"""PyTorch's side of the decode comparison, on benches/decode.rs's contiguous shapes: SDPA with the flash
and the cuDNN backends (q [B, Hq, Sq, D] over the cache [B, Hk, ctx, D] as transposed views of the
[B, ctx, Hk, D] cache, enable_gqa, not causal), and the copy bandwidth of this GPU in the same run (a
2 GiB device-to-device copy: 2 x its bytes moved). Prints `RESULT <backend> <shape> <median ms> <GB/s>`
with decode.rs's byte count. Timed as criterion times ours (torch_fwd.py's `median_ms`). FA_DECODE_GRAPH=1:
16 calls captured into a CUDA graph and the graph replayed (decode.rs's `/graph` rows: ms per replay, GB/s
of all 16).
FA_DECODE_HEAD_MAJOR=1: the cache contiguous as [B, Hk, ctx, D] (decode.rs's option of that name)."""
import os
import sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# torch_fwd's timing; its report's last column is `flops / s / 1e12`: bytes * 1e3 make it GB/s.
from torch_fwd import report, selected

HQ, HK, D = 32, 8, 128
MAX_CACHE_BYTES = 17 << 30
GRAPH_STEPS = 16  # decode.rs's


def captured(fn, steps=GRAPH_STEPS):
    """A CUDA graph of `steps` calls of `fn` (run once on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(steps):
            fn()
    return g


def main():
    filt = sys.argv[1] if len(sys.argv) > 1 else ""
    dev = "cuda"
    print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
    n = 2 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1), torch.empty(n, dtype=torch.uint8, device=dev)
    report("copy", "copy/2GiB", 2 * n * 1e3, lambda: dst.copy_(src))
    del src, dst
    for sq in (1, 4):
        for ctx in (1024, 8192, 32768, 131072):
            for b in (1, 8, 64):
                kv_bytes = 2 * b * ctx * HK * D * 2
                name = f"decode/sq{sq}/ctx{ctx}/b{b}/page0"
                if kv_bytes > MAX_CACHE_BYTES or not selected(name, filt):
                    continue
                q = torch.rand(b, sq, HQ, D, device=dev, dtype=torch.bfloat16).sub_(0.5).transpose(1, 2)
                if os.environ.get("FA_DECODE_HEAD_MAJOR"):
                    k, v = (torch.rand(b, HK, ctx, D, device=dev, dtype=torch.bfloat16).sub_(0.5) for _ in range(2))
                else:
                    k, v = (torch.rand(b, ctx, HK, D, device=dev, dtype=torch.bfloat16).sub_(0.5).transpose(1, 2) for _ in range(2))
                nbytes = kv_bytes + 2 * b * sq * HQ * D * 2
                for backend, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def run(kind=kind):
                        with sdpa_kernel(kind):
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    if os.environ.get("FA_DECODE_GRAPH"):
                        g = captured(run)
                        report(backend, name + "/graph", nbytes * 1e3 * GRAPH_STEPS, g.replay)
                        del g
                        continue
                    report(backend, name, nbytes * 1e3, run)
                del q, k, v
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
