"""Speed of our pure-PyTorch Llama against transformers' LlamaForCausalLM, on the same weights.

What is measured, all in one process and with the repeats of the two implementations interleaved
(so that load from other processes on the machine hits both alike); each number is a median:

* prefill: ``model(tokens)`` on a [batch, seq] block of tokens, full logits, no cache -> tokens/s.
  transformers: ``model(tokens, use_cache=False).logits``.
* decode: greedy generation with a KV cache of ``--new-tokens`` tokens after a short prompt, at
  each ``--decode-batch`` -> generated tokens/s (the prompt's prefill is included in the time, for
  both). Ours: ``generate_tokens``; transformers: ``generate(do_sample=False, max_new_tokens=N,
  min_new_tokens=N)`` with its default dynamic cache.
* capture: ``model.capture(tokens, ["resid_post.1"])`` (which stops after block 1) against a full
  forward, compared with the ideal time ratio: blocks run / all blocks (ignoring the LM head), and
  the same in multiply-adds with the LM head counted. Capturing the last block is timed too: it
  shows what the final norm + LM head cost.

Why: the project's own model is what the SAE pipeline runs for hours; it should be no slower than
the reference, and capture should only pay for the layers it needs. The goal is ours/transformers
>= 1.0 in tokens/s, reported as the ratio of medians and the ratio of minima (the least disturbed
run of each: on a shared machine this is the more stable of the two). Correctness is re-checked on
the timed path: the timed logits against transformers' (fp32: within 1e-4; bf16: top-1 agreement
>= 0.99), the generated tokens (fp32: identical; bf16: agreement reported), and the captured
activation against transformers' hidden state. Both models come from the same safetensors file,
transformers' through ``from_pretrained(dtype=...)``.

    python benchmarks/bench_llama_forward.py --dtype fp32
    python benchmarks/bench_llama_forward.py --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch
from _common import (
    DTYPES,
    build_hf_llama,
    interleaved,
    machine_info,
    print_json,
    print_machine,
    print_table,
    quiet_transformers,
)

from llama_sae.llama import load_model
from llama_sae.llama.generate import generate_tokens


def layer_macs(a, ctx: int) -> float:
    """Multiply-adds per token of one block at average causal context ``ctx``."""
    d, hd = a.dim, a.head_dim
    proj = d * (a.n_heads * hd) * 2 + d * (a.n_kv_heads * hd) * 2  # wq, wo, wk, wv
    ffn = 3 * d * a.hidden_dim
    attn = 2 * a.n_heads * hd * ctx  # q.k and p.v over the keys
    return proj + ffn + attn


def ideal_capture_ratios(a, seq: int, layers_run: int) -> tuple[float, float]:
    """(blocks run / all blocks, the same in multiply-adds with the LM head counted)."""
    per_layer = layer_macs(a, (seq + 1) / 2)
    head = a.dim * a.vocab_size
    return layers_run / a.n_layers, layers_run * per_layer / (a.n_layers * per_layer + head)


def speed_ratios(times: dict[str, list[float]], a: str = "ours", b: str = "transformers") -> dict[str, float]:
    """Speed of ``a`` over ``b`` (>1: a is faster) three ways: medians, minima (the least disturbed run,
    robust to bursts of load from other processes), and the median of per-round ratios."""
    ta, tb = times[a], times[b]
    return {"ratio": statistics.median(tb) / statistics.median(ta), "ratio_min": min(tb) / min(ta),
            "ratio_paired": statistics.median(y / x for x, y in zip(ta, tb))}


def profile_top(label: str, fn, rows: int) -> None:
    """One torch.profiler pass over ``fn``; print the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {label}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--init-range", type=float, default=0.05,
                   help="weight init std; 0.05 gives logits of std ~1 and non-repeating greedy text")
    p.add_argument("--batch", type=int, default=4, help="prefill batch")
    p.add_argument("--seq", type=int, default=256, help="prefill sequence length")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=16, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--capture-layer", type=int, default=None,
                   help="block whose output the capture check compares (default 1, or 0 with --layers 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler op table for each timed path")
    args = p.parse_args(argv)
    if args.layers < 2:  # the last block's output is compared with nothing transformers returns (final norm)
        raise SystemExit(f"error: --layers {args.layers}: the capture check needs a block before the last one; use "
                         "--layers 2 or more")
    if args.capture_layer is None:
        args.capture_layer = min(1, args.layers - 2)
    if not 0 <= args.capture_layer < args.layers - 1:  # before any timing
        raise SystemExit(f"error: --capture-layer {args.capture_layer}: pick a block before the last one "
                         f"(0..{args.layers - 2}); the last block's output is compared with nothing transformers "
                         "returns before its final norm")

    torch.set_num_threads(args.threads)
    quiet_transformers()
    dtype = DTYPES[args.dtype]
    info = machine_info(args.threads, args.dtype)
    print_machine(info)

    from transformers import LlamaForCausalLM

    built = build_hf_llama(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                           intermediate=args.intermediate, vocab=args.vocab, init_range=args.init_range)
    with tempfile.TemporaryDirectory() as tmp:
        built.to(dtype).save_pretrained(tmp)
        del built
        # Reload rather than use ``built.to(dtype)``: .to() would also round transformers' RoPE inv_freq
        # buffer to bf16 (from_pretrained keeps it in fp32), making the reference needlessly inexact.
        ref = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        ours = load_model(tmp)
    info["hf_attn_implementation"] = ref.config._attn_implementation
    assert ours.dtype == dtype, (ours.dtype, dtype)
    cfg = ours.args
    print(f"model: hidden {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, "
          f"ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}, tied {cfg.tie_embeddings}, {args.dtype}, "
          f"transformers attention={info['hf_attn_implementation']}")

    g = torch.Generator().manual_seed(1)
    rows, result, ok = [], {"benchmark": "llama_forward", "machine": info, "config": vars(args)}, True

    # ---------------------------------------------------------------- prefill
    tokens = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=g)
    with torch.inference_mode():
        med, times, last = interleaved({"ours": lambda: ours(tokens),
                                        "transformers": lambda: ref(tokens, use_cache=False).logits},
                                       args.repeats, args.warmup)
        a, b = last["ours"].float(), last["transformers"].float()
        max_diff = (a - b).abs().max().item()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    check = max_diff <= 1e-4 if dtype == torch.float32 else top1 >= 0.99
    ok &= check
    n_tok = args.batch * args.seq
    prefill = {"shape": [args.batch, args.seq], "ours_s": med["ours"], "transformers_s": med["transformers"],
               "ours_tok_s": n_tok / med["ours"], "transformers_tok_s": n_tok / med["transformers"],
               **speed_ratios(times), "max_abs_logit_diff": max_diff, "top1_agreement": top1, "check_ok": check,
               "times_s": times}
    result["prefill"] = prefill
    rows.append([f"prefill {args.batch}x{args.seq}", f"{prefill['ours_tok_s']:.0f}",
                 f"{prefill['transformers_tok_s']:.0f}", f"{prefill['ratio']:.2f}", f"{prefill['ratio_min']:.2f}",
                 f"max|dlogit|={max_diff:.1e} top1={top1:.3f} {'ok' if check else 'FAIL'}"])
    if args.profile:
        with torch.inference_mode():
            profile_top("ours prefill", lambda: ours(tokens), 15)
            profile_top("transformers prefill", lambda: ref(tokens, use_cache=False), 15)

    # ---------------------------------------------------------------- decode
    result["decode"] = []
    for bsz in args.decode_batch:
        prompt = torch.randint(3, cfg.vocab_size, (bsz, args.prompt_len), generator=g)
        prompts = prompt.tolist()
        n_new = args.new_tokens

        def run_ours(prompts=prompts, n_new=n_new):
            steps = [t for t, _ in generate_tokens(ours, prompts, max_new_tokens=n_new, stop_ids=set(), pad_id=0)]
            return torch.stack(steps, dim=1)  # [B, N]

        def run_hf(prompt=prompt, n_new=n_new):
            with torch.no_grad():
                out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0, use_cache=True)
            return out[:, prompt.shape[1]:]

        med, times, last = interleaved({"ours": run_ours, "transformers": run_hf}, args.repeats, args.warmup)
        a, b = last["ours"], last["transformers"]
        same = a.shape == b.shape and bool(torch.equal(a, b))
        agree = (a == b).float().mean().item() if a.shape == b.shape else 0.0
        check = same if dtype == torch.float32 else True  # bf16: reported, not required
        ok &= check
        n_tok = bsz * n_new
        dec = {"batch": bsz, "prompt_len": args.prompt_len, "new_tokens": n_new, "ours_s": med["ours"],
               "transformers_s": med["transformers"], "ours_tok_s": n_tok / med["ours"],
               "transformers_tok_s": n_tok / med["transformers"], **speed_ratios(times), "times_s": times,
               "tokens_identical": same, "token_agreement": agree, "distinct_tokens": len(set(a.flatten().tolist())),
               "check_ok": check}
        result["decode"].append(dec)
        note = "tokens identical" if same else f"token agreement {agree:.3f}"
        rows.append([f"decode b={bsz} {args.prompt_len}+{n_new}", f"{dec['ours_tok_s']:.1f}",
                     f"{dec['transformers_tok_s']:.1f}", f"{dec['ratio']:.2f}", f"{dec['ratio_min']:.2f}",
                     f"{note} ({dec['distinct_tokens']} distinct) {'ok' if check else 'FAIL'}"])
        if args.profile:
            profile_top(f"ours decode b={bsz}", run_ours, 15)
            profile_top(f"transformers decode b={bsz}", run_hf, 15)

    print()
    print_table(["path", "ours tok/s", "transformers tok/s", "ours/tf (median)", "ours/tf (min)", "check"], rows)

    # ---------------------------------------------------------------- capture
    L, last_layer = args.capture_layer, cfg.n_layers - 1  # (checked against --layers above)
    early, late = f"resid_post.{L}", f"resid_post.{last_layer}"
    with torch.inference_mode():
        med, cap_times, last = interleaved({"full": lambda: ours(tokens),
                                            "early": lambda: ours.capture(tokens, [early]),
                                            "late": lambda: ours.capture(tokens, [late])},
                                           args.repeats, args.warmup)
        hidden = ref(tokens, use_cache=False, output_hidden_states=True).hidden_states  # [0] = embeddings
        cap_diff = (last["early"][early].float() - hidden[L + 1].float()).abs().max().item()
        scale = hidden[L + 1].float().abs().max().item()
    check = cap_diff <= (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, scale)
    ok &= check
    cap_rows, result["capture"] = [], []
    for name, key, layers_run in ((early, "early", L + 1), (late, "late", cfg.n_layers)):
        ideal_blocks, ideal_macs = ideal_capture_ratios(cfg, args.seq, layers_run)
        ratio = med[key] / med["full"]
        result["capture"].append({"hook": name, "capture_s": med[key], "full_forward_s": med["full"],
                                  "time_ratio": ratio, "time_ratio_min": min(cap_times[key]) / min(cap_times["full"]),
                                  "ideal_blocks_ratio": ideal_blocks,
                                  "ideal_macs_ratio_with_head": ideal_macs})
        cap_rows.append([f"capture {name}", f"{med[key] * 1e3:.1f}", f"{med['full'] * 1e3:.1f}", f"{ratio:.3f}",
                         f"{result['capture'][-1]['time_ratio_min']:.3f}",
                         f"{ideal_blocks:.3f}", f"{ideal_macs:.3f}"])
    result["capture_check"] = {"max_abs_diff_vs_transformers_hidden": cap_diff, "check_ok": check}
    print(f"\ncapture on {args.batch}x{args.seq}; {early} vs transformers hidden_states[{L + 1}]: "
          f"max|diff|={cap_diff:.1e} {'ok' if check else 'FAIL'}")
    print_table(["path", "capture ms", "full fwd ms", "time ratio", "(min)", "ideal (blocks)", "ideal (MACs, +head)"],
                cap_rows)

    result["ok"] = bool(ok)
    print()
    print_json(result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
