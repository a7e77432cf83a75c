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
The seed's README: ~7 billion activations in a little over 7 days on 8 RTX 4090s (~1,400 tokens/s per GPU if
that is the total processed). On a GPU sparsify's ``SparseCoder.forward`` autocasts to bf16 itself: it has no
float32 encoder there.

``--device cuda``: the same on a GPU (times synchronized, peak GPU memory instead of RSS, the fp32, tf32 and bf16
GEMM rates as ceilings), and ``--peers sparsify`` adds EleutherAI sparsify's step on the same batches in the same
run (``sparsify.SparseCoder``, ``fvu + aux-k/32``, its default optimizer ``ScheduleFreeWrapper(SignSGD)``,
decoder normalization and gradient projection, as ../shared/peerbench does; bf16 = its trainer's autocast).

    python benchmarks/bench_sae_seed.py                 # fp32 and bf16, batch 1024
    python benchmarks/bench_sae_seed.py --dtypes bf16 --batch 4096 --dead-frac 0.1
    python benchmarks/bench_sae_seed.py --device cuda --batch 8192 --steps 20 --warmup 3 --peers sparsify
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from _common import machine_info, print_json, print_machine, print_table, sync, usable_device

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
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--peers", default="", help="comma-separated peers timed in the same run: sparsify")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_mb(device: str) -> float:
    """Peak GPU memory allocated by torch on a GPU, else the process's peak RSS (VmHWM)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def gemm_gflops(a: argparse.Namespace, dtype: torch.dtype = torch.float32, tf32: bool = False) -> float:
    """Dense (B x d) @ (d x n) rate in ``dtype`` at the encoder's shape (n chunked to 8,192 on a CPU to bound
    memory), median of 3 after a warm-up; ``tf32`` lets a GPU's float32 GEMM use its TF32 tensor cores."""
    n = a.d_sae if a.device.startswith("cuda") else 8192
    x = torch.randn(a.batch, a.d_in, device=a.device, dtype=dtype)
    w = torch.randn(n, a.d_in, device=a.device, dtype=dtype)
    out = torch.empty(a.batch, n, device=a.device, dtype=dtype)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    times = []
    for _ in range(4):
        sync(a.device)
        t0 = time.perf_counter()
        torch.mm(x, w.t(), out=out)
        sync(a.device)
        times.append(time.perf_counter() - t0)
    torch.backends.cuda.matmul.allow_tf32 = before
    return 2 * a.batch * a.d_in * n / statistics.median(times[1:]) / 1e9


def data(a: argparse.Namespace, n_batches: int) -> list[torch.Tensor]:
    """Low-rank Gaussian batches with a mean offset, like the peer harness's data."""
    g = torch.Generator().manual_seed(1234)
    r = 64
    U = torch.randn(r, a.d_in, generator=g) / math.sqrt(r)
    mu = 0.5 * torch.randn(a.d_in, generator=g)
    s = 2.0 / torch.sqrt(1.0 + torch.arange(r, dtype=torch.float32))
    return [(mu + (torch.randn(a.batch, r, generator=g) * s) @ U + 0.5 * torch.randn(a.batch, a.d_in, generator=g)
             ).to(a.device) for _ in range(n_batches)]


def check_selection(sae, x_norm: torch.Tensor, bf16: bool) -> None:
    """The sparse forward's selected values equal float64 pre-activations (first 4 tokens)."""
    out = sae.forward_train(x_norm, compute_dtype=torch.bfloat16 if bf16 else None)
    W, b = sae.W_enc.detach()[out.top_indices[:4]].double(), sae.b_enc.detach()[out.top_indices[:4]].double()
    want = ((out.xc[:4, None, :].double() * W).sum(-1) + b).relu()  # [4, k]
    assert torch.allclose(out.top_acts[:4].double(), want, rtol=1e-4, atol=1e-4), "selected values are not exact"


def check_decoder(sae) -> None:
    norms = sae.W_dec.detach().norm(dim=1)
    assert (norms - 1).abs().max() < 1e-4, f"decoder rows drifted from unit norm: {norms.min()}..{norms.max()}"


def dead_latents(a: argparse.Namespace) -> torch.Tensor:
    """The --dead-frac latents marked dead before every step (the same ones for every implementation), on the
    device, so that marking them is no host-to-device copy inside the timed step."""
    g = torch.Generator().manual_seed(1)
    return torch.randperm(a.d_sae, generator=g)[:int(a.dead_frac * a.d_sae)].to(a.device)


def time_steps(a: argparse.Namespace, step) -> tuple[float, list[float]]:
    """(median seconds per step after the warm-up, FVU of every step) of ``step(i)`` -> fvu, synchronized."""
    times, fvus = [], []
    for i in range(a.warmup + a.steps):
        sync(a.device)
        t0 = time.perf_counter()
        fvu = step(i)
        sync(a.device)
        dt = time.perf_counter() - t0
        fvus.append(float(fvu))
        if i >= a.warmup:
            times.append(dt)
    assert all(math.isfinite(f) for f in fvus)
    return statistics.median(times), fvus


def sparsify_child(a: argparse.Namespace, bf16: bool) -> dict:
    """EleutherAI sparsify's TopK step, as ../shared/peerbench/bench_peers.py runs it (fp32 weights; ``bf16``: the
    forward under its trainer's bf16 autocast)."""
    from importlib.metadata import version

    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    batches = data(a, 2)
    t0 = time.perf_counter()
    cfg = SparseCoderConfig(activation="topk", num_latents=a.d_sae, k=a.k, normalize_decoder=True, multi_topk=False)
    sae = SparseCoder(a.d_in, cfg, device=a.device, dtype=torch.float32)
    sae.b_dec.data = batches[0].mean(0)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (a.d_sae / 2 ** 14) ** 0.5)]),
                              momentum=0.95)
    opt.train()
    sync(a.device)
    init_s = time.perf_counter() - t0
    since = torch.zeros(a.d_sae, dtype=torch.long, device=a.device)
    dead = dead_latents(a)
    auto = torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=bf16)

    def step(i: int) -> float:
        sae.set_decoder_norm_to_unit_norm()
        since[dead] = 10 ** 9
        mask = since > 10_000_000
        with auto:
            out = sae(batches[i % 2], dead_mask=mask if bool(mask.any()) else None)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since.add_(1)
        since[out.latent_indices.flatten()] = 0
        return out.fvu.detach()

    med, fvus = time_steps(a, step)
    autocast = torch.device(a.device).type == "cuda" and torch.cuda.is_bf16_supported()  # SparseCoder.forward's own
    return {"impl": f"sparsify {version('eai-sparsify')}",
            "dtype": "bf16" if bf16 else "fp32 weights, bf16 autocast" if autocast else "fp32",
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "tokens_per_s": a.batch / med, "step_s": med, "init_s": init_s, "peak_mb": peak_mb(a.device),
            "fvu_first": fvus[0], "fvu_last": fvus[-1],
            "nominal_gflops": (4 * a.batch * a.d_in * a.d_sae + 8 * a.batch * a.k * a.d_in) / med / 1e9}


def child(a: argparse.Namespace) -> dict:
    from llama_sae.sae.model import normalize
    from llama_sae.sae.train import TrainConfig, World, init_runs_, make_runs, train_step

    torch.set_num_threads(a.threads)
    if a.child.startswith("sparsify-"):
        return sparsify_child(a, a.child == "sparsify-bf16")
    cfg = TrainConfig(d_sae=a.d_sae, k=a.k, batch_size=a.batch, tokens=a.batch * (a.steps + a.warmup),
                      bf16=a.child == "bf16", lr=5e-5)
    batches = data(a, 2)
    t0 = time.perf_counter()
    runs = make_runs(cfg, a.d_in, {}, torch.device(a.device))
    init_runs_(runs, batches[0], cfg)
    sync(a.device)
    init_s = time.perf_counter() - t0
    check_selection(runs[0].sae, normalize(batches[0], "layer_norm")[0], cfg.bf16)
    dead = dead_latents(a)

    def step(i: int) -> float:
        runs[0].since_fired[dead] = cfg.dead_tokens_threshold
        stats = train_step(runs, batches[i % 2], cfg, World(), i, a.warmup + a.steps, a.batch)
        return stats[0][0]

    med, fvus = time_steps(a, step)
    check_decoder(runs[0].sae)
    return {"impl": "llama-sae", "dtype": a.child, "tf32": torch.backends.cuda.matmul.allow_tf32,
            "tokens_per_s": a.batch / med, "step_s": med, "init_s": init_s,
            "peak_mb": peak_mb(a.device), "fvu_first": fvus[0], "fvu_last": fvus[-1],
            "nominal_gflops": (4 * a.batch * a.d_in * a.d_sae + 8 * a.batch * a.k * a.d_in) / med / 1e9}


def main(argv=None) -> None:
    a = parse_args(argv)
    usable_device(a.device)
    if a.child:
        print(MARK + json.dumps(child(a)), flush=True)
        return
    peers = list(filter(None, a.peers.split(",")))
    unknown = [p for p in peers if p != "sparsify"]
    if unknown:
        raise SystemExit(f"error: --peers {','.join(unknown)}: the peer this script times is sparsify")
    if peers and importlib.util.find_spec("sparsify") is None:  # before any timing: a failed child ends the run
        raise SystemExit("error: --peers sparsify, but sparsify is not installed: pip install eai-sparsify, or drop "
                         "--peers")
    torch.set_num_threads(a.threads)
    gpu = a.device.startswith("cuda")
    info = machine_info(a.threads)
    if gpu:
        info["gpu"] = torch.cuda.get_device_name(a.device)
    print_machine(info)
    ceilings = {"fp32": gemm_gflops(a)}
    if gpu:
        ceilings.update(tf32=gemm_gflops(a, tf32=True), bf16=gemm_gflops(a, torch.bfloat16))
        torch.cuda.empty_cache()  # the children are measured with the parent's GPU memory given back
    children = a.dtypes.split(",") + [f"{p}-{d}" for p in peers for d in a.dtypes.split(",")]
    rows = []
    for name in children:
        cmd = [sys.executable, __file__, "--child", name] + [str(v) for kv in (
            ("--d-in", a.d_in), ("--d-sae", a.d_sae), ("--k", a.k), ("--batch", a.batch), ("--steps", a.steps),
            ("--warmup", a.warmup), ("--threads", a.threads), ("--dead-frac", a.dead_frac), ("--device", a.device))
            for v in kv]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
        if line is None:
            raise SystemExit(f"{name} run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[len(MARK):]))
    print(f"shape d_in={a.d_in} d_sae={a.d_sae} k={a.k} batch={a.batch} dead_frac={a.dead_frac} on {a.device}; "
          "GEMM ceilings at the encoder's shape: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceilings.items()))
    print_table(["impl", "dtype", "tokens/s", "step ms", "% of fp32 ceiling", f"peak {'GPU' if gpu else 'RSS'} MB",
                 "init s", "FVU first -> last"],
                [[r["impl"], r["dtype"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s'] * 1e3:.1f}",
                  f"{100 * r['nominal_gflops'] / ceilings['fp32']:.0f}%", f"{r['peak_mb']:,.0f}", f"{r['init_s']:.1f}",
                  f"{r['fvu_first']:.3f} -> {r['fvu_last']:.3f}"] for r in rows])
    print_json({"benchmark": "sae_seed_shape", "machine": info, "args": vars(a), "ceilings_gflops": ceilings,
                "results": rows})


if __name__ == "__main__":
    main()
