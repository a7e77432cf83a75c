"""Store writer throughput with 1, 2 and 3 writer threads: bf16 rows handed to ``StoreWriter.add``, cut into
shards, serialized, hashed, written and committed.

On an H200 a capture at d_model 3,072 ran 7x slower than its forward, and its single writer thread (15 µs a token
for serialize + sha256 + write, measured alone) was the limit (BENCHMARKS.md, GPU). Capture now writes with
``GPU_WRITER_THREADS`` threads when the rows come from a GPU. This times the writer alone, interleaved, each run
into a fresh directory, and checks that every worker count writes byte-identical shards. A GPU capture computes
each piece's float64 statistics on the GPU; here (no GPU) they are computed once up front and reused, so the
writer does what it does in a GPU capture (``--cpu-stats``: the CPU capture's writer, statistics included).

    python benchmarks/bench_store_writer.py                       # d 3072, 16 shards of 4,096 rows
    python benchmarks/bench_store_writer.py --d 256 --shards 32
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import interleaved, machine_info, print_json, print_machine, print_table

from llama_sae.store import StoreWriter, read_progress


def main(argv=None) -> dict:
    """Write the same rows with each thread count, interleaved; print the table; the result dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=3072)
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--workers", default="1,2,3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-stats", action="store_true", help="the writer computes the statistics (a CPU capture)")
    a = p.parse_args(argv)
    if any(int(w) < 1 for w in a.workers.split(",")) or a.shard_rows < 1 or a.shards < 1:
        raise SystemExit("error: --workers, --shard-rows and --shards must be 1 or more")
    g = torch.Generator().manual_seed(0)
    n = a.shard_rows * a.shards
    acts = (torch.randn(n, a.d, generator=g) * 2).bfloat16()
    sid = torch.arange(n) // 20
    pos = torch.arange(n) % 20 + 1
    if not a.cpu_stats:  # the statistics of a piece: computed on the GPU in a GPU capture, here once up front
        from llama_sae.store import ActStats

        stats = ActStats.of(acts[:8192])
        ActStats.of = classmethod(lambda cls, x: stats)
    root = Path(tempfile.mkdtemp(prefix="bench_store_writer_"))
    hashes = {}

    def run(workers: int):
        def go():
            out = root / f"w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            writer = StoreWriter(out, ["resid_post.0"], a.d, shard_rows=a.shard_rows, workers=workers)
            for lo in range(0, n, 8192):  # capture's pieces: one batch of rows at a time
                hi = min(n, lo + 8192)
                writer.add({"resid_post.0": acts[lo:hi]}, sid[lo:hi], pos[lo:hi], sid[lo:hi] % 7,
                           {"batch": lo, "skip": 0})
            writer.finish({"batch": n, "skip": 0})
            hashes[workers] = [e["sha256"] for e in read_progress(out, 0)["shards"]]
        return go

    try:
        med, _, _ = interleaved({w: run(int(w)) for w in a.workers.split(",")}, a.repeats, warmup=0,
                                clock=time.perf_counter)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert all(h == hashes[int(a.workers.split(",")[0])] for h in hashes.values()), "shards differ"
    mib = n * a.d * 2 / 2 ** 20
    info = machine_info(torch.get_num_threads())
    print_machine(info)
    print(f"{a.shards} shards of {a.shard_rows} rows x d {a.d} (bf16, {mib:,.0f} MiB); statistics "
          f"{'in the writer (CPU capture)' if a.cpu_stats else 'up front (GPU capture)'}; wall time, median of "
          f"{a.repeats} interleaved runs; shards byte-identical across worker counts")
    base = med[a.workers.split(",")[0]]
    print_table(["writer threads", "s", "tokens/s", "MiB/s", "x 1 thread"],
                [[w, f"{t:.2f}", f"{n / t:,.0f}", f"{mib / t:,.0f}", f"{base / t:.2f}"] for w, t in med.items()])
    result = {"benchmark": "store_writer", "machine": info, "args": vars(a),
              "seconds": {w: round(t, 3) for w, t in med.items()}}
    print_json(result)
    return result


if __name__ == "__main__":
    main()
