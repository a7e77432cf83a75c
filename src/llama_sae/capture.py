"""The capture stage: run Llama over a corpus and write hook point activations into an activation store.

One process (CPU or one GPU):

    llama-sae capture --model PATH --corpus tinyworld:200000 --hook resid_post.3 --tokens 2M --out runs/acts

Data-parallel, one process per GPU (nccl), or several CPU processes (gloo); the result is one store:

    torchrun --nproc_per_node 4 -m llama_sae.cli capture --device cuda --model PATH --corpus SOURCE \\
        --hook resid_post.14 --tokens 700M --out runs/acts

Re-running the same command after a crash or ``kill -9`` continues where the capture stopped and ends with
exactly the rows an uninterrupted run writes.

How batches are made (all of it a deterministic function of the corpus, so resume and data parallelism are
exact):

- Batch ``b`` is the sentences with ids ``b·S .. (b+1)·S - 1``; S is fixed when the store is created, from
  the mean tokenized length of the first 1,000 sentences, so that a batch holds about ``batch_tokens``.
  Rank ``r`` of ``W`` captures the batches ``b ≡ r (mod W)``; ranks move in lockstep steps and exchange
  one integer per step (their batch's token count), so each knows where the ``--tokens`` budget ends.
- Each sentence is tokenized with BOS and truncated to ``context`` tokens. A batch is packed first-fit
  decreasing into rows of ``context`` tokens with a block-diagonal causal mask, RoPE positions restarting
  at 0 for every sentence: a packed sentence sees exactly what it would see alone, and the only padding is
  the unused tail of each row (a few percent), instead of padding every sentence to the longest one.
  When every row holds one sentence the mask is dropped (plain causal attention).
- BOS is fed (Llama expects it) but never stored; neither is padding. The optional outlier filter drops
  tokens whose norm at any captured hook exceeds ``outlier_factor`` times the batch's median norm.
- ``--tokens N`` counts tokens fed after BOS: the store holds the first N tokens of the corpus (the last
  sentence cut short) minus dropped outliers.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from llama_sae import __version__
from llama_sae.errors import UserError, check_device, short_hash
from llama_sae.fileio import atomic_write, atomic_write_json, lock_output, sweep_temp_files
from llama_sae.store import (
    FORMAT,
    GPU_WRITER_THREADS,
    MANIFEST,
    PROGRESS_DIR,
    STORE_DTYPES,
    VERSION,
    ActivationStore,
    StoreWriter,
    append_rows,
    background,
    finalize_store,
    merge_shard_stats,
    new_shard,
    read_manifest,
    read_progress,
    remove_progress,
    serialize_shard,
    verify_store,
)

__all__ = ["Batch", "CaptureConfig", "CaptureSummary", "Packed", "block_causal_mask", "capture", "capture_config",
           "forward_packed", "model_fingerprint", "outlier_keep", "pack", "parse_count", "plan_batches", "truncate"]

FINGERPRINT_SENTENCES = 1000  # the corpus fingerprint covers this many sentences
_SHARD_BYTES = 64 << 20  # default shard size
_SPLIT_RULE = "splitmix64(sentence_id) % 100 < val_percent"


class CaptureConfig(BaseModel):
    """Everything a capture needs; all of it but ``device``, ``progress`` and ``repair`` is recorded in the
    manifest and must match when a capture is resumed."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="checkpoint directory (Meta or Hugging Face format) with its tokenizer")
    corpus: str = Field(description="SOURCE string (see llama_sae.corpus)")
    hooks: list[str] = Field(description="hook points KIND.LAYER, captured in one pass")
    tokens: int = Field(gt=0, description="tokens to capture, BOS excluded (outliers dropped come out of these)")
    out: str = Field(description="store directory")
    context: int = Field(256, ge=2, description="tokens per packed row; longer sentences are truncated")
    batch_tokens: int = Field(8192, gt=0, description="tokens per forward pass (packed rows x context)")
    dtype: str | None = Field(None, description="model compute dtype; None = the checkpoint's")
    store_dtype: str = Field("bfloat16", description="activation dtype on disk: bfloat16, float16, float32")
    shard_rows: int | None = Field(None, gt=0, description="rows per shard; None = about 64 MiB per shard")
    outlier_factor: float | None = Field(None, gt=1, description="drop tokens with norm > factor x batch median")
    val_percent: int = Field(5, ge=0, le=100, description="share of sentences in the validation split")
    device: str = Field("cpu", description="cpu, cuda, cuda:1; under torchrun cuda means cuda:LOCAL_RANK")
    progress: bool = Field(True, description="show a progress bar (rank 0)")
    repair: bool = Field(False, description="finished store: recompute shards that fail verification")
    split_sentences: bool | None = Field(None, description="split records into sentences (True), keep them whole "
                                         "(False), or decide from the first records (None); the corpus fingerprint "
                                         "records the choice")


@dataclass
class CaptureSummary:
    """What a capture did (rank 0's view of the whole store)."""

    path: Path
    rows: int
    tokens: int
    outliers_dropped: int
    shards: int
    bytes: int
    seconds: float
    loop_seconds: float
    tokens_this_run: int
    resumed: bool
    repaired: list[str]

    @property
    def tokens_per_s(self) -> float:
        """Tokens read per second of the capture loop (model loading and store set-up excluded)."""
        return self.tokens_this_run / max(self.loop_seconds, 1e-9)

    def rows_table(self) -> list[tuple[str, str]]:
        """(key, value) rows for a summary table."""
        return [("store", str(self.path)), ("rows stored", f"{self.rows:,}"), ("tokens read", f"{self.tokens:,}"),
                ("outliers dropped", f"{self.outliers_dropped:,}"), ("shards", f"{self.shards:,}"),
                ("bytes", f"{self.bytes:,} ({self.bytes / max(self.rows, 1):,.1f} per row)"),
                ("this run", f"{self.tokens_this_run:,} tokens, {self.tokens_per_s:,.0f} tokens/s; "
                             f"{self.seconds:,.1f} s in all{', resumed' if self.resumed else ''}"),
                ("repaired", ", ".join(self.repaired) or "-")]


def capture_config(**options: Any) -> CaptureConfig:
    """``CaptureConfig(**options)`` with invalid values reported as a one-line UserError naming the option."""
    from pydantic import ValidationError

    try:
        return CaptureConfig(**options)
    except ValidationError as e:
        err = e.errors()[0]
        name = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
        raise UserError(f"{name}: {err['msg']} (got {err.get('input')!r})") from None


def parse_count(text: str | int, option: str = "") -> int:
    """``"700M"`` -> 700,000,000; also k, G and plain integers (``"2_000_000"``). ``option`` names the CLI option
    in the error."""
    if isinstance(text, int):
        return text
    s = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(s[-1:].lower(), 1)
    try:
        n = int(float(s[:-1]) * scale) if scale > 1 else int(s)
    except (ValueError, OverflowError):  # (infk)
        n = 0
    if not 0 < n < 2**63:
        raise UserError(f"{option + ': ' if option else ''}bad token count {text!r}: use a positive number such as "
                        "2000000, 500k or 700M")
    return n


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a checkpoint's config and tokenizer files and every byte of its weight files (names and
    sizes included). Reading the weights once costs seconds next to a capture's hours (sha256 ran at 0.74 GiB/s
    on a 2-core CPU: about 20 s for an 8B checkpoint), and anything less lets a fine-tune that changed a few
    tensors (a merged LoRA, an edited layer) resume a store of the original model and mix two models' activations."""
    path = Path(path)
    digest = hashlib.sha256()
    small = ["config.json", "params.json", "tokenizer.json", "tokenizer.model"]
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("consolidated.*.pth"))
    for name in small:
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    for file in weights:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with open(file, "rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Batches: planning, packing, forward


@dataclass
class Packed:
    """A batch packed into rows; stored tokens are listed in (sentence, position) order.

    Attributes:
        tokens, positions: [R, T] int64 model inputs (positions restart at 0 for each sentence).
        segments: [R, T] int32, the sentence slot of each cell, -1 for padding.
        mask: [R, 1, T, T] bool block-diagonal causal mask, or None when every row holds one sentence
            (plain causal attention is then exact). Built here, in the planning thread, not on the forward's path.
        gather: [n] flat indices into [R * T] of the stored tokens (BOS and padding excluded).
        sentence_id, position, token_id: [n] ids of the stored rows.
    """

    tokens: Tensor
    positions: Tensor
    segments: Tensor
    mask: Tensor | None
    gather: Tensor
    sentence_id: Tensor
    position: Tensor
    token_id: Tensor


def pack(sentences: list[tuple[int, list[int]]], context: int, pad_id: int) -> Packed:
    """Pack (sentence id, token ids with BOS) pairs into rows of at most ``context`` tokens, first-fit
    decreasing (ties by order, so the layout is deterministic)."""
    lengths = np.array([len(ids) for _, ids in sentences], dtype=np.int64)
    free = np.empty(0, dtype=np.int64)
    row, start = np.zeros(len(sentences), np.int64), np.zeros(len(sentences), np.int64)
    for i in sorted(range(len(sentences)), key=lambda i: (-lengths[i], i)):
        fits = np.flatnonzero(free >= lengths[i])
        r = int(fits[0]) if fits.size else len(free)
        if r == len(free):
            free = np.append(free, context)
        row[i], start[i] = r, context - free[r]
        free[r] -= lengths[i]
    R, T = len(free), int((context - free).max())
    tokens = np.full((R, T), pad_id, dtype=np.int64)
    positions = np.zeros((R, T), dtype=np.int64)
    segments = np.full((R, T), -1, dtype=np.int32)
    for i, (_, ids) in enumerate(sentences):
        cells = slice(start[i], start[i] + lengths[i])
        tokens[row[i], cells] = ids
        positions[row[i], cells] = np.arange(lengths[i])
        segments[row[i], cells] = i
    gather = np.concatenate([row[i] * T + start[i] + np.arange(1, lengths[i]) for i in range(len(sentences))])
    sid = np.repeat([s for s, _ in sentences], lengths - 1)
    position = np.concatenate([np.arange(1, n) for n in lengths])
    t = torch.from_numpy
    single = bool(((segments == segments[:, :1]) | (segments < 0)).all())
    mask = None if single else block_causal_mask(t(segments))
    return Packed(t(tokens), t(positions), t(segments), mask, t(gather), t(sid.astype(np.int64)),
                  t(position.astype(np.int32)), t(tokens.reshape(-1)[gather].astype(np.int32)))


@dataclass
class Batch:
    """Batch ``index``: its sentences as (id, token ids with BOS), and their packing."""

    index: int
    sentences: list[tuple[int, list[int]]]
    packed: Packed | None

    @property
    def fed(self) -> int:
        """Tokens after BOS, i.e. what counts towards ``--tokens``."""
        return sum(len(ids) - 1 for _, ids in self.sentences)


class _SentenceRanges:
    """Sentences of a corpus by id range, read once in order (ids are consecutive from 0)."""

    def __init__(self, sentences: Iterator):
        self.it, self.pending = sentences, None

    def take(self, lo: int, hi: int) -> list:
        out = []
        while True:
            s = self.pending if self.pending is not None else next(self.it, None)
            self.pending = None
            if s is None:
                return out
            if s.id >= hi:
                self.pending = s
                return out
            if s.id >= lo:
                out.append(s)


def plan_batches(corpus, tokenizer, S: int, context: int, max_tokens: int | None, first: int, world: int,
                 pack_from: int, pad_id: int) -> Iterator[Batch]:
    """Batches ``first, first + world, ...`` of a corpus: batch b is the sentences with ids b·S .. (b+1)·S - 1,
    tokenized with BOS, truncated to ``context`` tokens and packed (from batch ``pack_from`` on; earlier ones
    are only counted). Sentences over the source's own ``max_tokens`` are skipped, as ``Corpus`` would.
    After the corpus ends, the batches are empty."""
    ranges = _SentenceRanges(iter(corpus))
    enough = context if max_tokens is None else max(context, max_tokens + 2)  # tokens that decide the limits
    for b in count(first, world):
        sentences = []
        for s in ranges.take(b * S, (b + 1) * S):
            ids = tokenizer.encode_prefix(s.text, enough)
            if len(ids) < 2 or (max_tokens is not None and len(ids) - 1 > max_tokens):
                continue  # nothing to store, or over the source's own token limit (as Corpus filters)
            sentences.append((s.id, ids[:context]))
        packed = pack(sentences, context, pad_id) if sentences and b >= pack_from else None
        yield Batch(b, sentences, packed)


def truncate(sentences: list[tuple[int, list[int]]], allow: int) -> list[tuple[int, list[int]]]:
    """The sentences whose first ``allow`` tokens after BOS are kept (the last one cut short)."""
    out = []
    for sid, ids in sentences:
        if allow <= 0:
            break
        out.append((sid, ids[: allow + 1]))
        allow -= len(ids) - 1
    return out


@lru_cache(maxsize=8)
def _causal(T: int) -> Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril_()  # [T, T]


def block_causal_mask(segments: Tensor) -> Tensor:
    """segments [R, T] -> bool mask [R, 1, T, T]: attend to earlier cells of the same sentence."""
    same = segments[:, :, None] == segments[:, None, :]  # [R, T, T]
    return same.logical_and_(_causal(segments.shape[1]))[:, None]  # [R, 1, T, T]


@torch.inference_mode()
def forward_packed(model, packed: Packed, hooks: list[str], batch_tokens: int) -> dict[str, Tensor]:
    """Activations {hook: [n, d]} of a packed batch's stored tokens, in the model's dtype; the rows are
    split into forwards of about ``batch_tokens`` tokens."""
    device = model.device
    R, T = packed.tokens.shape
    chunks = math.ceil(R * T / batch_tokens)
    per = math.ceil(R / chunks)
    flat = {h: torch.empty(R * T, model.args.dim, dtype=model.dtype, device=device) for h in hooks}
    for lo in range(0, R, per):
        hi = min(R, lo + per)
        mask = None if packed.mask is None else packed.mask[lo:hi].to(device)
        acts = model.capture(packed.tokens[lo:hi].to(device), hooks, positions=packed.positions[lo:hi].to(device),
                             mask=mask)
        for h in hooks:
            flat[h][lo * T:hi * T] = acts[h].reshape(-1, model.args.dim)  # [rows * T, d]
    gather = packed.gather.to(device)
    return {h: flat[h].index_select(0, gather) for h in hooks}  # [n, d]


def outlier_keep(acts: dict[str, Tensor], factor: float | None) -> Tensor | None:
    """Bool [n]: tokens whose norm is at most ``factor`` x the batch median at every hook (None = keep all)."""
    if factor is None:
        return None
    keep = None
    for x in acts.values():
        norms = x.float().norm(dim=1)  # [n]
        ok = norms <= factor * norms.median()
        keep = ok if keep is None else keep & ok
    return keep


# ---------------------------------------------------------------------------------------------------
# Processes


class _Dist:
    """Rank, world size and the two collectives capture needs; a no-op without torchrun."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(check_device(device))
        self.owned = False
        if self.device.type == "cuda" and (self.world > 1 or self.device.index is None):  # torchrun: this rank's GPU
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # (set_device refuses a device without an index)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.owned = True

    def gather(self, n: int) -> list[int]:
        """Every rank's ``n``, by rank."""
        if self.world == 1:
            return [n]
        import torch.distributed as dist

        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        out = torch.zeros(self.world, dtype=torch.int64, device=dev)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.13)
        gather(out, torch.tensor([n], dtype=torch.int64, device=dev))
        return out.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Progress:
    """A rich progress bar on rank 0 with tokens/s and ETA (or nothing)."""

    def __init__(self, enabled: bool, total: int, done: int, console=None):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("capture"), BarColumn(), TaskProgressColumn(),
                                TextColumn("{task.completed:,}/{task.total:,} tokens  {task.fields[rate]:,.0f} tok/s"),
                                TimeRemainingColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task("capture", total=total, completed=done, rate=0.0)
        self.t0, self.done0 = time.perf_counter(), done

    def update(self, done: int) -> None:
        if self.bar is not None:
            rate = (done - self.done0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=done, rate=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------------
# The stage


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    from llama_sae.llama.checkpoint import resolve_dtype

    resolved = resolve_dtype(dtype)
    return None if resolved is None else str(resolved).removeprefix("torch.")


def _check_hooks(hooks: list[str], n_layers: int) -> list[str]:
    from llama_sae.llama.model import parse_hook_name

    if not hooks:
        raise UserError("no hook point given: pass --hook KIND.LAYER, e.g. --hook resid_post.0")
    for h in hooks:
        parse_hook_name(h, n_layers)
    return list(dict.fromkeys(hooks))


def _settings(cfg: CaptureConfig, hooks: list[str], d: int, fingerprint: str, corpus, tokenizer, world: int
              ) -> dict[str, Any]:
    """The manifest's description of the capture (everything a resume must agree with is compared)."""
    if cfg.store_dtype not in STORE_DTYPES:
        raise UserError(f"store dtype {cfg.store_dtype!r} is not supported: use {', '.join(STORE_DTYPES)}")
    row_bytes = d * len(hooks) * STORE_DTYPES[cfg.store_dtype].itemsize + 16
    return {
        "model": {"path": str(Path(cfg.model).resolve()), "fingerprint": fingerprint},
        "hooks": hooks, "d": d, "dtype": cfg.store_dtype,
        "corpus": {"source": str(corpus.spec), "fingerprint": corpus.fingerprint(FINGERPRINT_SENTENCES),
                   "fingerprint_sentences": FINGERPRINT_SENTENCES, "max_tokens": corpus.spec.max_tokens},
        "capture": {"tokens": cfg.tokens, "context": cfg.context, "batch_tokens": cfg.batch_tokens,
                    "model_dtype": _dtype_name(cfg.dtype) or "checkpoint",
                    "shard_rows": cfg.shard_rows or max(1024, _SHARD_BYTES // row_bytes // 1024 * 1024),
                    "outlier_factor": cfg.outlier_factor, "world_size": world,
                    "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id},
        "split": {"val_percent": cfg.val_percent, "rule": _SPLIT_RULE},
    }


_COMPARED = [("model", "fingerprint", "model"), ("hooks", None, "hooks"), ("dtype", None, "--store-dtype"),
             ("corpus", "source", "--corpus"), ("corpus", "fingerprint", "corpus text"),
             ("capture", "tokens", "--tokens"), ("capture", "context", "--context"),
             ("capture", "batch_tokens", "--batch-tokens"), ("capture", "model_dtype", "--dtype"),
             ("capture", "shard_rows", "--shard-rows"), ("capture", "outlier_factor", "--outlier-factor"),
             ("capture", "world_size", "number of processes"), ("split", "val_percent", "--val-percent")]


def _check_same(manifest: dict[str, Any], settings: dict[str, Any], out: Path, repair: bool = False) -> None:
    """Refuse to resume a store made with other settings (another model, hook, corpus, ...). A repair runs in one
    process whatever the capture ran in (it replays each shard's batches with the store's own process count)."""
    diffs = []
    for section, key, label in _COMPARED:
        if repair and key == "world_size":
            continue
        have = manifest[section] if key is None else manifest[section].get(key)
        want = settings[section] if key is None else settings[section].get(key)
        if have != want:
            diffs.append(f"{label}: store {short_hash(have)}, now {short_hash(want)}")
    if diffs:
        raise UserError(f"store {out} was captured with other settings ({'; '.join(diffs)}): pass the same options "
                        "to resume it, or choose a new --out directory")


def _open_store(cfg: CaptureConfig, settings: dict[str, Any], corpus, tokenizer, dist: _Dist) -> dict[str, Any]:
    """Create the store's manifest (rank 0) or check the existing one against this command (every rank). Temp
    files a killed write left at the top of the store are removed first (rank 0)."""
    out = Path(cfg.out)
    if dist.rank == 0:
        sweep_temp_files(out)  # the other ranks read nothing before the barrier below
        _forget_an_empty_start(out, settings)
    if dist.rank == 0 and not (out / MANIFEST).exists():
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty and holds no {MANIFEST}: choose a new --out directory")
        out.mkdir(parents=True, exist_ok=True)
        S = _sentences_per_batch(corpus, tokenizer, cfg.context, cfg.batch_tokens)
        manifest = {"format": FORMAT, "version": VERSION, "status": "capturing", "llama_sae": __version__,
                    **settings}
        manifest["capture"]["sentences_per_batch"] = S
        atomic_write_json(out / MANIFEST, manifest)
    dist.barrier()
    manifest = read_manifest(out)
    _check_same(manifest, settings, out, repair=cfg.repair and manifest["status"] == "complete")
    return manifest


def _forget_an_empty_start(out: Path, settings: dict[str, Any]) -> None:
    """Remove the manifest of a capture that stopped before committing anything (e.g. its model failed to load)
    when this command's settings differ: there is nothing to resume, and the fixed command starts afresh."""
    if not (out / MANIFEST).is_file() or any(out.glob("*.safetensors")):
        return
    progress = out / PROGRESS_DIR
    if progress.is_dir() and any(p.stat().st_size for p in progress.iterdir()):
        return
    try:
        manifest = read_manifest(out)
    except UserError:  # not a store's manifest (or another version's): not ours to remove
        return
    if manifest.get("status") != "capturing":
        return
    try:
        _check_same(manifest, settings, out)
    except UserError:
        (out / MANIFEST).unlink()
        if progress.is_dir():
            for p in progress.iterdir():
                p.unlink()
            progress.rmdir()


def _sentences_per_batch(corpus, tokenizer, context: int, batch_tokens: int) -> int:
    """S such that a batch of S sentences holds about ``batch_tokens`` tokens (from the first 1,000)."""
    lengths = [len(tokenizer.encode_prefix(s.text, context)) for s in corpus.take(1000)]
    if not lengths:
        raise UserError(f"corpus {corpus.spec} has no sentences: check the source")
    return max(1, round(batch_tokens / (sum(lengths) / len(lengths))))


def _cursor(progress: dict[str, Any] | None, rank: int) -> dict[str, Any]:
    """Where a rank resumes: batch, rows of it already committed (skip), its row count if known, and the
    tokens of all ranks before its step (fed_before)."""
    if progress is None or progress["cursor"] is None:
        return {"batch": rank, "skip": 0, "rows": None, "fed_before": 0}
    return progress["cursor"]


class _Capturer:
    """The per-batch work shared by capture and repair: forward, gather, outlier filter."""

    def __init__(self, cfg: CaptureConfig, manifest: dict[str, Any], model, tokenizer, corpus):
        self.cfg, self.manifest, self.model, self.tokenizer, self.corpus = cfg, manifest, model, tokenizer, corpus
        c = manifest["capture"]
        self.hooks, self.S, self.world = manifest["hooks"], c["sentences_per_batch"], c["world_size"]
        self.dtype = STORE_DTYPES[manifest["dtype"]]

    def plan(self, first: int, pack_from: int) -> Iterator[Batch]:
        """This rank's batches from ``first`` on, prepared in a background thread."""
        c, max_tokens = self.manifest["capture"], self.manifest["corpus"]["max_tokens"]
        return background(plan_batches(self.corpus, self.tokenizer, self.S, c["context"], max_tokens, first,
                                       self.world, pack_from, c["pad_id"]))

    def rows(self, batch: Batch, allow: int) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """A batch's stored rows: acts {hook: [n, d]} and sentence_id, position, token_id [n]."""
        packed = batch.packed
        if allow < batch.fed:
            packed = pack(truncate(batch.sentences, allow), self.manifest["capture"]["context"],
                          self.manifest["capture"]["pad_id"])
        acts = forward_packed(self.model, packed, self.hooks, self.manifest["capture"]["batch_tokens"])
        keep = outlier_keep(acts, self.manifest["capture"]["outlier_factor"])
        sid, pos, tok = packed.sentence_id, packed.position, packed.token_id
        if keep is not None:
            acts = {h: x[keep] for h, x in acts.items()}
            keep = keep.cpu()
            sid, pos, tok = sid[keep], pos[keep], tok[keep]
        return acts, sid, pos, tok


def capture(cfg: CaptureConfig, *, console=None) -> CaptureSummary:
    """Capture ``cfg.hooks`` over ``cfg.tokens`` tokens of ``cfg.corpus`` into the store ``cfg.out``.

    Under torchrun every rank calls this; rank 0 merges the ranks' shards into one manifest at the end.
    Re-running the same configuration resumes an interrupted capture; on a finished store it does nothing
    unless ``repair`` is set, which recomputes shards that fail verification.

    Returns:
        A summary (rank 0's view of the whole store; other ranks get their share's counts).

    Raises:
        UserError: a bad hook name, model, corpus or store directory, settings that differ from the
            store's, or a full disk (committed shards are kept; re-run to resume).
    """
    from llama_sae.corpus import Corpus
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.llama.checkpoint import read_args

    t0 = time.perf_counter()
    _, args = read_args(cfg.model)
    hooks = _check_hooks(cfg.hooks, args.n_layers)
    if cfg.context > args.max_seq_len:  # positions past it were never trained (and RoPE scaling assumes less)
        raise UserError(f"--context {cfg.context:,} is longer than the model's {args.max_seq_len:,} positions: pass "
                        f"--context {args.max_seq_len} or less")
    tokenizer = load_tokenizer(cfg.model)
    corpus = Corpus(cfg.corpus, split_sentences=cfg.split_sentences)
    dist = _Dist(cfg.device)
    lock = None
    try:
        if dist.rank == 0:  # two captures into one store would list every shard twice (and verify it)
            lock = lock_output(cfg.out, f"the store {cfg.out}")
        settings = _settings(cfg, hooks, args.dim, model_fingerprint(cfg.model), corpus, tokenizer, dist.world)
        manifest = _open_store(cfg, settings, corpus, tokenizer, dist)
        if manifest["status"] == "complete" and not cfg.repair:
            ActivationStore(cfg.out)  # every listed shard there at its size, else one line naming --repair
            if dist.rank == 0:  # journals a kill left between the manifest's write and their removal
                remove_progress(cfg.out, manifest["capture"]["world_size"])
            return _summary(Path(cfg.out), manifest, t0, 0, resumed=True)
        model = load_model(cfg.model, dtype=cfg.dtype, device=dist.device)
        _warm_up(dist.device)  # before the planner and writer threads start
        capturer = _Capturer(cfg, manifest, model, tokenizer, corpus)
        if manifest["status"] == "complete":
            if dist.world > 1:
                raise UserError("--repair runs in one process: start it without torchrun")
            return _repair(capturer, Path(cfg.out), t0, console)
        return _run(capturer, dist, t0, console)
    finally:
        if lock is not None:
            lock.release()
        dist.close()


def _warm_up(device: torch.device) -> None:
    """One small float32 matrix product on this thread before any other thread makes its first torch call.

    Fresh processes sometimes computed their first batch one rounding step off when its first GEMM ran while the
    batch planner thread made its first torch calls (3 threads on 2 busy cores: 6 of 259 fresh runs of a small
    capture), so a resumed store could differ from an uninterrupted one in a few values; with this product first,
    0 of 190 (2026-11-29, scratch scripts; the cause inside MKL's start-up is inferred, not proven).
    """
    if device.type == "cpu":
        (torch.ones(640, 64) @ torch.ones(64, 64)).sum().item()


def _resume_point(out: Path, world: int, rank: int) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(the cursor of the rank furthest behind, this rank's cursor, whether anything was committed before).

    Every rank restarts at the step of the rank furthest behind, so that the lockstep token counts can be
    exchanged again; batches a rank has already committed are then only counted, not run.
    """
    progress = [read_progress(out, q) for q in range(world)]
    cursors = [_cursor(p, q) for q, p in enumerate(progress)]
    lead = min(cursors, key=lambda c: c["batch"] // world)
    return lead, cursors[rank], any(p is not None for p in progress)


def _run(cap: _Capturer, dist: _Dist, t0: float, console) -> CaptureSummary:
    """The lockstep loop of one rank; rank 0 merges the store at the end."""
    out, W, r, N = Path(cap.cfg.out), dist.world, dist.rank, cap.manifest["capture"]["tokens"]
    lead, mine, resumed = _resume_point(out, W, r)
    for q in range(W):  # a resume counts every committed shard: one lost since (deleted, moved) ends it here
        for entry in (read_progress(out, q) or {}).get("shards", []):
            file = out / entry["name"]
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                raise UserError(f"shard {entry['name']} of the unfinished store {out} is missing or of the wrong "
                                "size: restore it from a copy, or capture again into a new --out")
    step0, fed = lead["batch"] // W, lead["fed_before"]
    writer = StoreWriter(out, cap.hooks, cap.manifest["d"], rank=r, shard_rows=cap.manifest["capture"]["shard_rows"],
                         dtype=cap.dtype, val_percent=cap.manifest["split"]["val_percent"],
                         workers=GPU_WRITER_THREADS if dist.device.type == "cuda" else 1)
    plan = cap.plan(step0 * W + r, pack_from=mine["batch"])
    bar = _Progress(cap.cfg.progress and r == 0, N, fed, console)
    fed0, final, t_loop = fed, lead.get("final"), time.perf_counter()
    try:
        for step in count(step0):
            batch = next(plan)
            counts = dist.gather(batch.fed)
            allow = [min(max(N - fed - sum(counts[:q]), 0), counts[q]) for q in range(W)]
            fed_before, fed = fed, min(N, fed + sum(counts))
            if any(allow):
                final = {"step": step, "allow": allow}
            b = batch.index
            todo = b > mine["batch"] or (b == mine["batch"] and (mine["rows"] is None or mine["skip"] < mine["rows"]))
            if allow[r] > 0 and todo:
                acts, sid, pos, tok = cap.rows(batch, allow[r])
                skip = mine["skip"] if b == mine["batch"] else 0
                tag = {"batch": b, "skip": skip, "rows": int(sid.shape[0]), "fed_before": fed_before}
                writer.add({h: x[skip:] for h, x in acts.items()}, sid[skip:], pos[skip:], tok[skip:], tag)
            bar.update(fed)
            if fed >= N or sum(counts) == 0:
                break
        progress = writer.finish({"batch": (step + 1) * W + r, "skip": 0, "rows": None, "fed_before": fed,
                                  "final": final})
    except BaseException:
        writer.abort()
        raise
    finally:
        plan.close()
        bar.close()
    loop_seconds = time.perf_counter() - t_loop
    dist.barrier()
    if r != 0:
        rows = sum(e["rows"] for e in progress["shards"])
        return CaptureSummary(out, rows, fed, 0, len(progress["shards"]), sum(e["bytes"] for e in progress["shards"]),
                              time.perf_counter() - t0, loop_seconds, fed - fed0, resumed, [])
    manifest = finalize_store(out, tokens=fed, final=final)
    if fed < N and console is not None:
        console.print(f"[yellow]the corpus ended after {fed:,} of {N:,} tokens[/yellow]")
    return _summary(out, manifest, t0, fed - fed0, resumed=resumed, loop_seconds=loop_seconds)


def _summary(out: Path, manifest: dict[str, Any], t0: float, this_run: int, *, resumed: bool,
             repaired: list[str] | None = None, loop_seconds: float = 0.0) -> CaptureSummary:
    return CaptureSummary(out, manifest["rows"], manifest["tokens"], manifest["outliers_dropped"],
                          len(manifest["shards"]), manifest["bytes"], time.perf_counter() - t0, loop_seconds, this_run,
                          resumed, repaired or [])


# ---------------------------------------------------------------------------------------------------
# Repair


def _repair(cap: _Capturer, out: Path, t0: float, console) -> CaptureSummary:
    """Recompute the shards of a finished store that fail verification, then re-merge its statistics."""
    report = verify_store(out)
    if report.mismatched:  # recomputing would cut or pad the data to fit the edited manifest
        raise UserError(f"{report.problems[report.bad.index(report.mismatched[0])]} (--repair recomputes damaged "
                        "shards, not an edited manifest)")
    manifest = cap.manifest
    entries = {e["name"]: e for e in manifest["shards"]}
    repaired = []
    for name in report.bad:
        entry = entries[name]
        data, new = _recompute(cap, entry)
        atomic_write(out / name, data)
        if new["sha256"] != entry["sha256"] and console is not None:
            console.print(f"[yellow]{name}: recomputed rows differ in their last bits from the original (other "
                          "hardware or library versions?); the manifest now lists the new checksum[/yellow]")
        entries[name].update(new)
        repaired.append(name)
    if repaired:
        stats = merge_shard_stats(out, manifest["shards"], manifest["hooks"], manifest["d"])
        manifest["stats"] = {h: s.summary() for h, s in stats.items()}
        manifest["bytes"] = sum(e["bytes"] for e in manifest["shards"])
        atomic_write_json(out / MANIFEST, manifest)
    return _summary(out, manifest, t0, 0, resumed=True, repaired=repaired)


def _recompute(cap: _Capturer, entry: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Run the batches of one shard again, from its start cursor, and serialize it."""
    start, W, final = entry["start"], cap.world, cap.manifest["final"]
    shard = new_shard(entry["index"], cap.hooks, cap.manifest["d"])
    plan = cap.plan(start["batch"], pack_from=start["batch"])
    try:
        while shard.rows < entry["rows"]:
            batch = next(plan)
            step = batch.index // W
            allow = batch.fed if step < final["step"] else final["allow"][entry["rank"]] if step == final["step"] else 0
            if allow == 0:
                raise UserError(f"cannot recompute {entry['name']}: the corpus no longer gives its rows; "
                                "capture the store again")
            acts, sid, pos, tok = cap.rows(batch, allow)
            skip = start["skip"] if batch.index == start["batch"] else 0
            take = min(sid.shape[0] - skip, entry["rows"] - shard.rows)
            tag = {"batch": batch.index, "skip": skip, "rows": int(sid.shape[0]), "fed_before": None}
            append_rows(shard, {h: x[skip:] for h, x in acts.items()}, sid[skip:], pos[skip:], tok[skip:], tag, 0,
                        take, cap.dtype)
    finally:
        plan.close()
    shard.start = entry["start"]
    return serialize_shard(shard, cap.hooks, entry["rank"], cap.manifest["split"]["val_percent"])
