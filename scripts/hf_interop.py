#!/usr/bin/env python3
"""Loads a Lockstep checkpoint with Hugging Face transformers and compares its logits with Lockstep's.

Usage:
    python scripts/hf_interop.py CHECKPOINT_DIR REFERENCE.safetensors [--tolerance 1e-4]

CHECKPOINT_DIR is a Lockstep checkpoint (`<checkpoint.dir>/step-00001200`): transformers reads its
`config.json` and `model.safetensors` and ignores the other files. REFERENCE.safetensors holds `input_ids`
(int64, [batch, seq]) and the `logits` (float32, [batch, seq, vocab]) Lockstep computed for them in eval mode;
the `export_for_hf_interop` test writes one next to a freshly trained checkpoint:

    LOCKSTEP_INTEROP_DIR=/tmp/interop cargo test -p lockstep-worker --lib export_for_hf_interop -- --ignored
    python scripts/hf_interop.py /tmp/interop/checkpoints/step-00000030 /tmp/interop/reference.safetensors

Needs `pip install torch transformers safetensors`. Exits 0 when the largest absolute logit difference is within
the tolerance, 1 when it is not, 2 on bad input.
"""
import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a Lockstep checkpoint directory (step-*)")
    parser.add_argument("reference", type=Path, help="safetensors file with input_ids and logits")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |logit difference|")
    args = parser.parse_args()

    config_path = args.checkpoint / "config.json"
    if not config_path.is_file():
        print(f"error: {config_path}: no such file; pass a checkpoint's step directory", file=sys.stderr)
        return 2
    config = json.loads(config_path.read_text())
    positions = config.get("lockstep", {}).get("positions", "learned")
    if positions != "learned":
        print(
            f"error: {config_path}: lockstep.positions = {positions!r}; transformers' GPT-2 has learned "
            "positions only, so it cannot load this model",
            file=sys.stderr,
        )
        return 2
    if not args.reference.is_file():
        print(f"error: {args.reference}: no such file", file=sys.stderr)
        return 2

    import torch
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    # These are the lines a user needs; the rest of this script is the comparison.
    model = GPT2LMHeadModel.from_pretrained(args.checkpoint)
    model.eval()

    reference = load_file(str(args.reference))
    for name in ("input_ids", "logits"):
        if name not in reference:
            print(f"error: {args.reference}: no tensor {name!r}", file=sys.stderr)
            return 2
    input_ids = reference["input_ids"].to(torch.long)
    want = reference["logits"].to(torch.float32)
    with torch.no_grad():
        got = model(input_ids).logits.to(torch.float32)
    if got.shape != want.shape:
        print(f"error: transformers gave logits {tuple(got.shape)}, the reference {tuple(want.shape)}", file=sys.stderr)
        return 2
    diff = (got - want).abs().max().item()
    same_argmax = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(
        f"transformers {__import__('transformers').__version__}, torch {torch.__version__}: "
        f"{want.numel()} logits, max |difference| {diff:.3e} (tolerance {args.tolerance:g}), "
        f"argmax agreement {same_argmax:.1%}"
    )
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
