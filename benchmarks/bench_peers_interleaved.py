"""The peer harness's training steps, interleaved step by step in one process: ratios that survive a noisy host.

``../shared/peerbench/bench_peers.py`` runs each implementation in its own process, one after another. On a
shared 2-core VM the host's load swings within a minute (its own GEMM "ceiling" moves 3x between repeats),
so a ratio of two medians taken minutes apart can be off by 2x either way. This script builds the same
implementations with the harness's own factories and data, then runs them in turn, one step each, for
every step: whatever slows the host slows all of them alike, and the ratio of median step times is stable.
Peak memory is not measured here (one process); take it from the harness.

    HF_HUB_OFFLINE=1 /tmp/peervenv/bin/python benchmarks/bench_peers_interleaved.py \\
        --impls sparsify,saelens,ref_fused --dtype float32 --dead-frac 0.1 --steps 10
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEERBENCH = HERE.parent.parent / "shared" / "peerbench"
PLUGIN = f"llama_sae={HERE / 'peer_plugin.py'}:make_impl"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not (PEERBENCH / "bench_peers.py").exists():
        raise SystemExit(f"error: the peer harness is not at {PEERBENCH}: this script runs from a checkout beside "
                         "shared/peerbench")
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nIt takes the harness's options (all of them are passed to "
              "bench_peers.parse_args; --repeats, --out-md and --malloc are not used here):\n")
    sys.path.insert(0, str(PEERBENCH))
    import bench_peers as bp  # the harness: its argument parser, data and implementation factories

    a = bp.parse_args(["--extra", PLUGIN] + argv)
    missing = [name for name, module in (("sparsify", "sparsify"), ("saelens", "sae_lens"))
               if name in a.impls.split(",") and importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"error: --impls {','.join(missing)}: not installed here (pip install eai-sparsify / "
                         "sae-lens), or leave them out of --impls")
    torch.set_num_threads(a.threads)
    data = torch.load(bp.ensure_data(a), mmap=True, weights_only=True)
    if a.dtype != "float32":
        data = data.to(bp.torch_dtype(a.dtype)).contiguous()
    names = ["llama_sae"] + [n for n in a.impls.split(",") if n != "llama_sae"]
    impls = {n: bp.build_impl(n, a, data[0].float()) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(a.warmup + a.steps):
        x = data[i % a.n_batches]
        for n in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            impls[n].step(x)
            if i >= a.warmup:
                times[n].append(time.perf_counter() - t0)
    ours = statistics.median(times["llama_sae"])
    print(f"d_in={a.d_in} n_latents={a.n_latents} k={a.k} batch={a.batch} dtype={a.dtype} dead_frac={a.dead_frac} "
          f"threads={a.threads} steps={a.steps} (+{a.warmup} warm-up), interleaved")
    print("| impl | median step s | act/s | llama_sae speed-up |")
    print("|---|---:|---:|---:|")
    for n in names:
        med = statistics.median(times[n])
        print(f"| {n} | {med:.3f} | {a.batch / med:,.0f} | {med / ours:.2f}x |")


if __name__ == "__main__":
    main()
