"""Loader throughput against an SAE training step, shard write throughput, and disk bytes per token.

What is measured, in one process (numbers are medians over ``--repeats`` rounds, paths interleaved so that
load from other processes hits them alike):

* write: a synthetic store of ``--rows`` rows at d=``--d`` (bf16, one hook) written through ``StoreWriter``
  (the capture's writer: shards cut in the caller's thread, statistics, serialization, sha256 and atomic
  writes in the background thread) -> rows/s and MB/s.
* loader: ``ActivationStore.loader(batch, seed=...)`` (memory maps, shuffle buffers of whole shards, the
  next buffer read in a background thread, float32 batches) -> rows/s over whole epochs, buffer builds
  included; warm (page cache) and cold (the shards' pages dropped with posix_fadvise first).
* SAE step: written before the trainer (``llama_sae.sae.train.train_step``) existed, and kept as it was so
  that its figures stay comparable: one dense fp32 TopK SAE training step at d_in=512, n_latents=8192, k=32,
  batch 4096, in plain torch: encoder matmul + bias, topk, ReLU, an embedding_bag decoder (only the k chosen
  latents), MSE, backward, Adam -> rows/s. The goal is loader rows/s >= 5x this.
* fed by the loader: the same SAE steps with their batches drawn from the loader vs. a fixed batch: what
  the loader's background thread costs a training loop that shares the CPU with it.
* seek: time from ``loader(start_batch=N)`` to its first batch (one buffer build, no replay).

Correctness on the timed path: one unshuffled epoch reproduces the written rows in order (first batch
compared), and one shuffled epoch's float64 sum equals the written rows' (every row once).
Disk bytes per token are compared with the 2·d bytes of bf16 activations alone.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_store.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_store.py --rows 2000000 --d 3072     # Llama 3.2-3B width
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine_info, print_json, print_machine, print_table

from llama_sae.fileio import atomic_write_json
from llama_sae.store import FORMAT, VERSION, ActivationStore, StoreWriter, finalize_store

HOOK = "resid_post.0"


def write_store(path: Path, rows: int, d: int, shard_rows: int, seed: int = 0) -> tuple[float, torch.Tensor]:
    """A synthetic bf16 store of ``rows`` rows; returns (seconds, float64 sum of all rows [d])."""
    path.mkdir()
    atomic_write_json(path / "manifest.json", {
        "format": FORMAT, "version": VERSION, "status": "capturing", "hooks": [HOOK], "d": d, "dtype": "bfloat16",
        "model": {"path": "synthetic", "fingerprint": "0" * 64}, "corpus": {"source": "synthetic",
                                                                             "fingerprint": "0" * 64},
        "capture": {"world_size": 1, "tokens": rows}, "split": {"val_percent": 5, "rule": "splitmix64"}})
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(min(8192, rows - lo), d, generator=g).bfloat16() for lo in range(0, rows, 8192)]
    total = sum(x.double().sum(0) for x in chunks)  # [d]
    t0 = time.perf_counter()
    writer = StoreWriter(path, [HOOK], d, shard_rows=shard_rows, dtype=torch.bfloat16, val_percent=5)
    for lo, x in zip(range(0, rows, 8192), chunks):
        sid = torch.arange(lo, lo + x.shape[0]) // 25  # sentences of 25 tokens
        writer.add({HOOK: x}, sid, torch.arange(lo, lo + x.shape[0]) % 25 + 1, sid % 4096, {"batch": lo, "skip": 0})
    writer.finish({"batch": rows, "skip": 0})
    seconds = time.perf_counter() - t0
    finalize_store(path, tokens=rows)
    return seconds, total


def drop_cache(store: ActivationStore) -> None:
    """Evict the shards' pages from the page cache (only these files; needs no privileges)."""
    for entry in store.shards:
        fd = os.open(store.path / entry["name"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sae_trainer(d_in: int, n_latents: int, k: int, seed: int = 0):
    """One dense fp32 TopK SAE training step as a function of a batch x [B, d_in]."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.nn.Parameter(torch.randn(d_in, n_latents, generator=g) / math.sqrt(d_in))
    # contiguous: a transposed (column-major) weight sends embedding_bag down a path ~15x slower on CPU
    w_dec = torch.nn.Parameter((w_enc.detach().T / w_enc.detach().T.norm(dim=1, keepdim=True)).contiguous())
    b_enc = torch.nn.Parameter(torch.zeros(n_latents))
    b_pre = torch.nn.Parameter(torch.zeros(d_in))
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_pre], lr=1e-4)

    def step(x: torch.Tensor) -> float:
        pre = (x - b_pre) @ w_enc + b_enc  # [B, n]
        vals, idx = pre.topk(k, dim=1)  # [B, k]
        x_hat = F.embedding_bag(idx, w_dec, per_sample_weights=vals.relu(), mode="sum") + b_pre  # [B, d_in]
        loss = (x_hat - x).square().sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def loader_rows_per_s(store: ActivationStore, batch: int, epochs: int, seed: int) -> float:
    t0 = time.perf_counter()
    n = sum(b.shape[0] for b in store.loader(batch, seed=seed, epochs=epochs))
    return n / (time.perf_counter() - t0)


def check(store: ActivationStore, total: torch.Tensor, batch: int) -> None:
    """Unshuffled order equals the written order; a shuffled epoch visits every row once."""
    first = next(iter(store.loader(batch, shuffle=False, split="all")))
    assert torch.equal(first, store.read(0)["acts"][:batch].float()), "unshuffled order"
    seen = torch.zeros_like(total)
    for b in store.loader(batch, seed=1, split="all", epochs=1, drop_last=False):
        seen += b.double().sum(0)
    torch.testing.assert_close(seen, total, rtol=1e-9, atol=1e-6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--shard-rows", type=int, default=65_536)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sae-steps", type=int, default=10, help="SAE steps per round")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("warning: OMP_WAIT_POLICY=PASSIVE is not set: on a machine shared with other processes, OpenMP's "
              "spinning workers make some paths up to 10x slower than others (see BENCHMARKS.md)")
    info = machine_info(args.threads, "bf16 store, fp32 batches and SAE")
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    print_machine(info)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        write_s, total = write_store(path, args.rows, args.d, args.shard_rows)
        store = ActivationStore(path)
        check(store, total, args.batch)
        step = sae_trainer(args.d, args.n_latents, args.k)
        fixed = torch.randn(args.batch, args.d)
        step(fixed)
        times = {"loader warm": [], "loader cold": [], "SAE step": [], "SAE step fed by loader": []}
        for r in range(args.repeats):
            times["loader warm"].append(args.batch / loader_rows_per_s(store, args.batch, 1, seed=r))
            drop_cache(store)
            times["loader cold"].append(args.batch / loader_rows_per_s(store, args.batch, 1, seed=100 + r))
            t0 = time.perf_counter()
            for _ in range(args.sae_steps):
                step(fixed)
            times["SAE step"].append((time.perf_counter() - t0) / args.sae_steps)
            batches = iter(store.loader(args.batch, seed=200 + r))
            step(next(batches))  # the first buffer's build is a one-off, not a per-step cost
            t0 = time.perf_counter()
            for _ in range(args.sae_steps):
                step(next(batches))
            times["SAE step fed by loader"].append((time.perf_counter() - t0) / args.sae_steps)
            batches.close()
        t0 = time.perf_counter()
        next(iter(store.loader(args.batch, seed=0, start_batch=1_000_000)))
        seek = time.perf_counter() - t0
        manifest = store.manifest

    med = {k: statistics.median(v) for k, v in times.items()}  # seconds per batch of args.batch rows
    rate = {k: args.batch / v for k, v in med.items()}
    result = {
        "rows": args.rows, "d": args.d, "batch": args.batch, "n_latents": args.n_latents, "k": args.k,
        "write_rows_per_s": args.rows / write_s, "write_mb_per_s": manifest["bytes"] / write_s / 1e6,
        "rows_per_s": rate,
        "loader_over_sae_warm": rate["loader warm"] / rate["SAE step"],
        "loader_over_sae_cold": rate["loader cold"] / rate["SAE step"],
        "loader_min_over_sae": min(args.batch / t for t in times["loader cold"] + times["loader warm"])
        / (args.batch / min(times["SAE step"])),
        "fed_step_slowdown": med["SAE step fed by loader"] / med["SAE step"] - 1,
        "seek_seconds": seek,
        "bytes_per_token": manifest["bytes"] / manifest["rows"], "bf16_bytes_per_token": 2 * args.d,
        "machine": info,
    }
    print_table(["path", "ms per batch", "rows/s", "x SAE step"],
                [[k, f"{1e3 * v:.1f}", f"{rate[k]:,.0f}", f"{rate[k] / rate['SAE step']:.1f}"] for k, v in med.items()])
    print(f"loader / SAE trainer rows/s: {result['loader_over_sae_warm']:.1f}x warm, "
          f"{result['loader_over_sae_cold']:.1f}x cold (goal >= 5x); SAE steps fed by the loader are "
          f"{100 * result['fed_step_slowdown']:+.1f}% slower than on a fixed batch")
    print(f"write: {result['write_rows_per_s']:,.0f} rows/s ({result['write_mb_per_s']:.0f} MB/s, sha256 and fsync "
          f"included); seek to batch 1,000,000: {seek:.2f} s; disk: {result['bytes_per_token']:.1f} bytes per "
          f"token vs {2 * args.d} for bf16 activations alone")
    print_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
