"""Helpers shared by the benchmark scripts: machine info, timing, and a random transformers Llama.

Not a benchmark itself. The scripts import it as ``_common`` (their own folder is on sys.path when
they are run as ``python benchmarks/bench_*.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int, dtype: str | None = None) -> dict:
    """What a reader needs to compare a number with another run's."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if dtype is not None:
        info["dtype"] = dtype
    return info


def sync(device: str | torch.device) -> None:
    """Wait until ``device`` has finished its queued work (a no-op on the CPU), so that a host clock around a
    call times the device's work too."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], object], device: str | torch.device) -> Callable[[], object]:
    """``fn`` followed by :func:`sync` of ``device``."""
    def run():
        out = fn()
        sync(device)
        return out
    return run


def print_machine(info: dict) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    """(seconds, result) of one call; ``clock=time.process_time`` counts this process's CPU time instead of wall
    time (steadier on a shared machine, for single-threaded runs)."""
    t0 = clock()
    out = fn()
    return clock() - t0, out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter
                ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, object]]:
    """Time every fn ``repeats`` times, round-robin (order reversed every other round) so that drift
    in machine load hits all of them alike. Returns (median seconds, all times, last result) per name.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, object] = {}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            t, last[n] = timed(fns[n], clock)
            times[n].append(t)
    return {n: statistics.median(ts) for n, ts in times.items()}, times, last


def build_hf_llama(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                   tied: bool = True, rope_factor: float = 32.0, seed: int = 0, init_range: float = 0.02):
    """A random transformers ``LlamaForCausalLM`` (fp32, eval mode) with Llama 3 RoPE scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        initializer_range=init_range, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def quiet_transformers() -> None:
    """Silence transformers' generation-config and progress-bar chatter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain aligned table on stdout."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_json(result: dict) -> None:
    """The machine-readable result: one JSON line, last on stdout."""
    print(json.dumps(result, sort_keys=False))


def usable_device(device: str) -> str:
    """``device`` if this torch can run on it, else exit with llama-sae's one-line reason (no traceback)."""
    from llama_sae.errors import UserError, check_device

    try:
        check_device(str(device))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    return device
