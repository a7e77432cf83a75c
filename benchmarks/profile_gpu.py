"""Where the time of the SAE's GPU paths goes, at the seed's shape (d_in 3072, 65,536 latents, k 64, 8,192 tokens).

Prints, for a GPU (wall time, synchronized, median of ``--repeats`` after a warm-up):

* the float32 matmul settings torch starts with here (TF32 on or off changes every fp32 number);
* the pieces of the SAE's inference path one by one: layer norm, the encoder GEMM (fp32, TF32, bf16), the
  selection (``select_topk``'s grouped path against one ``torch.topk``), the exact recompute of the chosen
  values (``gather_dot`` against a chunked gather + bmm), the decode (``embedding_bag``), and the whole
  ``reconstruct`` in fp32 and bf16;
* the same selection at the demo SAE's shape (1,024 tokens, 1,024 latents, k 32);
* torch.profiler's top CUDA kernels of one training step (``train_step``, fp32 and bf16).

    python benchmarks/profile_gpu.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import print_table, sync, usable_device


def timer(device: str, repeats: int):
    """measure(fn) -> median ms of ``repeats`` synchronized calls after one warm-up call."""
    def measure(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    return measure


def main(argv=None) -> None:
    """Time the pieces, print the table, then profile training steps."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-sae", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    usable_device(a.device)
    from llama_sae.sae import SAE, SAEConfig
    from llama_sae.sae.model import exact_acts, normalize, select_topk
    from llama_sae.splice import reconstruct

    dev = a.device
    print("float32 matmul:", {"allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                              "precision": torch.get_float32_matmul_precision(),
                              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                              "env": {k: v for k, v in os.environ.items() if "TF32" in k}})
    measure = timer(dev, a.repeats)
    g = torch.Generator(dev).manual_seed(0)
    d, n, k, N = 3072, a.d_sae, 64, a.tokens
    sae = SAE(SAEConfig(d_in=d, d_sae=n, k=k, hook_name="resid_post.23")).to(dev)
    with torch.no_grad():
        sae.W_enc.normal_(0, d ** -0.5, generator=g)
        sae.W_dec.copy_(sae.W_enc)
        sae.normalize_decoder_()
    x = torch.randn(N, d, device=dev, generator=g) * 3 + 1
    rows = {}
    with torch.inference_mode():
        xn = normalize(x, "layer_norm")[0]
        xc = xn - sae.b_dec
        rows["layer norm"] = measure(lambda: normalize(x, "layer_norm"))
        pre = torch.empty(N, n, device=dev)
        rows["encoder GEMM fp32"] = measure(lambda: torch.addmm(sae.b_enc, xc, sae.W_enc.t(), out=pre))
        torch.backends.cuda.matmul.allow_tf32 = True
        rows["encoder GEMM tf32"] = measure(lambda: torch.addmm(sae.b_enc, xc, sae.W_enc.t(), out=pre))
        torch.backends.cuda.matmul.allow_tf32 = False
        Wb, xb = sae.W_enc.bfloat16(), xc.bfloat16()
        pre16 = torch.empty(N, n, device=dev, dtype=torch.bfloat16)
        rows["encoder GEMM bf16"] = measure(lambda: torch.mm(xb, Wb.t(), out=pre16))
        torch.addmm(sae.b_enc, xc, sae.W_enc.t(), out=pre)
        rows["select_topk (grouped) fp32"] = measure(lambda: select_topk(pre, k))
        rows["torch.topk fp32"] = measure(lambda: pre.topk(k, dim=-1, sorted=False))
        rows["select_topk (grouped) bf16"] = measure(lambda: select_topk(pre16, k))
        rows["torch.topk bf16"] = measure(lambda: pre16.topk(k, dim=-1, sorted=False))
        _, idx = select_topk(pre, k)
        rows["exact values: gather_dot"] = measure(lambda: exact_acts(xc, sae.W_enc, sae.b_enc, idx))

        def bmm_values():
            out = torch.empty(N, k, device=dev)
            for s in range(0, N, 1024):
                w = sae.W_enc[idx[s:s + 1024]]  # [c, k, d]
                out[s:s + 1024] = torch.bmm(w, xc[s:s + 1024, :, None])[..., 0] + sae.b_enc[idx[s:s + 1024]]
            return out.relu_()
        want = exact_acts(xc, sae.W_enc, sae.b_enc, idx)
        err = float((bmm_values() - want).abs().max())
        rows[f"exact values: gather + bmm (max diff {err:.1e})"] = measure(bmm_values)
        vals = want
        rows["decode: embedding_bag"] = measure(lambda: torch.nn.functional.embedding_bag(
            idx, sae.W_dec, per_sample_weights=vals, mode="sum"))
        rows["reconstruct fp32 (whole)"] = measure(lambda: reconstruct(sae, x))
        rows["reconstruct bf16 (whole)"] = measure(lambda: reconstruct(sae, x, compute_dtype=torch.bfloat16))
        rows["sae.weights_key()"] = measure(lambda: sae.weights_key())
        small = torch.randn(1024, 1024, device=dev, generator=g)
        rows["demo shape: select_topk [1024, 1024] k 32"] = measure(lambda: select_topk(small, 32))
        rows["demo shape: torch.topk [1024, 1024] k 32"] = measure(lambda: small.topk(32, dim=-1, sorted=False))
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"
    print(f"d_in {d}, {n} latents, k {k}, {N} tokens on {name}; ms, median of {a.repeats}")
    print_table(["piece", "ms"], [[name, f"{ms:.2f}"] for name, ms in rows.items()])
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    profile_train(dev, x, n)


def profile_train(dev: str, x: torch.Tensor, n: int) -> None:
    """Init time and torch.profiler's top kernels of two train_step calls, float32 and bf16."""
    from torch.profiler import ProfilerActivity, profile

    from llama_sae.sae.train import TrainConfig, World, init_runs_, make_runs, train_step

    for bf16 in (False, True):
        cfg = TrainConfig(d_sae=n, k=64, batch_size=len(x), tokens=len(x) * 10, bf16=bf16, lr=5e-5)
        t0 = time.perf_counter()
        runs = make_runs(cfg, x.shape[1], {}, torch.device(dev))
        init_runs_(runs, x, cfg)
        sync(dev)
        print(f"train init ({'bf16' if bf16 else 'fp32'}): {time.perf_counter() - t0:.1f} s")
        for i in range(3):
            train_step(runs, x, cfg, World(), i, 10, len(x))
        sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(3, 5):
                train_step(runs, x, cfg, World(), i, 10, len(x))
            sync(dev)
        print(f"train_step {'bf16' if bf16 else 'fp32'}, 2 steps:")
        key = "cuda_time_total" if dev.startswith("cuda") else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
        del runs


if __name__ == "__main__":
    main()
