"""Training speed and memory of one SAE at the seed project's shape (d_in 3072, 65,536 latents, k 64).

What is measured, each dtype in its own process (so peak memory is per configuration):

* tokens/s of ``llama_sae.sae.train.train_step``, the exact step ``llama-sae train`` runs (layer_norm inputs,
  sparse forward and backward, FVU + aux-k, AdamW, decoder projection and renormalization, dead-latent
  counters), median over ``--steps`` timed steps after ``--warmup``; fp32 and bf16 (``--bf16``: encoder GEMM
  in bf16, float32 master weights). ``--dead-frac`` marks that fraction of latents dead so aux-k runs.
* init seconds (orthogonal init of W_enc by QR, once per run) and peak RSS (VmHWM) of the whole process.
* the dense fp32 GEMM rate at the encoder's shape, as the ceiling: nominal FLOPs per step are those of the
  peer harness, 4·B·d·n + 8·B·k·d.

Correctness on the timed path: the loss stays finite, every decoder row has unit norm after each step, and
the selected latents' values equal their float64 pre-activations for a few tokens.
The seed ran 1,350 tokens/s per RTX 4090 GPU (its README); this is a 2-core CPU.

    python benchmarks/bench_sae_seed.py                 # fp32 and bf16, batch 1024
    python benchmarks/bench_sae_seed.py --dtypes bf16 --batch 4096 --dead-frac 0.1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from _common import machine_info, print_json, print_machine, print_table

MARK = "@@RESULT@@"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=3072)
    p.add_argument("--d-sae", type=int, default=65536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=1024, help="tokens per step (the seed: 1,024 per GPU)")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dead-frac", type=float, default=0.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def gemm_gflops(a: argparse.Namespace) -> float:
    """Dense fp32 (B x d) @ (d x n) rate, median of 3, chunked over n to bound memory."""
    x, w = torch.randn(a.batch, a.d_in), torch.randn(8192, a.d_in)
    out = torch.empty(a.batch, 8192)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        torch.mm(x, w.t(), out=out)
        times.append(time.perf_counter() - t0)
    return 2 * a.batch * a.d_in * 8192 / statistics.median(times[1:]) / 1e9


def data(a: argparse.Namespace, n_batches: int) -> list[torch.Tensor]:
    """Low-rank Gaussian batches with a mean offset, like the peer harness's data."""
    g = torch.Generator().manual_seed(1234)
    r = 64
    U = torch.randn(r, a.d_in, generator=g) / math.sqrt(r)
    mu = 0.5 * torch.randn(a.d_in, generator=g)
    s = 2.0 / torch.sqrt(1.0 + torch.arange(r, dtype=torch.float32))
    return [mu + (torch.randn(a.batch, r, generator=g) * s) @ U + 0.5 * torch.randn(a.batch, a.d_in, generator=g)
            for _ in range(n_batches)]


def check_selection(sae, x_norm: torch.Tensor, bf16: bool) -> None:
    """The sparse forward's selected values equal float64 pre-activations (first 4 tokens)."""
    out = sae.forward_train(x_norm, compute_dtype=torch.bfloat16 if bf16 else None)
    W, b = sae.W_enc.detach()[out.top_indices[:4]].double(), sae.b_enc.detach()[out.top_indices[:4]].double()
    want = ((out.xc[:4, None, :].double() * W).sum(-1) + b).relu()  # [4, k]
    assert torch.allclose(out.top_acts[:4].double(), want, rtol=1e-4, atol=1e-4), "selected values are not exact"


def check_decoder(sae) -> None:
    norms = sae.W_dec.detach().norm(dim=1)
    assert (norms - 1).abs().max() < 1e-4, f"decoder rows drifted from unit norm: {norms.min()}..{norms.max()}"


def child(a: argparse.Namespace) -> dict:
    from llama_sae.sae.model import normalize
    from llama_sae.sae.train import TrainConfig, World, init_runs_, make_runs, train_step

    torch.set_num_threads(a.threads)
    cfg = TrainConfig(d_sae=a.d_sae, k=a.k, batch_size=a.batch, tokens=a.batch * (a.steps + a.warmup),
                      bf16=a.child == "bf16", lr=5e-5)
    batches = data(a, 2)
    t0 = time.perf_counter()
    runs = make_runs(cfg, a.d_in, {}, torch.device("cpu"))
    init_runs_(runs, batches[0], cfg)
    init_s = time.perf_counter() - t0
    check_selection(runs[0].sae, normalize(batches[0], "layer_norm")[0], cfg.bf16)
    dead = torch.randperm(a.d_sae, generator=torch.Generator().manual_seed(1))[:int(a.dead_frac * a.d_sae)]
    times, fvus = [], []
    for i in range(a.warmup + a.steps):
        runs[0].since_fired[dead] = cfg.dead_tokens_threshold
        t0 = time.perf_counter()
        stats = train_step(runs, batches[i % 2], cfg, World(), i, a.warmup + a.steps, a.batch)
        dt = time.perf_counter() - t0
        fvus.append(float(stats[0][0]))
        if i >= a.warmup:
            times.append(dt)
    assert all(math.isfinite(f) for f in fvus)
    check_decoder(runs[0].sae)
    med = statistics.median(times)
    return {"dtype": a.child, "tokens_per_s": a.batch / med, "step_s": med, "init_s": init_s,
            "peak_rss_mb": peak_rss_mb(), "fvu_first": fvus[0], "fvu_last": fvus[-1],
            "nominal_gflops": (4 * a.batch * a.d_in * a.d_sae + 8 * a.batch * a.k * a.d_in) / med / 1e9}


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.child:
        print(MARK + json.dumps(child(a)), flush=True)
        return
    torch.set_num_threads(a.threads)
    info = machine_info(a.threads)
    print_machine(info)
    ceiling = gemm_gflops(a)
    rows = []
    for dtype in a.dtypes.split(","):
        cmd = [sys.executable, __file__, "--child", dtype] + [str(v) for kv in (
            ("--d-in", a.d_in), ("--d-sae", a.d_sae), ("--k", a.k), ("--batch", a.batch), ("--steps", a.steps),
            ("--warmup", a.warmup), ("--threads", a.threads), ("--dead-frac", a.dead_frac)) for v in kv]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
        if line is None:
            raise SystemExit(f"{dtype} run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[len(MARK):]))
    print(f"shape d_in={a.d_in} d_sae={a.d_sae} k={a.k} batch={a.batch} dead_frac={a.dead_frac}; "
          f"fp32 GEMM ceiling {ceiling:.0f} GFLOP/s")
    print_table(["dtype", "tokens/s", "step s", "% of fp32 ceiling", "peak RSS MB", "init s", "FVU first -> last"],
                [[r["dtype"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.2f}",
                  f"{100 * r['nominal_gflops'] / ceiling:.0f}%", f"{r['peak_rss_mb']:,.0f}", f"{r['init_s']:.1f}",
                  f"{r['fvu_first']:.3f} -> {r['fvu_last']:.3f}"] for r in rows])
    print_json({"benchmark": "sae_seed_shape", "machine": info, "args": vars(a), "ceiling_gflops_fp32": ceiling,
                "results": rows})


if __name__ == "__main__":
    main()
