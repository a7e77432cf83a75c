"""Which attention call the model should make on this device: grouped-query attention through SDPA's
``enable_gqa`` (no K/V copies) or K/V repeated per query head, with and without a mask.

On a GPU a boolean mask with ``enable_gqa`` may keep SDPA off its flash and memory-efficient kernels (the
"math" kernel materializes [B, H, T, T] scores). Capture always passes a mask (block-causal over packed
sentences), generation and evaluation pass one for left padding, so the choice matters there. Times one whole
forward of a random bf16 model (default: Llama 3.2-3B's shape) on [batch, seq] random tokens, interleaved:

* causal, gqa     no mask (is_causal), ``enable_gqa``          (the plain forward)
* causal, repeat  no mask, K/V repeated
* mask, gqa       a packed block-causal bool mask, ``enable_gqa``  (capture's path today)
* mask, repeat    the same mask, K/V repeated

The outputs of each pair are compared (they must agree to bf16 rounding).

    python benchmarks/bench_attention.py --device cuda
    python benchmarks/bench_attention.py --device cuda --shape tiny --batch 64 --seq 128
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import interleaved, machine_info, print_json, print_machine, print_table, sync, usable_device


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=["seed", "tiny"], default="seed", help="seed: Llama 3.2-3B; tiny: tinyworld")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--sentence", type=int, default=24, help="tokens per packed sentence in the mask")
    p.add_argument("--layers", type=int, default=None, help="blocks (default: the shape's)")
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Time the four attention variants, check that each pair agrees, print the table; the result dict."""
    import llama_sae.llama.model as llama
    from llama_sae.capture import block_causal_mask

    a = parse_args(argv)
    usable_device(a.device)
    if a.shape == "seed":
        args = llama.ModelArgs(dim=3072, n_layers=a.layers or 28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                               ffn_dim_multiplier=1.0, multiple_of=256, tie_embeddings=True)
    else:
        args = llama.ModelArgs(dim=256, n_layers=a.layers or 6, n_heads=8, n_kv_heads=4, vocab_size=4096,
                               multiple_of=64, tie_embeddings=True)
    g = torch.Generator(a.device).manual_seed(0)
    with torch.device("meta"):
        model = llama.Transformer(args)
    model = model.to_empty(device=a.device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=g)
    model.inv_freq = llama.rope_inv_freq(args).to(a.device)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq), generator=g, device=a.device)
    segments = torch.arange(a.seq, device=a.device) // a.sentence  # [T]: packed sentences of a.sentence tokens
    positions = (torch.arange(a.seq, device=a.device) % a.sentence).expand(a.batch, -1)
    mask = block_causal_mask(segments.expand(a.batch, -1).cpu()).to(a.device)  # [B, 1, T, T]
    gpu = a.device.startswith("cuda")

    def run(gqa: bool, masked: bool):
        def go():
            llama.SDPA_GQA = gqa
            with torch.inference_mode():
                out = model(tokens, positions=positions, mask=mask) if masked else model(tokens)
            sync(a.device)
            return out
        return go

    supported = llama.SDPA_GQA
    fns = {"causal, gqa": run(True, False), "causal, repeat": run(False, False),
           "mask, gqa": run(True, True), "mask, repeat": run(False, True)}
    if not supported:
        fns = {n: f for n, f in fns.items() if "gqa" not in n}
    try:
        med, _, last = interleaved(fns, a.repeats, clock=time.perf_counter)
    finally:
        llama.SDPA_GQA = supported
    for x, y in (("causal, gqa", "causal, repeat"), ("mask, gqa", "mask, repeat")):
        if x in last:
            err = float((last[x].float() - last[y].float()).norm() / last[y].float().norm())
            assert err < 2e-2, f"{x} vs {y}: relative difference {err:.3g}"
    info = machine_info(torch.get_num_threads(), "bf16")
    if gpu:
        info["gpu"] = torch.cuda.get_device_name(a.device)
    n = a.batch * a.seq
    print_machine(info)
    print(f"{a.shape} shape ({args.n_layers} blocks, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads), "
          f"[{a.batch}, {a.seq}] tokens on {a.device}; mask: packed sentences of {a.sentence} tokens; median of "
          f"{a.repeats} interleaved rounds, wall time, synchronized")
    base = med.get("causal, gqa", med["causal, repeat"])
    print_table(["attention", "ms / forward", "tokens/s", "x causal"],
                [[k, f"{v * 1e3:.1f}", f"{n / v:,.0f}", f"{v / base:.3f}"] for k, v in med.items()])
    result = {"benchmark": "attention", "machine": info, "args": vars(a),
              "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()}}
    print_json(result)
    return result


if __name__ == "__main__":
    main()
