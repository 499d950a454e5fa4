#!/usr/bin/env python3
"""PyTorch reference for `lockstep bench train`: the same GPT-2 shape, random tokens, full training step.

Run it on the GPU host in the same sitting as `lockstep bench train`, so the two figures sit side by side in
docs/BENCHMARKS.md (issue 5). It measures what bench train measures: tokens/s over N steps after warm-up, ms per
step split into forward / backward / optimizer (each phase ends with a device synchronisation), MFU with nanoGPT's
flops per token (6N + 12·L·H·Q·T, N without position embeddings) against the dense peak given, and peak device
memory.

    python3 scripts/torch_reference.py --preset gpt2 --seq-len 1024 --micro-batch 16 --vocab-size 50304 --dtype bf16
    python3 scripts/torch_reference.py --preset shakespeare-char --micro-batch 64 --dtype f32

The model is nanoGPT's GPT (pre-LayerNorm, tanh GELU, tied head, learned positions, no dropout); the optimizer is
AdamW (fused on CUDA) with decay on >=2-D tensors and global-norm clipping at 1.0, as Lockstep's. bf16 = autocast
with f32 master weights. `--compile` adds torch.compile.
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # name: (n_layer, n_head, n_embd, block_size, vocab_size) — common/src/presets.rs
    "tiny": (2, 4, 64, 64, 65),
    "nanogpt-cpu": (4, 4, 128, 64, 65),
    "shakespeare-char": (6, 6, 384, 256, 65),
    "gpt2": (12, 12, 768, 1024, 50257),
    "gpt2-medium": (24, 16, 1024, 1024, 50257),
}
PEAK_TFLOPS = {"bf16": 989.4, "f32": 66.9}  # H100/H200 SXM dense; worker/src/hardware.rs is the source


class Block(nn.Module):
    def __init__(self, n_head, n_embd):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block_size, vocab_size):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_head, n_embd) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, help="default: H100/H200 SXM dense peak for the dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()

    n_layer, n_head, n_embd, block, vocab = PRESETS[a.preset]
    vocab = a.vocab_size or vocab
    t = a.seq_len or block
    dev = torch.device(a.device)
    torch.manual_seed(1337)
    model = GPT(n_layer, n_head, n_embd, max(block, t), vocab).to(dev)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda",
    )
    step_fn = torch.compile(model) if a.compile else model
    x = torch.randint(0, vocab, (a.micro_batch, t), device=dev)
    y = torch.randint(0, vocab, (a.micro_batch, t), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        t0 = time.perf_counter()
        with autocast:
            loss = step_fn(x, y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # the one host read, as in Lockstep
        t3 = time.perf_counter()
        return loss_value, (t1 - t0, t2 - t1, t3 - t2)

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    phases = [0.0, 0.0, 0.0]
    for _ in range(a.steps):
        _, ms = step()
        phases = [p + m for p, m in zip(phases, ms)]
    secs = time.perf_counter() - start
    tokens_per_sec = a.steps * a.micro_batch * t / secs
    n = params - max(block, t) * n_embd
    flops_per_token = 6 * n + 12 * n_layer * n_head * (n_embd // n_head) * t
    peak = (a.peak_tflops or PEAK_TFLOPS[a.dtype]) * 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    f, b, o = (1000 * p / a.steps for p in phases)
    print(
        f"torch {torch.__version__} {a.preset} {a.dtype} ctx {t} mb {a.micro_batch} vocab {vocab} params {params}  "
        f"{tokens_per_sec:.0f} tokens/s  {1000 * secs / a.steps:.1f} ms/step (forward {f:.1f}, backward {b:.1f}, "
        f"optimizer {o:.1f})  MFU {100 * flops_per_token * tokens_per_sec / peak:.2f}%  peak memory {mem:.2f} GiB"
    )


if __name__ == "__main__":
    main()
