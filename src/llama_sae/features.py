"""Top-activating sentences and per-latent statistics: the *features artifact*.

    path = build_features(model, tok, sae, "tinyworld:20000:heldout", Path("runs/features"), sentences=20000)
    f = load_features(path)
    f.examples(123, "max")        # top sentences by the max over their tokens, per-token activations included
    f.frequency[123], f.typical_max[123], f.histogram(123)

How it is built (``build_features``):

1. One streaming pass over the corpus. Each batch runs the model up to the SAE's hook point
   (``model.capture``, which stops early), encodes every token with ``sae.encode_topk`` and turns the
   sparse (token, latent, value) triples into per-(sentence, latent) aggregates: the max, the mean over
   the sentence's tokens (BOS excluded) and the value at the last token. Running tables keep, for every
   latent, the top N sentences under each aggregation, a uniform reservoir of activating sentences (for
   the quantile samples), firing counts and a log-binned histogram of its nonzero activations. Every
   table is O(d_sae); nothing of size batch × d_sae is ever allocated, and the state is checkpointed
   (atomically) so a killed build resumes where it stopped.
2. A second, short pass over only the selected sentences (top N, reservoirs, a random pool) records the
   per-token activations each example needs for highlighting.

The random draws (reservoir, pool) come from a hash of (sentence index, latent, seed), so the artifact
does not depend on the batch size or on where a build was interrupted, with a float32 model. A bf16 model's
activations move by bf16 rounding with the batch a sentence is padded into (the GEMMs' blocking follows the
batch's shape), so there only a resume at the same batch size is identical.

On disk (one directory, every file written atomically): ``features.json`` (meta: SAE fingerprint, corpus
source, ``text_sha256`` chained over the sentences read, counts, settings) and ``features.safetensors``
(columnar: per-latent statistics, the examples table sorted by latent with CSR offsets, sentence texts and
token pieces as UTF-8 blobs with offsets). ``llama-sae explain`` and ``llama-sae score`` add
``explanations.jsonl`` and ``scores.jsonl`` beside them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from llama_sae.errors import UserError, check_output_dir
from llama_sae.fileio import atomic_write, atomic_write_json, lock_output, read_jsonl, sweep_temp_files

META_FILE = "features.json"
TENSORS_FILE = "features.safetensors"
PARTIAL_DIR = ".features-partial"
STATE_FILE = "tables.safetensors"  # in PARTIAL_DIR: the running tables and their text hash, one atomic file
EXPLANATIONS_FILE = "explanations.jsonl"
SCORES_FILE = "scores.jsonl"
AGGREGATIONS = ("max", "mean", "last")
KINDS = (*AGGREGATIONS, "quantile", "random")
HIST_EDGES = torch.logspace(-3, 4, 57)  # 56 log bins, 8 per decade, 1e-3 .. 1e4 (values outside are clipped)
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True)
class Example:
    """One sentence shown for a latent: ``acts`` is this latent's activation on each of ``tokens``
    (BOS excluded); ``activation`` is the sentence's aggregate under ``kind`` (max for quantile samples,
    0 for random ones); ``quantile`` is the sample's quantile bin (0 = lowest) for kind "quantile"."""

    text: str
    tokens: list[str]
    acts: list[float]
    activation: float
    quantile: int | None
    kind: str
    sentence: int  # index of the sentence in the corpus stream


@dataclass(frozen=True)
class Explanation:
    """An explanation of a latent and its scores (balanced accuracies; None when not scored)."""

    text: str
    certainty: float | None = None
    detection: float | None = None
    fuzzing: float | None = None
    backend: str | None = None


def sae_fingerprint(sae) -> str:
    """sha256 hex (first 16 digits) of the SAE's config and weights: names exactly which SAE was used.

    Kept on the SAE until its weights change (:meth:`SAE.weights_key`, as :meth:`SAE.encoder_matrix` is): at
    Llama scale the weights are 2 GiB, and the UI fingerprints its SAE for every reply's record.
    """
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    key = (sae.cfg, sae.weights_key(names))  # a change through .data too
    cached = sae.__dict__.get("_fingerprint")
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256(json.dumps(sae.cfg.model_dump(), sort_keys=True).encode())
    for name in names:
        t = getattr(sae, name).detach().float().cpu().contiguous()
        digest.update(t.numpy())  # the array's buffer itself: no copy of the bytes
    sae.__dict__["_fingerprint"] = (key, digest.hexdigest()[:16])
    return sae.__dict__["_fingerprint"][1]


# ---------------------------------------------------------------------------------------------------
# Streaming helpers


def hash01(a: Tensor, b: Tensor | int, seed: int) -> Tensor:
    """A uniform [0, 1) float64 per element, a fixed function of (a, b, seed) (batch-independent draws)."""
    x = (a.long() * 0x9E3779B1 + torch.as_tensor(b).long() * 0x85EBCA77 + seed * 0xC2B2AE3D + 1) & 0xFFFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (x ^ (x >> 16)).double() / 2**32


def merge_top_(score: Tensor, payload: list[Tensor], rows: Tensor, new_score: Tensor, new_payload: list[Tensor]
               ) -> None:
    """Keep, per row, the N entries with the highest score: score [R, N] (sorted best first, empty slots −inf)
    and each payload [R, N] are updated in place with candidates (rows [P], new_score [P], new_payload [P] each).

    Ties keep the older entry first, then candidates in their given order (deterministic). Only the P
    candidates are sorted: each row's merged order follows from counting, for every candidate, the old
    entries that stay ahead of it, and for every old entry, the candidates that overtake it (O(P·N + U·N)
    for U touched rows, not a sort of their U·N old entries).
    """
    keep = new_score.to(score.dtype) > score[rows, -1]  # a candidate not above a row's N-th best cannot enter
    rows, new_score, new_payload = rows[keep], new_score[keep].to(score.dtype), [q[keep] for q in new_payload]
    if rows.numel() == 0:
        return
    N = score.shape[1]
    order = torch.argsort(new_score, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # grouped by row, best first, ties in given order
    rows, new_score, new_payload = rows[order], new_score[order], [q[order] for q in new_payload]
    touched, u, counts = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)  # [U], [P], [U]
    old = score[touched]  # [U, N]
    ahead = (old[u] >= new_score[:, None]).sum(1)  # [P] old entries that stay ahead of each candidate
    cand_pos = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[u] + ahead  # [P] merged position
    overtaken = torch.zeros(len(touched), N + 1, dtype=torch.long).index_put_(
        (u, ahead), torch.ones_like(u), accumulate=True).cumsum_(1)[:, :N]  # [U, N] candidates above old entry i
    width = N + 1  # one more column takes whatever falls out of the top N
    base = torch.arange(len(touched))[:, None] * width  # [U, 1]
    old_dest = (base + (torch.arange(N) + overtaken).clamp_max_(N)).view(-1)  # [U·N] merged slot of each old entry
    cand_dest = base[u, 0] + cand_pos.clamp_max_(N)  # [P]
    for table, new in zip([score, *payload], [new_score, *new_payload]):
        merged = table.new_empty(len(touched), width)  # every slot of the first N is written below
        merged.view(-1).index_copy_(0, old_dest, table[touched].view(-1))
        merged.view(-1).index_copy_(0, cand_dest, new.to(table.dtype))
        table[touched] = merged[:, :N]


def _sentence_aggregates(vals: Tensor, idx: Tensor, owner: Tensor, last_row: Tensor, n_tok: Tensor, d_sae: int
                         ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Sparse per-(sentence, latent) aggregates of one batch.

    vals, idx [M, k]: the active latents of M token rows; owner [M]: each row's sentence (batch-local);
    last_row [M] bool: the row is its sentence's last token; n_tok [B]: tokens per sentence.
    Returns {aggregation: (sentence [P], latent [P], value [P])}, only nonzero values.
    """
    fire = vals > 0  # [M, k]
    s = owner[:, None].expand_as(idx)[fire]
    lat, v = idx[fire], vals[fire]
    key = s * d_sae + lat
    pairs, inv = torch.unique(key, return_inverse=True)  # [P]
    vmax = torch.zeros(len(pairs)).scatter_reduce_(0, inv, v, "amax", include_self=False)
    vsum = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, inv, v.double())
    ps, pl = pairs // d_sae, pairs % d_sae
    last = last_row[:, None].expand_as(idx) & fire
    ls = owner[:, None].expand_as(idx)[last]
    return {"max": (ps, pl, vmax), "mean": (ps, pl, (vsum / n_tok[ps]).float()),
            "last": (ls, idx[last], vals[last])}


class _State:
    """The running tables of pass 1 (all O(d_sae)); saved and restored for resuming."""

    def __init__(self, d_sae: int, top_n: int, reservoir: int, pool: int):
        neg = float("-inf")
        self.t: dict[str, Tensor] = {
            "top_score": torch.full((3, d_sae, top_n), neg), "top_id": torch.full((3, d_sae, top_n), -1),
            "res_key": torch.full((d_sae, reservoir), neg, dtype=torch.float64),
            "res_id": torch.full((d_sae, reservoir), -1), "res_act": torch.zeros(d_sae, reservoir),
            "pool_key": torch.full((1, pool), neg, dtype=torch.float64), "pool_id": torch.full((1, pool), -1),
            "fires": torch.zeros(d_sae, dtype=torch.int64), "sent_fires": torch.zeros(d_sae, dtype=torch.int64),
            "act_sum": torch.zeros(d_sae, dtype=torch.float64),
            "hist": torch.zeros(d_sae, len(HIST_EDGES) - 1, dtype=torch.int32),
            "counts": torch.zeros(2, dtype=torch.int64),  # sentences done, tokens seen
        }
        self.text_sha256 = ""

    def update(self, vals: Tensor, idx: Tensor, owner: Tensor, last_row: Tensor, n_tok: Tensor, first: int,
               seed: int) -> None:
        """Fold one batch (see _sentence_aggregates for shapes; ``first`` = corpus index of sentence 0)."""
        t, d_sae = self.t, self.t["fires"].numel()
        fire = vals > 0
        lat, v = idx[fire], vals[fire]
        t["fires"].index_add_(0, lat, torch.ones_like(lat))
        t["act_sum"].index_add_(0, lat, v.double())
        bins = (torch.bucketize(v, HIST_EDGES) - 1).clamp_(0, t["hist"].shape[1] - 1)
        t["hist"].view(-1).index_add_(0, lat * t["hist"].shape[1] + bins, torch.ones_like(bins, dtype=torch.int32))
        agg = _sentence_aggregates(vals, idx, owner, last_row, n_tok, d_sae)
        for a, name in enumerate(AGGREGATIONS):
            s, l, val = agg[name]
            merge_top_(t["top_score"][a], [t["top_id"][a]], l, val, [s + first])
        s, l, vmax = agg["max"]
        t["sent_fires"].index_add_(0, l, torch.ones_like(l))
        merge_top_(t["res_key"], [t["res_id"], t["res_act"]], l, hash01(s + first, l, seed), [s + first, vmax])
        sid = torch.arange(len(n_tok)) + first
        merge_top_(t["pool_key"], [t["pool_id"]], torch.zeros_like(sid), hash01(sid, -1, seed + 1), [sid])
        t["counts"] += torch.tensor([len(n_tok), int(n_tok.sum())])

    def hash_texts_(self, texts: list[str]) -> None:
        """Chain the sentences read into ``text_sha256`` (names the exact text used, whatever the batching)."""
        h = bytes.fromhex(self.text_sha256)
        for text in texts:
            h = hashlib.sha256(h + text.encode("utf-8")).digest()
        self.text_sha256 = h.hex()

    def save(self, path: Path, settings: dict) -> None:
        """One file, written atomically: the tables and the text hash they go with (in its metadata)."""
        meta = {"settings": json.dumps(settings, sort_keys=True), "text_sha256": self.text_sha256}
        atomic_write(path / STATE_FILE, safetensors_bytes({k: v.contiguous() for k, v in self.t.items()}, meta))

    def load_(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(path / STATE_FILE, "pt") as f:
            self.text_sha256 = (f.metadata() or {})["text_sha256"]
        self.t = load_file(path / STATE_FILE)


# ---------------------------------------------------------------------------------------------------
# Build


def _batches(tokenizer, sentences: Iterator[tuple[int, str]], batch_size: int, max_tokens: int
             ) -> Iterator[tuple[list[int], list[str], Tensor, Tensor]]:
    """(corpus indices, texts, tokens [B, T] right-padded with BOS first, mask [B, T]) batches."""
    from llama_sae.sae.evaluate import token_batches

    while chunk := list(islice(sentences, batch_size)):
        texts = [text for _, text in chunk]
        ((tokens, mask),) = token_batches(tokenizer, texts, batch_size=len(texts), max_tokens=max_tokens)
        yield [i for i, _ in chunk], texts, tokens, mask


@torch.no_grad()
def _encode_batch(model, sae, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run to the SAE's hook and encode the sentence tokens (BOS excluded).

    Returns vals, idx [M, k] (float32, cpu), owner [M], last_row [M] bool, n_tok [B] (clamped ≥ 1).
    """
    hook = sae.cfg.hook_name
    valid = mask.clone()
    valid[:, 0] = False  # BOS belongs to no sentence
    x = model.capture(tokens.to(model.device), [hook])[hook]  # [B, T, d]
    flat = x[valid.to(x.device)].to(sae.W_enc.device)  # [M, d]
    vals, idx = sae.encode_topk(flat)
    owner = valid.nonzero()[:, 0]  # [M]
    n_tok = valid.sum(1)
    last_row = torch.zeros(len(owner), dtype=torch.bool)
    if len(owner):
        last_row[torch.cumsum(n_tok, 0)[n_tok > 0] - 1] = True
    return vals.float().cpu(), idx.cpu(), owner, last_row, n_tok.clamp_min(1)


def _settings(sae, corpus_source: str, sentences: int, top_n: int, reservoir: int, pool: int, n_quantiles: int,
              max_tokens: int, seed: int, split_sentences: bool | None = None, model_dtype: str | None = None,
              dedupe: bool = False) -> dict[str, Any]:
    return {"sae_fingerprint": sae_fingerprint(sae), "corpus": corpus_source, "sentences": sentences,
            "top_n": top_n, "reservoir": reservoir, "pool": pool, "n_quantiles": n_quantiles,
            "max_tokens": max_tokens, "seed": seed, "hook_name": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae,
            "k": sae.cfg.k, "format": FORMAT_VERSION,
            **({} if split_sentences is None else {"split_sentences": split_sentences}),  # (absent: automatic)
            **({} if model_dtype is None else {"model_dtype": model_dtype}),  # (absent: the checkpoint's)
            **({"dedupe": True} if dedupe else {})}


def _check_out(out: Path, settings: dict, overwrite: bool) -> bool:
    """True if ``out`` already holds the finished artifact for these settings; errors on a different one."""
    meta_file = out / META_FILE
    if not meta_file.exists():
        return False
    old = json.loads(meta_file.read_text()).get("settings", {})
    if old == settings:
        return True
    if overwrite:
        return False
    diff = sorted(k for k in {**old, **settings} if old.get(k) != settings.get(k))  # (a flag dropped, too)
    raise UserError(f"{out} already holds a features artifact built with other settings ({', '.join(diff)}): "
                    "choose another --out, or pass --overwrite to rebuild it")


PASS2_REPORT_EVERY = 256  # pass 2 reports its progress every this many sentences (from the code cache too)

def build_features(model, tokenizer, sae, corpus_source: str, out: Path, *, sentences: int, top_n: int = 20,
                   reservoir: int = 40, pool: int = 512, n_quantiles: int = 10, batch_size: int = 64,
                   max_tokens: int = 128, seed: int = 0, checkpoint_every: int | None = None, overwrite: bool = False,
                   cache_bytes: int = 2 << 30, progress: Callable[[int, int], None] | None = None,
                   sae_path: str | None = None, split_sentences: bool | None = None,
                   model_dtype: str | None = None, dedupe: bool = False,
                   pass2_progress: Callable[[int, int], None] | None = None) -> Path:
    """Find top sentences and statistics for every latent of ``sae`` over a corpus (see the module docstring).

    Args:
        model, tokenizer: the Llama the SAE reads (its hook point is ``sae.cfg.hook_name``).
        corpus_source: a SOURCE string (``tinyworld:N[:heldout]``, ``jsonl:PATH``, ...).
        out: the artifact directory (created).
        sentences: sentences to read from the corpus.
        top_n: top sentences kept per latent and per aggregation (max, mean, last).
        reservoir: activating sentences sampled uniformly per latent, then split into ``n_quantiles`` bins.
        pool: random sentences from which each latent's non-activating examples are drawn.
        max_tokens: tokens per sentence (BOS included); longer sentences are truncated.
        checkpoint_every: sentences between resumable checkpoints of the running tables (default: a tenth of
            ``sentences``, at least 1,000 and at most 20,000, so a kill costs at most a tenth of the pass).
        cache_bytes: pass 1 keeps the sparse codes of up to this many bytes of batches on disk, so that
            pass 2 reads them instead of running the model again (0 = always re-run).
        overwrite: rebuild when ``out`` holds an artifact made with other settings.
        progress: called with (sentences done, sentences) after each batch.
        pass2_progress: the same for pass 2 (example sentences done, example sentences), from the code cache
            or the model.
        split_sentences: split the corpus's records into sentences (True), keep them whole (False), or decide
            from its first records (None; see :mod:`llama_sae.corpus`).
        model_dtype: the dtype ``model`` was loaded in when it is not the checkpoint's own (recorded, so a build
            in float32, exact whatever the batch size, is not resumed or taken for one in bf16).
        dedupe: read each distinct sentence once (a web corpus's repeats would otherwise fill the top lists).
    Returns:
        ``out``. Calling again with the same settings returns at once; after a kill, it resumes.
    """
    from llama_sae.corpus import Corpus
    from llama_sae.splice import check_fits

    check_fits(model, sae)
    corpus = Corpus(corpus_source, split_sentences=split_sentences, dedupe=dedupe)
    next(iter(corpus), None)  # a bad SOURCE (a missing file, column or dataset) fails here, before any directory
    if split_sentences is not None and split_sentences == Corpus(corpus_source).splits():
        split_sentences = None  # what the automatic rule decides anyway: the same artifact as without the flag
    if checkpoint_every is None:
        checkpoint_every = max(1_000, min(20_000, sentences // 10))
    out = Path(out)
    for name, value, least in (("sentences", sentences, 1), ("top_n", top_n, 1), ("reservoir", reservoir, 1),
                               ("pool", pool, 1), ("n_quantiles", n_quantiles, 1), ("batch_size", batch_size, 1),
                               ("max_tokens", max_tokens, 2), ("cache_bytes", cache_bytes, 0)):
        if value < least:
            raise UserError(f"features: {name} must be at least {least}, not {value}")
    if not (out / META_FILE).exists() and not (out / PARTIAL_DIR).exists():  # not (yet) an artifact of ours
        check_output_dir(out, "a features artifact", ours={TENSORS_FILE})
    settings = _settings(sae, corpus_source, sentences, top_n, reservoir, pool, n_quantiles, max_tokens, seed,
                         split_sentences, model_dtype, dedupe)
    with lock_output(out, f"the features artifact {out}"):  # two builds: one deletes the other's partial state
        sweep_temp_files(out)
        if _check_out(out, settings, overwrite):
            shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)  # a kill between the last write and this removal
            return out
        if (out / META_FILE).exists():  # --overwrite: the old build's explanations and scores are set aside, not shown
            old_build = json.loads((out / META_FILE).read_text()).get("build_id") or "old"
            for name in (EXPLANATIONS_FILE, SCORES_FILE):
                if (out / name).exists():
                    os.replace(out / name, out / f"{Path(name).stem}.{old_build}.jsonl")
        partial = out / PARTIAL_DIR
        marker = partial / "settings.json"
        if partial.exists() and (not marker.exists() or json.loads(marker.read_text()) != settings):
            shutil.rmtree(partial)  # an interrupted build with other settings (or SAE): its state and codes are void
        partial.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            atomic_write_json(marker, settings)
        state = _State(sae.cfg.d_sae, top_n, reservoir, pool)
        if (partial / STATE_FILE).exists():
            state.load_(partial)
        cache = CodeCache(partial, cache_bytes)
        done = int(state.t["counts"][0])
        stream = islice(enumerate(s.text for s in corpus), done, sentences)
        last_saved = done
        for ids, texts, tokens, mask in _batches(tokenizer, stream, batch_size, max_tokens):
            codes = _encode_batch(model, sae, tokens, mask)
            state.update(*codes, first=ids[0], seed=seed)
            cache.put(ids, codes[0], codes[1], mask.sum(1) - 1)
            state.hash_texts_(texts)
            done = ids[-1] + 1
            if done - last_saved >= checkpoint_every:
                state.save(partial, settings)
                last_saved = done
            if progress is not None:
                progress(done, sentences)
        if int(state.t["counts"][0]) == 0:
            raise UserError(f"the corpus {corpus_source} gave no sentences: check the SOURCE")
        state.save(partial, settings)
        tensors, meta = _finish(model, tokenizer, sae, corpus, state, settings, batch_size, cache, pass2_progress)
        meta.update(sae_path=sae_path, text_sha256=state.text_sha256)
        build_id = secrets.token_hex(8)
        meta["build_id"] = build_id
        atomic_write(out / TENSORS_FILE, safetensors_bytes(tensors, metadata={"build_id": build_id}))
        atomic_write_json(out / META_FILE, meta)
        shutil.rmtree(partial, ignore_errors=True)
        return out


def _examples_table(state: _State, n_quantiles: int) -> dict[str, Tensor]:
    """Every (latent, kind, rank, sentence, activation, quantile) row chosen in pass 1 (random excluded)."""
    t = state.t
    d_sae, N = t["top_id"].shape[1:]
    cols: dict[str, list[Tensor]] = {k: [] for k in ("latent", "kind", "rank", "sentence", "activation", "quantile")}

    def add(kind: int, ids: Tensor, acts: Tensor, quantile: Tensor) -> None:
        keep = ids >= 0
        lat, rank = keep.nonzero(as_tuple=True)
        for name, col in zip(cols, (lat, torch.full_like(lat, kind), rank, ids[keep], acts[keep], quantile[keep])):
            cols[name].append(col)

    for a in range(3):
        add(a, t["top_id"][a], t["top_score"][a], torch.full_like(t["top_id"][a], -1))
    order = torch.argsort(t["res_act"].masked_fill(t["res_id"] < 0, float("inf")), dim=1, stable=True)
    ids, acts = t["res_id"].gather(1, order), t["res_act"].gather(1, order)  # ascending activation
    count = (ids >= 0).sum(1, keepdim=True).clamp_min(1)
    quantile = torch.arange(ids.shape[1])[None] * n_quantiles // count
    add(3, ids, acts, quantile)
    return {k: torch.cat(v) for k, v in cols.items()}


class CodeCache:
    """Sparse codes of pass-1 batches on disk (``codes-FIRST-LAST.safetensors`` in the partial directory),
    up to ``limit`` bytes, so that pass 2 need not run the model again for the sentences they hold."""

    def __init__(self, directory: Path, limit: int):
        self.dir, self.limit = directory, limit
        self.used = sum(p.stat().st_size for p in directory.glob("codes-*.safetensors"))
        self.current: tuple[int, int, Tensor, Tensor, Tensor] | None = None
        self.index: list[tuple[int, int, Path]] | None = None

    def put(self, ids: list[int], vals: Tensor, idx: Tensor, rows: Tensor) -> None:
        """Keep one batch: vals, idx [M, k] and rows [B] (token rows of each sentence)."""
        size = vals.numel() * 8 + rows.numel() * 4
        if self.used + size > self.limit:
            return
        data = {"vals": vals.float().contiguous(), "idx": idx.int().contiguous(), "rows": rows.int().contiguous()}
        path = self.dir / f"codes-{ids[0]:012d}-{ids[-1]:012d}.safetensors"
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(safetensors_bytes(data))
        os.replace(tmp, path)  # atomic, not fsynced: a cache; a shard that does not load is recomputed
        self.used += size

    def get(self, sid: int) -> tuple[Tensor, Tensor] | None:
        """(vals, idx) [n, k] of corpus sentence ``sid`` if a kept batch holds it (asked in increasing order)."""
        if self.index is None:  # pass 1 is over: index the kept batches once
            spans = [(*(int(x) for x in p.stem.split("-")[1:]), p) for p in self.dir.glob("codes-*.safetensors")]
            self.index = sorted(spans)
        if self.current is None or not self.current[0] <= sid <= self.current[1]:
            self.current = None
            j = bisect.bisect_right(self.index, (sid, float("inf"))) - 1  # the last batch starting at or before sid
            if j < 0 or self.index[j][1] < sid:
                return None
            first, last, path = self.index[j]
            try:
                t = load_file(path)
            except Exception:  # safetensors' own error type for a damaged file: run the model instead
                return None
            self.current = (first, last, t["vals"], t["idx"].long(), _offsets(t["rows"]))
        first, _, vals, idx, offsets = self.current
        lo, hi = int(offsets[sid - first]), int(offsets[sid - first + 1])
        return vals[lo:hi], idx[lo:hi]


class _Pass2:
    """Pass 2's per-sentence outputs, stored by slot (the sentence's rank among the stored ones)."""

    def __init__(self, tokenizer, ex: dict[str, Tensor], slot: dict[int, int], pool: set[int], n_slots: int):
        self.tokenizer, self.ex, self.slot, self.pool = tokenizer, ex, slot, pool
        needed = torch.tensor(sorted(slot), dtype=torch.int64)
        self.start = torch.searchsorted(ex["sentence"], needed).tolist()
        self.end = torch.searchsorted(ex["sentence"], needed, right=True).tolist()
        self.texts: list[str] = [""] * n_slots
        empty = np.zeros(0, dtype=np.int32)
        self.token_ids: list[np.ndarray] = [empty] * n_slots  # int32 ids: 4 bytes a token, not a str pointer
        self.acts: list[np.ndarray] = [empty.astype(np.float32)] * n_slots
        self.pool_fire: list[Tensor] = []

    def record(self, sid: int, text: str, token_ids: np.ndarray, vals: Tensor, idx: Tensor) -> None:
        """One sentence: its text, token ids (BOS excluded), its examples' per-token activations and,
        for a pool sentence, the latents that fire on it. vals, idx [n_tokens, k]."""
        i = self.slot[sid]
        self.texts[i] = text
        self.token_ids[i] = token_ids.astype(np.int32)
        lat = self.ex["latent"][self.start[i]:self.end[i]]  # [E]
        acts = (vals[None] * (idx[None] == lat[:, None, None])).sum(-1).flatten()  # [E * n_tokens]
        self.acts[i] = acts.float().numpy()
        if sid in self.pool:
            fired = idx[vals > 0].unique()
            self.pool_fire.append(torch.stack([fired, torch.full_like(fired, i)]))


def _finish(model, tokenizer, sae, corpus, state: _State, settings: dict, batch_size: int, cache: CodeCache,
            progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Pass 2: per-token activations of the chosen examples and the pool's firing sets (from the code
    cache where it holds the sentence, else from the model); the tensors to write. ``progress``: called with
    (sentences done, sentences) after each batch the model runs, and at the end."""
    t, d_sae = state.t, sae.cfg.d_sae
    ex = _examples_table(state, settings["n_quantiles"])
    pool_ids = t["pool_id"][0][t["pool_id"][0] >= 0].sort().values
    needed = torch.cat([ex["sentence"], pool_ids]).unique()  # sorted corpus indices
    slot = {int(s): i for i, s in enumerate(needed)}
    by_sentence = torch.argsort(ex["sentence"], stable=True)
    ex = {k: v[by_sentence] for k, v in ex.items()}
    out = _Pass2(tokenizer, ex, slot, set(pool_ids.tolist()), len(slot))
    done = 0

    def counted(items):  # (the sentences the code cache holds never reach a model batch: report them here too)
        nonlocal done
        for item in items:
            done += 1
            if progress is not None and done % PASS2_REPORT_EVERY == 0:
                progress(done, len(slot))
            yield item

    stream = counted((i, s.text) for i, s in enumerate(islice(corpus, int(needed[-1]) + 1)) if i in slot)
    uncached = ((i, text) for i, text in stream if not _from_cache(out, cache, i, text, settings["max_tokens"]))
    for ids, texts, tokens, mask in _batches(tokenizer, uncached, batch_size, settings["max_tokens"]):
        vals, idx, _, _, _ = _encode_batch(model, sae, tokens, mask)
        row_start = _offsets(mask.sum(1) - 1).tolist()
        for b, sid in enumerate(ids):
            n = row_start[b + 1] - row_start[b]
            rows = slice(row_start[b], row_start[b + 1])
            out.record(sid, texts[b], tokens[b, 1:n + 1].numpy(), vals[rows], idx[rows])
        if progress is not None:
            progress(done, len(slot))
    if progress is not None:
        progress(len(slot), len(slot))
    piece_blob, piece_off = piece_blob_of(tokenizer, np.concatenate(out.token_ids),
                                          lengths=[len(t) for t in out.token_ids])
    n_pieces = torch.tensor([len(t) for t in out.token_ids], dtype=torch.int64)
    return _pack(ex, slot, out.texts, (piece_blob, piece_off), n_pieces, out.acts, pool_ids, out.pool_fire, state,
                 settings, d_sae)


def _from_cache(out: _Pass2, cache: CodeCache, sid: int, text: str, max_tokens: int) -> bool:
    """Record sentence ``sid`` from the code cache; False if the cache does not hold it."""
    codes = cache.get(sid)
    if codes is None:
        return False
    out.record(sid, text, np.array(out.tokenizer.encode_prefix(text, max_tokens)[1:], dtype=np.int32), *codes)
    return True


def _blob(strings: list[str]) -> tuple[Tensor, Tensor]:
    """UTF-8 concatenation uint8 [bytes] and offsets int64 [n + 1]."""
    data = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    blob = np.frombuffer(b"".join(data), dtype=np.uint8).copy()
    return torch.from_numpy(blob), torch.from_numpy(offsets)


def piece_blob_of(tokenizer, ids: np.ndarray, chunk: int = 1 << 20, lengths: Sequence[int] | None = None
                  ) -> tuple[Tensor, Tensor]:
    """The UTF-8 concatenation uint8 [bytes] and offsets int64 [n + 1] of each token's piece, for token ids [n].

    A token's piece is its own ``tokenizer.decode([id])``. With ``lengths`` (the token count of each sentence
    the ids are the concatenation of), a sentence holding a token that is part of a character (its own decode
    holds U+FFFD) has its pieces from a stream decoder instead, as the UI shows them: the token holding part of a
    character shows nothing and the one completing it the whole character, so the pieces join up to the text.
    Each distinct id is decoded once, and the bytes are gathered from that table a chunk of tokens at a time:
    no Python object per token, except in the sentences with split characters."""
    uniq, inv = np.unique(ids, return_inverse=True)
    table = [tokenizer.decode([int(t)]).encode("utf-8") for t in uniq]
    partial = np.array([b"\xef\xbf\xbd" in b for b in table], dtype=bool)
    if lengths is not None and len(ids) and partial[inv].any():
        inv = inv.copy()
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        split = np.concatenate([[0], np.cumsum(partial[inv])])  # tokens with a split character, up to each position
        for sentence in np.flatnonzero(split[ends] > split[ends - lengths]):
            lo, hi = int(ends[sentence] - lengths[sentence]), int(ends[sentence])
            decoder = tokenizer.stream_decoder()
            pieces = [decoder.feed(int(t)) for t in ids[lo:hi]]
            pieces[-1] += decoder.flush()
            inv[lo:hi] = np.arange(len(table), len(table) + len(pieces))  # each a piece of its own in the table
            table += [p.encode("utf-8") for p in pieces]
    start = np.zeros(len(table) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in table], out=start[1:])
    table_bytes = np.frombuffer(b"".join(table), dtype=np.uint8)
    lengths = (start[1:] - start[:-1])[inv]  # [n] bytes of each token's piece
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.empty(int(offsets[-1]), dtype=np.uint8)
    for lo in range(0, len(ids), chunk):
        hi = min(lo + chunk, len(ids))
        src = np.repeat(start[inv[lo:hi]] - offsets[lo:hi], lengths[lo:hi]) + np.arange(offsets[lo], offsets[hi])
        blob[offsets[lo]:offsets[hi]] = table_bytes[src]
    return torch.from_numpy(blob), torch.from_numpy(offsets)


def _offsets(lengths: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths.long(), 0)])


def _pack(ex: dict[str, Tensor], slot: dict[int, int], texts: list[str], pieces: tuple[Tensor, Tensor],
          n_tok: Tensor, acts_parts: list[np.ndarray], pool_ids: Tensor, pool_fire: list[Tensor], state: _State,
          settings: dict, d_sae: int) -> tuple[dict[str, Tensor], dict]:
    """Sort the examples by (latent, kind, rank), build the CSR offsets, and assemble the tensors and meta.
    pieces: (blob, offsets) of every stored sentence's token pieces in slot order; n_tok [slots] their counts."""
    t = state.t
    acts_flat = torch.from_numpy(np.concatenate(acts_parts)) if acts_parts else torch.zeros(0)
    sent_slot = torch.tensor([slot[int(s)] for s in ex["sentence"]], dtype=torch.int64)
    ex_len = n_tok[sent_slot] if len(sent_slot) else torch.zeros(0, dtype=torch.int64)
    src_start = _offsets(ex_len)[:-1]
    order = torch.argsort(ex["latent"] * 8 * 65536 + ex["kind"] * 65536 + ex["rank"], stable=True)
    new_len = ex_len[order]
    gather = src_start[order].repeat_interleave(new_len) + (
        torch.arange(int(new_len.sum())) - _offsets(new_len)[:-1].repeat_interleave(new_len))
    fire = torch.cat(pool_fire, 1) if pool_fire else torch.zeros(2, 0, dtype=torch.int64)
    fire = fire[:, torch.argsort(fire[0] * (len(slot) + 1) + fire[1])]
    text_blob, text_off = _blob(texts)
    piece_blob, piece_off = pieces
    sent_index = torch.tensor(sorted(slot), dtype=torch.int64)
    tokens_seen = max(int(t["counts"][1]), 1)
    top_max = t["top_score"][0]
    valid = top_max > float("-inf")
    typical = (top_max.clamp_min(0) * valid).sum(1) / valid.sum(1).clamp_min(1)
    tensors = {
        "frequency": (t["fires"].double() / tokens_seen).float(),
        "sentence_frequency": (t["sent_fires"].double() / max(int(t["counts"][0]), 1)).float(),
        "typical_max": typical, "max_activation": top_max[:, 0].clamp_min(0),
        "mean_activation": (t["act_sum"] / t["fires"].clamp_min(1)).float(),
        "hist": t["hist"], "hist_edges": HIST_EDGES.clone(),
        "ex_offsets": _offsets(torch.bincount(ex["latent"], minlength=d_sae)),
        "ex_kind": ex["kind"][order].to(torch.int8), "ex_rank": ex["rank"][order].to(torch.int32),
        "ex_sentence": sent_slot[order], "ex_activation": ex["activation"][order].float(),
        "ex_quantile": ex["quantile"][order].to(torch.int16), "ex_acts_offsets": _offsets(new_len),
        "ex_acts": acts_flat[gather].float(),
        "sent_index": sent_index, "sent_text": text_blob, "sent_text_offsets": text_off,
        "sent_piece_offsets": _offsets(n_tok), "piece": piece_blob, "piece_offsets": piece_off,
        "pool": torch.tensor([slot[int(s)] for s in pool_ids], dtype=torch.int64),
        "pool_fire_offsets": _offsets(torch.bincount(fire[0], minlength=d_sae)), "pool_fire": fire[1].contiguous(),
    }
    meta = {"settings": settings, "d_sae": d_sae, "sae_fingerprint": settings["sae_fingerprint"],
            "hook_name": settings["hook_name"], "k": settings["k"], "corpus": settings["corpus"],
            "sentences": int(t["counts"][0]), "tokens": int(t["counts"][1]),
            "live_latents": int((t["fires"] > 0).sum()), "examples": int(len(order)),
            "stored_sentences": len(slot), "format": FORMAT_VERSION}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


# ---------------------------------------------------------------------------------------------------
# Load


PIECES_CACHE = 1 << 16  # sentences whose decoded token pieces a Features keeps (a few MB)


class Features:
    """A features artifact, read back (see ``load_features``)."""

    def __init__(self, path: Path, meta: dict, columns: dict[str, np.ndarray]):
        self.path = path
        self.meta = meta
        self.d_sae: int = meta["d_sae"]
        self.sae_fingerprint: str = meta["sae_fingerprint"]
        self._t = columns  # read-only numpy views of the memory-mapped file: pages are read as they are used
        self.frequency: Tensor = torch.from_numpy(columns["frequency"].copy())
        self.typical_max: Tensor = torch.from_numpy(columns["typical_max"].copy())
        self._explanations: dict[int, Explanation] | None = None

    def _latent(self, latent: int) -> int:
        if not 0 <= latent < self.d_sae:
            raise UserError(f"latent {latent} is out of range: this SAE has latents 0..{self.d_sae - 1}")
        return int(latent)

    def check_sae(self, sae) -> None:
        """UserError unless this artifact was built from ``sae`` (same weights and config)."""
        got = sae_fingerprint(sae)
        if got != self.sae_fingerprint:
            built_from = self.meta.get("sae_path")
            fix = f"pass that SAE (--sae {built_from}), or " if built_from else ""
            raise UserError(f"{self.path} was built from another SAE (fingerprint {self.sae_fingerprint}, this SAE "
                            f"is {got}): {fix}rebuild it with `llama-sae features --sae SAE --out DIR`")

    def live_latents(self) -> list[int]:
        """Latents that fired at least once in the corpus."""
        return (self.frequency > 0).nonzero()[:, 0].tolist()

    def histogram(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(bin edges [n + 1], counts [n]) of the latent's nonzero token activations (log bins, trimmed)."""
        counts = np.array(self._t["hist"][self._latent(latent)])
        edges = np.array(self._t["hist_edges"])
        nz = np.nonzero(counts)[0]
        if len(nz) == 0:
            return edges[:1], counts[:0]
        lo, hi = nz[0], nz[-1] + 1
        return edges[lo:hi + 1], counts[lo:hi]

    def _text(self, slot: int) -> str:
        lo, hi = self._t["sent_text_offsets"][slot:slot + 2]
        return self._t["sent_text"][lo:hi].tobytes().decode("utf-8")

    def _pieces(self, slot: int) -> list[str]:
        """The token pieces of sentence ``slot`` (a fresh list). A sentence is among the examples of many
        latents, so decoded pieces are kept for the next call (up to PIECES_CACHE sentences)."""
        cache = self.__dict__.setdefault("_pieces_cache", {})
        pieces = cache.get(slot)
        if pieces is None:
            lo, hi = self._t["sent_piece_offsets"][slot:slot + 2]
            po = self._t["piece_offsets"][lo:hi + 1].tolist()
            blob = self._t["piece"][po[0]:po[-1]].tobytes()
            pieces = tuple(blob[a - po[0]:b - po[0]].decode("utf-8") for a, b in zip(po[:-1], po[1:]))
            if len(cache) >= PIECES_CACHE:
                cache.clear()
            cache[slot] = pieces
        return list(pieces)

    def _example(self, row: int, kind: str) -> Example:
        slot = int(self._t["ex_sentence"][row])
        lo, hi = self._t["ex_acts_offsets"][row:row + 2]
        q = int(self._t["ex_quantile"][row])
        return Example(text=self._text(slot), tokens=self._pieces(slot), acts=self._t["ex_acts"][lo:hi].tolist(),
                       activation=float(self._t["ex_activation"][row]), quantile=None if q < 0 else q, kind=kind,
                       sentence=int(self._t["sent_index"][slot]))

    def examples(self, latent: int, kind: str = "max", n: int | None = None) -> list[Example]:
        """Examples of ``latent``: the top sentences under ``max`` / ``mean`` / ``last`` aggregation (best
        first), ``quantile`` samples (lowest quantile first) or ``random`` non-activating sentences."""
        latent = self._latent(latent)
        if kind not in KINDS:
            raise UserError(f"unknown example kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind == "random":
            return self._random(latent, n)
        lo, hi = self._t["ex_offsets"][latent:latent + 2]
        rows = lo + np.flatnonzero(self._t["ex_kind"][lo:hi] == KINDS.index(kind))
        return [self._example(r, kind) for r in rows[:n].tolist()]

    def _random(self, latent: int, n: int | None) -> list[Example]:
        lo, hi = self._t["pool_fire_offsets"][latent:latent + 2]
        pool = self._t["pool"]
        quiet = torch.from_numpy(pool[~np.isin(pool, self._t["pool_fire"][lo:hi])])
        if len(quiet) == 0:
            return []
        order = torch.argsort(hash01(quiet, latent, self.meta["settings"]["seed"] + 2))
        n = self.meta["settings"]["top_n"] if n is None else n
        return [Example(text=self._text(s), tokens=(p := self._pieces(s)), acts=[0.0] * len(p), activation=0.0,
                        quantile=None, kind="random", sentence=int(self._t["sent_index"][s]))
                for s in quiet[order][:n].tolist()]

    def pool_texts(self) -> list[str]:
        """The random pool's sentences (the background that the offline explainer contrasts with)."""
        return [self._text(slot) for slot in self._t["pool"].tolist()]

    # ------------------------------------------------------------- explanations and scores
    def explanations(self) -> dict[int, Explanation]:
        """Every explained latent -> its Explanation (read from explanations.jsonl and scores.jsonl, cached)."""
        if self._explanations is None:
            scores: dict[int, dict] = {}
            for row in self.rows(SCORES_FILE):
                if row.get("control"):
                    continue
                scores.setdefault(row["latent"], {})[row.get("method", "detection")] = (
                    row.get("balanced_accuracy"), row.get("explanation"))
            self._explanations = {}
            for row in self.rows(EXPLANATIONS_FILE):
                if row.get("explanation") is None:
                    continue
                latent = row["latent"]
                # a score of another explanation (explained again since it was scored) is no score of this one
                s = {method: ba for method, (ba, scored) in scores.get(latent, {}).items()
                     if scored is None or scored == row["explanation"]}
                self._explanations[latent] = Explanation(row["explanation"], row.get("certainty"), s.get("detection"),
                                                         s.get("fuzzing"), row.get("backend"))
        return self._explanations

    def rows(self, name: str) -> list[dict]:
        """The records of the artifact's ``name`` (explanations.jsonl, scores.jsonl), each checked to name a latent
        of this SAE: a damaged line is a UserError that names it, never a silently dropped latent."""
        rows = read_jsonl(self.path / name, strict=True)
        for number, row in enumerate(rows, 1):
            latent = row.get("latent")
            if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.d_sae:
                raise UserError(f"{self.path / name}, record {number}: latent {latent!r} is not a latent of this "
                                f"SAE (0..{self.d_sae - 1}): the file is damaged; fix that line, or write the file "
                                "again (explain / score with --fresh)")
            if "explanation" in row and not isinstance(row["explanation"], str | None):
                raise UserError(f"{self.path / name}, record {number}: the explanation is not text: the file is "
                                "damaged; fix that line, or explain again with --fresh")
        return rows

    def explanation(self, latent: int) -> Explanation | None:
        """The latent's explanation with its scores (from explanations.jsonl and scores.jsonl), or None."""
        return self.explanations().get(self._latent(latent))

    def search(self, text: str, limit: int = 20) -> list[int]:
        """Latents whose explanation contains ``text`` (case-insensitive), best detection score first."""
        needle = text.lower()
        hits = [(e.detection if e.detection is not None else -1.0, -i, i)
                for i, e in self.explanations().items() if needle in e.text.lower()]
        return [i for *_, i in sorted(hits, reverse=True)[:limit]]

    def reload_explanations(self) -> None:
        """Forget cached explanations (after explain/score wrote new ones)."""
        self._explanations = None


def load_features(path: str | Path) -> Features:
    """Read a features artifact directory (UserError if it is missing, unfinished or corrupt); a file of one
    (its features.json) names the directory."""
    path = Path(path)
    if path.is_file() and path.name in (META_FILE, TENSORS_FILE):
        path = path.parent
    meta_file = path / META_FILE
    if not path.exists():
        raise UserError(f"no features artifact at {path}: it does not exist (check the path, or build one with "
                        "`llama-sae features --sae SAE --out DIR`)")
    if not meta_file.exists():
        hint = " (a build is in progress or was interrupted: run it again to resume)" if (
            path / PARTIAL_DIR).exists() else ""
        raise UserError(f"{path} holds no features artifact ({META_FILE} missing){hint}: build one with "
                        "`llama-sae features --sae SAE --out DIR`")
    try:
        meta = json.loads(meta_file.read_text())
        columns, metadata = map_safetensors(path / TENSORS_FILE)
        build_id = metadata.get("build_id")
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing, truncated or garbled file
        raise UserError(f"{path} holds a corrupt features artifact ({type(e).__name__}: {e}): rebuild it with "
                        "`llama-sae features ... --overwrite`") from e
    kinds = {"d_sae": int, "sae_fingerprint": str, "settings": dict, "sentences": int, "hook_name": str}
    bad = [key for key, kind in kinds.items() if not isinstance(meta, dict) or not isinstance(meta.get(key), kind)
           or isinstance(meta.get(key), bool)]
    if bad or meta["d_sae"] <= 0 or columns.get("frequency", np.zeros(0)).shape != (meta["d_sae"],):
        what = f"{bad[0]} is missing or of the wrong type" if bad else "d_sae does not match its tensors"
        raise UserError(f"{meta_file}: {what}: the artifact is damaged; rebuild it with `llama-sae features ... "
                        "--overwrite`")
    if build_id != meta.get("build_id") or meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: {TENSORS_FILE} and {META_FILE} are from different builds (or an old format): "
                        "rebuild with `llama-sae features ... --overwrite`")
    return Features(path, meta, columns)


NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_safetensors(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as a read-only numpy view of the memory-mapped file, and the file's
    metadata: opening reads the header alone, and each tensor's pages are read when it is used (a features
    artifact of a 65,536-latent SAE is over a gigabyte; a steer reads one column of it).

    The layout is the safetensors format's: an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range in the data that follows. ValueError for a truncated or garbled file.
    """
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n)) if 0 < n < 1 << 27 else None
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    size, start = file.stat().st_size, 8 + n
    # a plain ndarray over the mapping (it keeps the map alive): slicing a np.memmap runs Python code per call, which
    # was a third of reading examples back (2.7 M slices when scoring the demo's 1,024 latents)
    data = np.memmap(file, dtype=np.uint8, mode="r").view(np.ndarray) if size > start else np.zeros(0, np.uint8)
    columns = {}
    for name, spec in header.items():
        (lo, hi), dtype, shape = spec["data_offsets"], np.dtype(NUMPY_DTYPES[spec["dtype"]]), spec["shape"]
        if not 0 <= lo <= hi <= size - start or hi - lo != dtype.itemsize * math.prod(shape):
            raise ValueError(f"tensor {name!r} lies outside the file (truncated?)")
        columns[name] = data[start + lo:start + hi].view(dtype).reshape(shape)
    return columns, metadata

