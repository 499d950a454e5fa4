#!/usr/bin/env python3
"""PyTorch's flash attention, the reference for Lockstep's fused causal attention (issue 8, item 2).

The bar: forward + backward of causal attention for B=16, H=12, T=1024, D=64 in bf16 within 2x of PyTorch's flash
SDPA on the same GPU. This times F.scaled_dot_product_attention(is_causal=True) restricted to the flash backend, the
same way `test-attention_gpu --ignored --nocapture time_gpt2_shape_bf16` times Lockstep's op: median of --steps
calls after --warmup, the device synchronised around each; forward alone, then forward + backward of the three
inputs against a fixed upstream gradient.

    python3 scripts/torch_attention.py                     # the GPT-2 shape, bf16
    python3 scripts/torch_attention.py --seq-len 256 --heads 6
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch_attention.py: this PyTorch sees no CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen, requires_grad=True) for _ in range(3))
    d_out = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def forward_backward():
            torch.autograd.grad(forward(), (q, k, v), d_out)

        fwd = time_ms(forward, args.warmup, args.steps)
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd = time_ms(forward_backward, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"attention torch flash {list(shape)} {args.dtype}: forward {fwd:.3f} ms, forward+backward {fwd_bwd:.3f} ms "
        f"(peak {peak:.2f} GiB; {torch.cuda.get_device_name()}, torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
