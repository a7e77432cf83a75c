"""Train TopK SAEs on an activation store: one process, or data-parallel with torchrun.

    llama-sae train --store runs/acts --out runs/sae                    # one SAE, defaults below
    llama-sae train --store runs/acts --out runs/sae                    # again after a crash: resumes exactly
    llama-sae train --store runs/acts --out runs/sweep --k 16,32,64     # three SAEs from one pass over the data
    llama-sae train --store runs/acts --out runs/seed-sae --preset seed # the seed project's hyperparameters
    torchrun --nproc-per-node 8 -m llama_sae.cli train --store ... --out ...   # data-parallel (nccl / gloo)

What one optimizer step does, for every SAE of the run: normalize the batch (per token), sparse forward
(TopK and aux-k over dead latents), FVU + aux_coeff * aux-k loss with batch-global denominators, backward
through sparse kernels, one all-reduce of every gradient and the firing counts (SUM: each rank's loss is
its share of the global loss), decoder-gradient projection, AdamW, decoder renormalization, dead-latent
counters. Every rank reads the same global batch and takes its slice, so N ranks compute what one process
computes. A checkpoint (weights, optimizer, counters, RNG, loader position) is written atomically every
``checkpoint_every`` steps; a run killed at any point restarts from it and ends with the same weights.

Not done here: evaluation on the validation split (sae/evaluate.py), learning-rate search, EMA weights.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import signal
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama_sae.errors import UserError, check_device, first_line, short_hash
from llama_sae.fileio import atomic_write, atomic_writer, lock_output, sweep_temp_files
from llama_sae.sae import formats
from llama_sae.sae.model import SAE, SAEConfig, TrainOutput, normalize

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG_FILE = "train_config.yaml"
# Settings that change how a run is watched, not what it computes: they may differ on resume.
RUN_ONLY = {"log_every", "checkpoint_every", "wandb", "wandb_project", "plots", "device", "eval_every", "eval_model",
            "eval_corpus", "eval_texts"}


class TrainConfig(BaseModel):
    """Everything that decides what ``llama-sae train`` computes (CLI flags, YAML files and presets map here)."""

    model_config = ConfigDict(extra="forbid")
    d_sae: int | list[int] | None = Field(None, description="latents per SAE; a list trains one SAE per value "
                                                            "(times every k); default expansion_factor x d_in")
    expansion_factor: int = Field(8, gt=0, description="d_sae = expansion_factor x d_in when d_sae is not set")
    k: int | list[int] = Field(32, description="active latents per token; a list trains one SAE per value")
    normalize_activations: Literal["layer_norm", "none"] = Field(
        "layer_norm", description="per-token input normalization (SAELens layer_norm: mean 0, std 1, eps 1e-5)")
    batch_size: int = Field(4096, ge=2, description="tokens per optimizer step, summed over ranks (2 or more: the "
                                                    "loss is normalized by the batch's variance)")
    tokens: int | None = Field(None, gt=0, description="training tokens; default epochs x the split's tokens")
    epochs: int = Field(1, gt=0, description="passes over the split when tokens is not set")
    lr: float | None = Field(None, gt=0, description="peak learning rate; default 2e-4 / sqrt(d_sae / 16384)")
    lr_min: float | None = Field(None, ge=0, description="learning rate at the end of the cosine; default lr / 10")
    warmup_frac: float = Field(0.02, ge=0, lt=1, description="fraction of the steps with linear LR warm-up")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False, description="AdamW eps")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False,
                                description="AdamW decay on W_enc only (never biases; W_dec is renormalized each step)")
    k_aux: int | None = Field(None, gt=0, description="dead latents per token in the aux-k loss; default d_in / 2")
    aux_coeff: float = Field(1 / 32, ge=0, allow_inf_nan=False, description="weight of the aux-k loss")
    dead_tokens_threshold: int = Field(1_000_000, gt=0, description="a latent that has not fired for this many "
                                                                    "tokens is dead (OpenAI used 10M)")
    bf16: bool = Field(False, description="encoder GEMM in bfloat16 (float32 master weights, gradients and "
                                          "optimizer); several times faster on CPUs with AMX and on GPUs")
    seed: int = Field(0, ge=0, description="seed of the init and of the loader's shuffle")
    hook: str | None = Field(None, description="hook point to train on (default: the store's only one)")
    split: str = Field("train", description="store split to train on")
    device: str = Field("cpu", description="cpu or cuda (under torchrun: each rank's cuda:LOCAL_RANK)")
    log_every: int = Field(50, gt=0, description="steps between metric records")
    checkpoint_every: int = Field(500, gt=0, description="steps between checkpoints")
    wandb: bool = Field(False, description="also log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = Field("llama-sae", description="W&B project")
    plots: bool = Field(True, description="write PNG plots of the metrics at the end (needs matplotlib)")
    eval_every: int | None = Field(None, gt=0, description="steps between spliced evaluations in eval_model "
                                                           "(CE recovered, KL; at the next metrics record); and "
                                                           "one at the end. Needs eval_model and eval_corpus")
    eval_model: str | None = Field(None, description="checkpoint the SAEs are spliced into for evaluation")
    eval_corpus: str | None = Field(None, description="corpus SOURCE of the held-out evaluation texts")
    eval_texts: int = Field(64, gt=0, description="texts of eval_corpus per evaluation")

    @field_validator("d_sae", "expansion_factor", "k", "batch_size", "tokens", "epochs", "k_aux",
                     "dead_tokens_threshold", "seed", "log_every", "checkpoint_every", "eval_every", "eval_texts",
                     mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:  # YAML's true / yes would read as 1
        if isinstance(value, bool) or isinstance(value, list) and any(isinstance(v, bool) for v in value):
            raise ValueError(f"{value!r} is not a whole number")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lr is not None and self.lr_min is not None and self.lr_min > self.lr:
            raise ValueError(f"lr_min={self.lr_min} is above lr={self.lr}: lower lr_min")
        if not all(0 <= b < 1 for b in self.betas):  # NaN fails too
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("d_sae", "k"):
            values = getattr(self, name)
            if isinstance(values, list) and (not values or min(values) <= 0):
                raise ValueError(f"{name} must be positive integers, got {values}")
            if isinstance(values, list) and len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice ({values}): two SAEs would share one name and folder")
        if isinstance(self.d_sae, int) and self.d_sae <= 0 or isinstance(self.k, int) and self.k <= 0:
            raise ValueError(f"d_sae and k must be positive, got d_sae={self.d_sae}, k={self.k}")
        if (self.eval_every is not None) != (self.eval_model is not None) or \
                (self.eval_model is not None) != (self.eval_corpus is not None):
            raise ValueError("spliced evaluation needs eval_every, eval_model and eval_corpus together (on the "
                             "command line --eval-every N --eval-corpus SOURCE; --eval-model defaults to the "
                             "store's model)")
        return self


# --------------------------------------------------------------------------- config loading
def preset_path(name: str) -> Path:
    """The YAML file of preset ``name`` (src/llama_sae/presets/NAME.yaml)."""
    root = Path(str(resources.files("llama_sae") / "presets"))
    path = root / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in root.glob("*.yaml"))
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(known)}")
    return path


def load_config(preset: str | None = None, file: str | os.PathLike | None = None, *,
                defaults: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a preset, then a YAML file, then explicit overrides (None values are ignored), and
    ``defaults`` for the fields all of them leave unset (None: a written train_config.yaml says `eval_model: null`)."""
    data: dict[str, Any] = {}
    for path in [preset_path(preset) if preset else None, Path(file) if file else None]:
        if path is not None:
            if not path.is_file():
                what = "is a directory" if path.is_dir() else "does not exist"
                raise UserError(f"config file {path} {what}: pass a YAML file of TrainConfig fields")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise UserError(f"config file {path} is not readable YAML ({first_line(e)}): fix it, or start from "
                                "`llama-sae train --preset seed`'s fields") from None
            if not isinstance(loaded, dict):
                raise UserError(f"config file {path} holds a {type(loaded).__name__}, not a mapping of TrainConfig "
                                "fields (e.g. `k: 32`)")
            data.update(loaded)
    data.update({key: value for key, value in overrides.items() if value is not None})
    for key, value in (defaults or {}).items():
        if data.get(key) is None:
            data[key] = value
    return validated(data)


def validated(data: dict[str, Any]) -> TrainConfig:
    """TrainConfig(**data), with a validation error turned into one line that names the field."""
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across fields: its message names them, and the input is the whole config
            raise UserError(f"training config: {msg}") from None
        where = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            raise UserError(f"training config: unknown field {where!r}: the fields are "
                            f"{', '.join(TrainConfig.model_fields)}") from None
        raise UserError(f"training config: {where}: {msg} (got {err.get('input')!r})") from None


def parse_int_list(text: str | None) -> int | list[int] | None:
    """'32' -> 32, '16,32' -> [16, 32] (for CLI flags that take one value or a sweep)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{text!r} is not an integer or a comma-separated list of integers") from None
    if len(set(values)) < len(values):
        raise UserError(f"{text!r} lists a value twice: each SAE of a sweep needs its own settings")
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- sources
class TensorSource:
    """An in-memory activation source with the store's loader interface (tests, demos, notebooks).

    Args: acts [N, d] activations; metadata: manifest-like facts (model, hooks) for the SAE's cfg.json.
    """

    def __init__(self, acts: torch.Tensor, **metadata: Any):
        self.acts, self.d = acts, acts.shape[1]
        self.hooks = [metadata.get("hook", "acts")]
        self.manifest = {"model": metadata.get("model"), "hooks": self.hooks, **metadata}

    def __len__(self) -> int:
        return self.acts.shape[0]

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, split: str = "train",
               hook: str | None = None, start_batch: int = 0, epochs: int | None = None,
               dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
        """Batches [batch_size, d]; epoch e is a permutation seeded by (seed, e); batch i is always the same."""
        per_epoch = len(self) // batch_size
        i = start_batch
        while epochs is None or i < epochs * per_epoch:
            epoch, j = divmod(i, per_epoch)
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            rows = order[j * batch_size:(j + 1) * batch_size] if shuffle else torch.arange(j * batch_size,
                                                                                          (j + 1) * batch_size)
            yield self.acts[rows].to(dtype)
            i += 1


def source_identity(source: Any, hook: str | None) -> dict[str, Any]:
    """What a checkpoint records about its training data, so that a resume on other data is refused: the store's
    model and corpus fingerprints, the hook, the row count, and a digest of its shards (names, checksums) and split
    (None where the source does not say). Two captures of one corpus with another split or another shard layout
    (world size, shard rows) differ in the last: their batches differ."""
    manifest = getattr(source, "manifest", None) or {}
    model, corpus = manifest.get("model"), manifest.get("corpus")
    rows = len(source) if hasattr(source, "__len__") else None
    shards = manifest.get("shards")
    layout = None
    if isinstance(shards, list):
        what = {"split": manifest.get("split"), "shards": [[e.get("name"), e.get("sha256")] for e in shards
                                                           if isinstance(e, dict)]}
        layout = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return {"model": model.get("fingerprint") if isinstance(model, dict) else model,
            "corpus": corpus.get("fingerprint") if isinstance(corpus, dict) else None,
            "hook": source_metadata(source, hook)["hook_name"], "rows": rows, "shards": layout}


def source_metadata(source: Any, hook: str | None) -> dict[str, Any]:
    """model_name, hook_name, context_size, prepend_bos for cfg.json, from a store's manifest if it has them."""
    manifest = getattr(source, "manifest", None) or {}
    model = manifest.get("model")
    capture = manifest.get("capture") or {}
    hooks = getattr(source, "hooks", None) or manifest.get("hooks") or [None]
    return {"model_name": (model.get("name") or model.get("path")) if isinstance(model, dict) else model,
            "hook_name": hook or hooks[0],
            "context_size": capture.get("context_size") or capture.get("context"),
            "prepend_bos": bool(capture.get("prepend_bos", True))}


# --------------------------------------------------------------------------- distributed
@dataclass
class World:
    """This process's place in the data-parallel group (size 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_world started the process group, so close() ends it

    def close(self) -> None:
        """Wait for every rank, then end the process group this run started: a rank that exits while gloo's
        threads still run can abort ("terminate called without an active exception")."""
        if self.size > 1 and self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (nothing to do alone)."""
        if self.size > 1:
            dist.all_reduce(t)
        return t


def init_world(device: str) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or a group already initialized."""
    check_device(device)
    owns = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    size = int(os.environ.get("WORLD_SIZE", "1")) if owns else dist.get_world_size() if dist.is_initialized() else 1
    if device.startswith("cuda") and size > 1:  # this rank's GPU, set before NCCL starts
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    if owns:  # rank 0 alone runs the periodic evaluation and the export while the others wait: a long timeout
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return World(rank, size, torch.device(device), owns)


# --------------------------------------------------------------------------- the SAEs of a run
@dataclass
class Run:
    """One SAE being trained, with its optimizer and firing bookkeeping."""

    name: str
    sae: SAE
    opt: torch.optim.Optimizer
    lr: float
    lr_min: float
    k_aux: int
    since_fired: torch.Tensor  # [d_sae] int64: tokens since each latent last fired
    fire_counts: torch.Tensor  # [d_sae] int64: firings in the density window (last 10% of the steps)
    fire_tokens: int = 0

    def dead(self, threshold: int) -> torch.Tensor | None:
        """Indices [n_dead] of latents that have not fired for ``threshold`` tokens, or None."""
        dead = torch.nonzero(self.since_fired >= threshold).flatten()
        return dead if dead.numel() else None


def run_specs(cfg: TrainConfig, d_in: int) -> list[tuple[str, int, int]]:
    """(name, d_sae, k) of every SAE the config asks for; names are '' for a single SAE."""
    widths = cfg.d_sae if isinstance(cfg.d_sae, list) else [cfg.d_sae or cfg.expansion_factor * d_in]
    ks = cfg.k if isinstance(cfg.k, list) else [cfg.k]
    specs = [(f"k{k}_n{n}" if len(widths) * len(ks) > 1 else "", n, k) for n in widths for k in ks]
    for _, n, k in specs:
        if k >= n:
            raise UserError(f"k={k} must be smaller than d_sae={n} (the number of latents): lower --k or raise --d-sae")
    return specs


def make_optimizer(sae: SAE, cfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW (fused where torch has the kernel) with decay on W_enc only: biases and W_dec get none."""
    groups = [{"params": [sae.W_enc], "weight_decay": cfg.weight_decay},
              {"params": [sae.W_dec, sae.b_enc, sae.b_dec], "weight_decay": 0.0}]
    kw = dict(lr=lr, betas=cfg.betas, eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        return torch.optim.AdamW(groups, foreach=True, **kw)


def make_runs(cfg: TrainConfig, d_in: int, meta: dict[str, Any], device: torch.device) -> list[Run]:
    """Fresh SAEs (zero weights until :func:`init_runs_`), one per (d_sae, k) of the config."""
    runs = []
    for name, n, k in run_specs(cfg, d_in):
        try:
            sae = SAE(SAEConfig(d_in=d_in, d_sae=n, k=k, normalize_activations=cfg.normalize_activations, **meta),
                      device=device)
        except (RuntimeError, MemoryError) as e:  # the CPU allocator's RuntimeError, torch.OutOfMemoryError
            if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            gib = 2 * n * d_in * 4 * 4 / 2**30  # W_enc and W_dec, float32, with gradients and two Adam moments
            raise UserError(f"an SAE of {n:,} x {d_in:,} does not fit in the memory of {device} (about {gib:,.1f} "
                            "GiB with its optimizer): choose a smaller --d-sae") from None
        lr = cfg.lr or 2e-4 / math.sqrt(n / 2**14)
        lr_min = lr / 10 if cfg.lr_min is None else min(cfg.lr_min, lr)
        runs.append(Run(name, sae, make_optimizer(sae, cfg, lr), lr, lr_min, cfg.k_aux or max(1, d_in // 2),
                        torch.zeros(n, dtype=torch.long, device=device),
                        torch.zeros(n, dtype=torch.long, device=device)))
    return runs


def init_runs_(runs: list[Run], first_batch: torch.Tensor, cfg: TrainConfig) -> None:
    """OpenAI init of every SAE; b_dec is the mean of the first global batch as the SAE sees it."""
    x_norm, _, _ = normalize(first_batch, cfg.normalize_activations)
    for run in runs:
        run.sae.init_(x_norm, generator=torch.Generator().manual_seed(cfg.seed))


def lr_at(step: int, total: int, lr: float, lr_min: float, warmup_frac: float) -> float:
    """Linear warm-up over warmup_frac of the steps, then cosine from lr to lr_min (per optimizer step)."""
    warmup = int(warmup_frac * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(t, 1.0)))


# --------------------------------------------------------------------------- one step
def batch_sums(outs: list[TrainOutput], residuals: list[torch.Tensor]) -> torch.Tensor:
    """Sums whose global values give the loss denominators, as one float64 vector to all-reduce.

    Args: each SAE's forward (its xc = x̃ - b_dec: the shift keeps float32 sums of squares free of
    cancellation, and each SAE uses its own so that a sweep computes what separate runs compute) and its
    residual e = x̃ - x̂ [N, d].
    Returns: [N] then, per SAE, [Σxc (d), Σ‖xc‖², Σe (d), Σ‖e‖²].
    """
    parts = [residuals[0].new_tensor([residuals[0].shape[0]])]
    for out, e in zip(outs, residuals):
        for t in (out.xc, e):
            parts += [t.sum(0), torch.linalg.vector_norm(t).square().view(1)]
    return torch.cat(parts).double()


def split_sums(sums: torch.Tensor, d: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per SAE (total variance of x̃, Σ‖e‖², variance of e) from (global) :func:`batch_sums`."""
    count, out = sums[0], []
    for base in range(1, sums.numel(), 2 * (d + 1)):
        sx, sx2 = sums[base:base + d], sums[base + d]
        se, se2 = sums[base + d + 1:base + 2 * d + 1], sums[base + 2 * d + 1]
        out.append((sx2 - sx.pow(2).sum() / count, se2, se2 - se.pow(2).sum() / count))
    return out


def loss_grads(out: TrainOutput, e: torch.Tensor, total_var: float, resid_var: float, aux_coeff: float
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of loss = FVU + aux_coeff · aux-k w.r.t. recon and auxk_recon, and this rank's loss shares.

    FVU = Σ‖x̃ - x̂‖² / Σ‖x̃ - mean(x̃)‖² over the global batch. Aux-k (OpenAI) regresses the dead latents'
    reconstruction (no b_dec) onto the detached residual e, normalized by e's variance. Each rank's shares
    (local numerator over global denominator) sum to the global loss, so gradients are summed, not averaged.

    Args: e [N, d] residual x̃ - x̂ (overwritten with the recon gradient). Returns (g_recon [N, d],
    g_auxk [N, d] or None, this rank's aux-k share (0-dim tensor)).
    """
    if out.auxk_recon is None:
        g_auxk, aux = None, e.new_zeros(())
    else:
        g_auxk = out.auxk_recon - e  # [N, d]
        aux = torch.linalg.vector_norm(g_auxk).square() / max(resid_var, 1e-12)
        g_auxk.mul_(2 * aux_coeff / max(resid_var, 1e-12))
    return e.mul_(-2 / total_var), g_auxk, aux


def firing_counts(out: TrainOutput, n: int) -> torch.Tensor:
    """[d_sae] float32 (exact below 2^24 tokens per batch): tokens of this rank's batch on which each latent
    fired (non-zero activation)."""
    fired = out.top_indices.masked_fill(out.top_acts == 0, n)  # ReLU-clipped selections count for "latent n"
    return torch.bincount(fired.reshape(-1), minlength=n + 1)[:n].float()


def sync_(runs: list[Run], counts: list[torch.Tensor], world: World) -> None:
    """One SUM all-reduce of every gradient and every firing count (alone: nothing to do)."""
    if world.size == 1:
        return
    tensors = [p.grad for run in runs for p in run.sae.parameters()] + counts
    flat = world.all_reduce_(torch.cat([t.reshape(-1) for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def update_counters_(run: Run, counts: torch.Tensor, tokens: int, in_window: bool) -> None:
    """Advance each latent's tokens-since-fired by the global batch, resetting those that fired."""
    fired = counts > 0
    run.since_fired.add_(tokens).masked_fill_(fired, 0)
    if in_window:
        run.fire_counts.add_(counts.long())
        run.fire_tokens += tokens


def train_step(runs: list[Run], x: torch.Tensor, cfg: TrainConfig, world: World, step: int, total: int,
               global_tokens: int, outs_: list | None = None) -> list[torch.Tensor]:
    """One optimizer step of every SAE on this rank's batch x [B / world, d].

    Returns per SAE a float64 vector [fvu share, aux share, non-zero latents, tokens] of this rank (for the
    metrics; summed over ranks and steps they give global averages); ``outs_``, if given, receives each SAE's
    TrainOutput. Raises FloatingPointError on a non-finite loss before the optimizer step, on every rank alike.
    """
    x_norm, _, _ = normalize(x, cfg.normalize_activations)  # [B, d] float32
    compute_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    outs = [run.sae.forward_train(x_norm, run.dead(cfg.dead_tokens_threshold), run.k_aux, compute_dtype)
            for run in runs]
    residuals = [x_norm - out.recon for out in outs]  # [B, d] each
    local = batch_sums(outs, residuals)
    per_run = split_sums(world.all_reduce_(local.clone()) if world.size > 1 else local, x_norm.shape[1])
    if not all(math.isfinite(float(v)) for sums in per_run for v in sums):
        raise FloatingPointError("non-finite reconstruction error")
    stats, counts = [], []
    for run, out, e, (total_var, _, resid_var), (_, local_se2, _) in zip(runs, outs, residuals, per_run,
                                                                        split_sums(local, x_norm.shape[1])):
        g_recon, g_auxk, aux = loss_grads(out, e, float(total_var), float(resid_var), cfg.aux_coeff)
        run.sae.backward_train_(out, g_recon, g_auxk)
        fvu = float(local_se2) / float(total_var)
        fired = firing_counts(out, run.sae.cfg.d_sae)  # [d_sae]
        # firing counts and the loss ride along with the gradients' all-reduce
        counts.append(torch.cat([fired, (fvu + cfg.aux_coeff * aux).float().view(1)]))
        stats.append(torch.stack([aux.new_tensor(fvu, dtype=torch.float64), aux.double(), fired.sum().double(),
                                  aux.new_tensor(x.shape[0], dtype=torch.float64)]))
    sync_(runs, counts, world)
    if outs_ is not None:
        outs_.extend(outs)
    for run, count in zip(runs, counts):
        if not bool(torch.isfinite(count[-1])):  # the global loss: every rank decides alike
            raise FloatingPointError(f"non-finite loss {count[-1].item()}")
        optimizer_step_(run, lr_at(step, total, run.lr, run.lr_min, cfg.warmup_frac))
        update_counters_(run, count[:-1], global_tokens, in_window=step >= int(0.9 * total))
    return stats


def optimizer_step_(run: Run, lr: float) -> None:
    """Project the decoder gradient, take the AdamW step at ``lr``, renormalize the decoder."""
    run.sae.project_decoder_grad_()
    for group in run.opt.param_groups:
        group["lr"] = lr
    run.opt.step()
    run.sae.normalize_decoder_()
    run.sae.weights_changed()  # fused AdamW leaves the version counters alone


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, runs: list[Run], cfg: TrainConfig, d_in: int, step: int, extra: dict) -> None:
    """Everything a restarted run needs to continue bit for bit, written atomically (temp file + rename)."""
    state = {"version": 1, "config": cfg.model_dump(mode="json"), "d_in": d_in, "step": step,
             "loader_batches": step, "rng": torch.get_rng_state(), "extra": extra,
             "runs": {run.name: {"sae": run.sae.state_dict(), "optimizer": run.opt.state_dict(),
                                 "since_fired": run.since_fired, "fire_counts": run.fire_counts,
                                 "fire_tokens": run.fire_tokens} for run in runs}}
    with atomic_writer(path) as f:
        torch.save(state, f)


def config_mismatch(saved: dict[str, Any], cfg: TrainConfig) -> str | None:
    """The first setting (other than RUN_ONLY ones) that differs between a checkpoint and this run."""
    now = cfg.model_dump(mode="json")
    for key in sorted(set(saved) | set(now)):
        if key not in RUN_ONLY and saved.get(key) != now.get(key):
            return f"{key}={saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
    return None


def _crc_failure(path: Path) -> str | None:
    """The first entry of the zip archive torch.save wrote whose data fails its CRC-32, or None (also for a file
    that is no zip archive: torch.load says what it is). An entry with CRC 0 is skipped: torch writes that when
    told not to compute CRCs (torch.utils.serialization.config.save.compute_crc32 = False)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC:
                    try:
                        with archive.open(info) as f:  # zipfile checks the CRC as the entry is read to its end
                            while f.read(1 << 24):
                                pass
                    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError):
                        return info.filename  # (short data, an unsupported compression or encryption: damage too)
    except (zipfile.BadZipFile, OSError):
        return None
    return None


def load_checkpoint(path: Path, runs: list[Run], cfg: TrainConfig, d_in: int) -> tuple[int, dict]:
    """Restore ``runs`` from ``path``; returns (completed steps, extra). Refuses another config or width."""
    fix = f"train into a new --out, or empty {path.parent} to start over there"
    damaged = _crc_failure(path)  # torch.load does not check the archive's CRCs: a damaged byte would be trained on
    if damaged is not None:
        raise UserError(f"checkpoint {path} is damaged (its entry {damaged} fails its CRC check): {fix}")
    try:
        state = torch.load(path, map_location=runs[0].sae.W_enc.device, weights_only=True)
    except Exception as e:  # a truncated file cannot come from atomic writes, but say what to do anyway
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): {fix}") from None
    shape = {"config": dict, "d_in": int, "step": int, "runs": dict, "extra": dict, "rng": torch.Tensor}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in shape.items()):
        raise UserError(f"{path} is not a llama-sae training checkpoint: {fix}")
    if state["d_in"] != d_in:
        raise UserError(f"the store has width d={d_in} but checkpoint {path} was trained on d={state['d_in']}: "
                        "use the store it was trained on, or a new --out")
    diff = config_mismatch(state["config"], cfg)
    if diff is not None:
        raise UserError(f"checkpoint {path} was written with another config ({diff}): use the same options, "
                        "or a new --out")
    if any(run.name not in state["runs"] for run in runs):
        raise UserError(f"checkpoint {path} holds SAEs {', '.join(state['runs'])}, not these: {fix}")
    for run in runs:
        saved = state["runs"][run.name]
        run.sae.load_state_dict(saved["sae"])
        run.opt.load_state_dict(saved["optimizer"])
        run.since_fired.copy_(saved["since_fired"])
        run.fire_counts.copy_(saved["fire_counts"])
        run.fire_tokens = saved["fire_tokens"]
    torch.set_rng_state(state["rng"].cpu())  # map_location moved it to the SAEs' device; the CPU generator's state
    return state["step"], state["extra"]


def check_finite_(runs: list[Run]) -> None:
    """Raise FloatingPointError if any weight is NaN or inf (never checkpoint a diverged run)."""
    for run in runs:
        for p in run.sae.parameters():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError("non-finite weights")


# --------------------------------------------------------------------------- metrics
class MetricsLog:
    """metrics.jsonl (one record per SAE every log_every steps), optionally mirrored to W&B. Rank 0 only.

    On resume, records past the checkpoint's step (written before a crash) are dropped first.
    """

    def __init__(self, out: Path, resume_step: int, cfg: TrainConfig, wandb_id: str | None):
        self.path = out / METRICS
        self.wandb = start_wandb(out, cfg, wandb_id) if cfg.wandb else None  # first: it may refuse to start
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.file.write(json.dumps(r) + "\n")
            if self.wandb is not None:
                prefix = f"{r['sae']}/" if r["sae"] else ""
                self.wandb.log({prefix + key: value for key, value in r.items() if key not in ("sae", "step")},
                               step=r["step"])
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl or eval.jsonl (a torn last line from a killed run is skipped, and so is a
    line that is no record of a step: a hand edit)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
            records.append(record)
    return records


def start_wandb(out: Path, cfg: TrainConfig, run_id: str | None):
    """A W&B run (resumed when ``run_id`` is set); the mode follows WANDB_MODE (e.g. offline)."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
    try:
        return wandb.init(project=cfg.wandb_project, name=out.name, dir=str(out), id=run_id, resume="allow",
                          config=cfg.model_dump(mode="json"))
    except Exception as e:  # wandb's own UsageError (no API key), network errors, ...
        raise UserError(f"--wandb could not start a W&B run ({type(e).__name__}: {first_line(e)}): run `wandb "
                        "login` or set WANDB_API_KEY, or WANDB_MODE=offline to log locally, or drop --wandb") from e


def metric_records(runs: list[Run], acc: list[torch.Tensor], steps: int, step: int, tokens: int,
                   seconds: float, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One record per SAE from the global step statistics summed over the last ``steps`` steps."""
    records = []
    for run, a in zip(runs, acc):
        fvu, aux, nnz, count = (float(v) for v in a)
        records.append({"step": step, "tokens": tokens, "sae": run.name, "loss": (fvu + cfg.aux_coeff * aux) / steps,
                        "fvu": fvu / steps, "aux_loss": aux / steps, "l0": nnz / max(count, 1.0),
                        "dead_frac": float((run.since_fired >= cfg.dead_tokens_threshold).float().mean()),
                        "lr": run.opt.param_groups[0]["lr"], "tokens_per_s": count / max(seconds, 1e-9)})
    return records


def plot_metrics(out: Path, file: str = METRICS,
                 keys: tuple[str, ...] = ("loss", "fvu", "aux_loss", "l0", "dead_frac", "lr", "tokens_per_s"),
                 prefix: str = "") -> list[Path]:
    """PNG plots (plots/PREFIXNAME.png) of each metric in ``keys`` of out/FILE (a JSONL), one line per SAE."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    records = [r for r in read_metrics(out / file) if isinstance(r.get("sae"), str) and "tokens" in r]
    (out / "plots").mkdir(exist_ok=True)
    written = []
    for key in keys:
        records_of_key = [r for r in records if isinstance(r.get(key), int | float)]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in dict.fromkeys(r["sae"] for r in records_of_key):
            rs = [r for r in records_of_key if r["sae"] == name]
            marker = "o" if len(rs) < 20 else None  # a short run has too few points for a line
            ax.plot([r["tokens"] for r in rs], [r[key] for r in rs], label=name or None, marker=marker)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(key)
        if key in ("loss", "fvu", "aux_loss") and all(r[key] > 0 for r in records_of_key):
            ax.set_yscale("log")
        if any(r["sae"] for r in records):
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "plots" / f"{prefix}{key}.png"
        with atomic_writer(path) as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- the run
def total_steps(source: Any, cfg: TrainConfig) -> int:
    """Optimizer steps: tokens // batch_size, or epochs x the split's full batches."""
    if cfg.tokens is not None:
        steps = cfg.tokens // cfg.batch_size
    else:
        rows = source.rows(cfg.split) if callable(getattr(source, "rows", None)) else len(source)
        steps = cfg.epochs * (rows // cfg.batch_size)
    if steps == 0:
        raise UserError(f"fewer tokens than one batch of {cfg.batch_size}: lower --batch-size or train on more tokens")
    return steps


def prepare_out(out: Path, runs: list[Run], cfg: TrainConfig, d_in: int, world: World,
                source: dict | None = None) -> tuple[int, dict]:
    """Resume from out/checkpoint.pt, or check that ``out`` is new or empty. Returns (step, extra).

    ``source``: what the run trains on (:func:`source_identity`); a checkpoint of another source is refused.
    Temp files a killed write left behind are removed first (rank 0).
    """
    if world.rank == 0:
        sweep_temp_files(out, recursive=True)
    if world.size > 1:
        dist.barrier()
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        step, extra = load_checkpoint(ckpt, runs, cfg, d_in)
        was = extra.get("source")
        changed = [] if source is None or was is None else \
            [k for k in source if k in was and was[k] != source[k]]  # (a checkpoint of an older version lacks keys)
        if changed:
            what = ", ".join(f"{k} {short_hash(was.get(k))} (now {short_hash(source.get(k))})" for k in changed)
            raise UserError(f"checkpoint {ckpt} was trained on other activations ({what}): resume it with the "
                            "store it started on, or train into a new --out")
        return step, extra
    from llama_sae.sae.evaluate import EVAL_LOG

    early = {METRICS, EVAL_LOG}  # what a run that stopped before its first checkpoint leaves behind
    found = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if found - early:
        raise UserError(f"{out} is not empty and holds no {CHECKPOINT} to resume from: choose a new --out "
                        "(nothing was overwritten)")
    if world.size > 1:
        dist.barrier()  # every rank has looked before rank 0 creates files
    for name in found & early:  # that run starts over from step 0, and so do its logs
        if world.rank == 0:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return 0, {}


class Progress:
    """A rich progress bar with ETA on rank 0 (or nothing)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("[bold]train[/bold] {task.description}"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn())
            self.task = self.bar.add_task("", total=total, completed=done)
            self.bar.start()

    def update(self, step: int, records: list[dict[str, Any]] | None = None) -> None:
        if self.bar is None:
            return
        text = None
        if records:
            r = records[0]
            text = (f"fvu {r['fvu']:.4f}  L0 {r['l0']:.1f}  dead {100 * r['dead_frac']:.1f}%  "
                    f"{r['tokens_per_s']:,.0f} tok/s" + (f"  (+{len(records) - 1} SAEs)" if len(records) > 1 else ""))
        self.bar.update(self.task, completed=step, **({"description": text} if text else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def export(out: Path, runs: list[Run], cfg: TrainConfig, d_in: int, total: int,
           model_fingerprint: str | None = None) -> list[Path]:
    """Write every SAE (SAELens v6 directory, with its sparsity) and train_config.yaml; returns the SAE dirs.
    ``model_fingerprint``: the store's checkpoint fingerprint, kept in the metadata (evaluate compares it)."""
    from llama_sae import __version__

    dirs = []
    for run in runs:
        path = out / run.name if run.name else out
        density = run.fire_counts.double() / max(run.fire_tokens, 1)
        formats.save(run.sae, path, sparsity=torch.log10(density + 1e-10), trained_tokens=total * cfg.batch_size,
                     trained_with=f"llama-sae {__version__}",
                     **({"model_fingerprint": model_fingerprint} if model_fingerprint else {}))
        dirs.append(path)
    resolved = "".join(f"#   {run.name or 'sae'}: d_sae={run.sae.cfg.d_sae} k={run.sae.cfg.k} lr={run.lr:.3g} "
                       f"lr_min={run.lr_min:.3g} k_aux={run.k_aux}\n" for run in runs)
    header = f"# llama-sae train config (pass it back with --config). Resolved: d_in={d_in}, steps={total}\n"
    atomic_write(out / CONFIG_FILE, header + resolved + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return dirs


def train_sae(source: Any, cfg: TrainConfig, out: str | os.PathLike, *, progress: bool = True) -> list[Path]:
    """Train (or resume) every SAE of ``cfg`` on ``source`` into ``out``; returns the SAE directories.

    Args:
        source: anything with ``.d`` and ``.loader(batch_size, *, shuffle, seed, split, hook, start_batch,
            dtype)`` yielding float [batch_size, d] batches (an ActivationStore, a TensorSource).
        cfg: the training config.
        out: output directory: an SAE (SAELens v6 layout) for one SAE, one sub-directory per SAE for a sweep,
            plus checkpoint.pt, metrics.jsonl, train_config.yaml and plots/.
        progress: show a progress bar with ETA (rank 0).
    Raises:
        UserError: bad config, a non-empty ``out`` without checkpoint, a checkpoint of another config or
            width, a diverged run (the last good checkpoint is kept; no SAE is written).
    Example:
        >>> train_sae(TensorSource(acts), TrainConfig(d_sae=2048, k=32, tokens=2_000_000), "runs/sae")
    """
    out, world = Path(out), init_world(cfg.device)
    if cfg.batch_size % world.size:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {world.size} ranks: use a multiple")
    runs = make_runs(cfg, source.d, source_metadata(source, cfg.hook), world.device)
    total = total_steps(source, cfg)
    identity = source_identity(source, cfg.hook)
    lock = lock_output(out, f"the training run {out}") if world.rank == 0 else None  # two runs: one SAE lost
    try:
        created = not out.exists()
        step, extra = prepare_out(out, runs, cfg, source.d, world, identity)
        extra.setdefault("source", identity)
        if step and world.rank == 0 and progress:
            print(f"resumed from {out / CHECKPOINT}: step {step:,} of {total:,}", flush=True)
        if world.rank != 0 and hasattr(source, "verify_reads"):
            source.verify_reads = False  # every rank reads every shard: rank 0 checks their sha256 for all of them
        log = None
        try:  # set-up: a bad first shard, eval model or eval corpus leaves no new, empty --out behind
            batches = iter(source.loader(cfg.batch_size, shuffle=True, seed=cfg.seed, split=cfg.split, hook=cfg.hook,
                                         start_batch=step, dtype=torch.float32))
            if step == 0:
                first = next(batches)
                init_runs_(runs, first.to(world.device), cfg)
                batches = _chain(first, batches)
            log = MetricsLog(out, step, cfg, extra.get("wandb_id")) if world.rank == 0 else None
            if log is not None and log.wandb is not None:
                extra["wandb_id"] = log.wandb.id
            evaluator = training_eval(cfg, out, step, runs) if world.rank == 0 else None
        except BaseException:
            if log is not None:
                log.close()
            if created and world.rank == 0:
                _remove_new_out(out)
            raise
        try:
            return _train_loop(runs, batches, cfg, world, step, total, out, log, extra, evaluator, progress, identity,
                               source.d)
        except BaseException:
            if created and world.rank == 0 and not (out / CHECKPOINT).exists():
                _remove_new_out(out)  # (a log with records stays: a run that diverged at once is read from it)
            raise
    finally:
        if lock is not None:
            lock.release()


def _train_loop(runs, batches, cfg: TrainConfig, world, step: int, total: int, out: Path, log, extra: dict,
                evaluator, progress: bool, identity: dict, d_in: int) -> list[Path]:
    """The steps of :func:`train_sae` from ``step`` on, its evaluations and the export of the SAEs."""
    if evaluator is not None and 0 < step < total and step % cfg.log_every == 0:
        # the checkpoint at a record step is written before that step's evaluation: a run killed during it owes it
        evaluator.maybe(runs, step, step * cfg.batch_size)
    bar = Progress(progress and world.rank == 0, total, step)
    pos = Position(step, step)
    try:
        with StopOnInterrupt(world.size == 1) as stop:
            while pos.step < total:
                recorded = train_interval(runs, batches, cfg, world, pos, total, out, log, bar, extra, stop)
                if evaluator is not None and recorded:  # even after a Ctrl-C: a resume would skip one due here
                    evaluator.maybe(runs, pos.step, pos.step * cfg.batch_size)
                if stop.requested and pos.step < total:  # Ctrl-C: keep the whole steps done, then stop
                    if pos.saved != pos.step:
                        _checkpoint(runs, cfg, world, pos, out, extra)
                    raise Interrupted(f"interrupted at step {pos.step:,} of {total:,}: checkpoint written to "
                                      f"{out / CHECKPOINT}; the same command resumes from it")
    except FloatingPointError as e:
        where = (f"the last good checkpoint (step {pos.saved}) is kept in {out / CHECKPOINT}" if pos.saved
                 else "no checkpoint was written yet")
        raise UserError(f"training diverged at step {pos.step + 1} ({e}): lower --lr or look for inf/NaN in the "
                        f"store; {where} and no SAE was written") from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    if world.rank != 0:
        world.close()  # waits for rank 0's export
        return []
    try:
        fingerprint = identity["model"] if isinstance(identity["model"], str) else None
        dirs = export(out, runs, cfg, d_in, total, fingerprint)
        if evaluator is not None:
            evaluator.final(runs, dirs, total, total * cfg.batch_size, plots=cfg.plots)
        if cfg.plots:
            plot_metrics(out)
    finally:
        world.close()
    return dirs


def training_eval(cfg: TrainConfig, out: Path, step: int, runs: list[Run]):
    """The spliced evaluation of a model-loaded run (None without cfg.eval_model), checked against the SAEs."""
    if cfg.eval_model is None:
        return None
    from llama_sae.sae.evaluate import TrainingEval

    evaluator = TrainingEval(cfg.eval_model, cfg.eval_corpus, cfg.eval_texts, cfg.eval_every, out, step,
                             device=str(runs[0].sae.W_enc.device))
    evaluator.check(run.sae for run in runs)
    return evaluator


def _remove_new_out(out: Path) -> None:
    """Remove the --out a run created and stopped in before its first checkpoint, if it holds nothing but empty
    logs: no new, empty folder is left behind."""
    from llama_sae.sae.evaluate import EVAL_LOG

    for name in (METRICS, EVAL_LOG):
        with contextlib.suppress(OSError):
            if (out / name).stat().st_size == 0:
                (out / name).unlink()
    with contextlib.suppress(OSError):  # (something else in it: left as it is)
        out.rmdir()


def _chain(first: torch.Tensor, rest: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after a whole step, with a checkpoint of that step written."""


class StopOnInterrupt:
    """While training (one process, main thread), Ctrl-C asks the loop to stop after the current step and write
    a checkpoint there; a second Ctrl-C stops at once. Elsewhere (several ranks, which must stop at the same
    step) Ctrl-C keeps its default: the run resumes from its last periodic checkpoint."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopOnInterrupt:
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._old)


@dataclass
class Position:
    """Completed optimizer steps (= loader batches consumed) and the step of the last checkpoint (0: none)."""

    step: int
    saved: int


def train_interval(runs: list[Run], batches: Iterator[torch.Tensor], cfg: TrainConfig, world: World, pos: Position,
                   total: int, out: Path, log: MetricsLog | None, bar: Progress, extra: dict,
                   stop: StopOnInterrupt | None = None) -> bool:
    """Steps up to the next metrics record (advancing ``pos``), checkpointing on the way; then the record.
    Returns whether the record was written (not when a Ctrl-C stopped the interval between records).

    A record averages over the steps since the previous record, or since the resume for the first one. A
    checkpoint due at the record's own step is written after the record: a kill between the two then costs the
    steps since the previous checkpoint, never the record (a resume drops records past its checkpoint).
    """
    acc = [torch.zeros(4, dtype=torch.float64, device=world.device) for _ in runs]
    per_rank = cfg.batch_size // world.size
    start, t0 = pos.step, time.perf_counter()
    while pos.step < total and (pos.step == start or pos.step % cfg.log_every):
        x = next(batches)[world.rank * per_rank:(world.rank + 1) * per_rank].to(world.device, non_blocking=True)
        for a, s in zip(acc, train_step(runs, x, cfg, world, pos.step, total, cfg.batch_size)):
            a += s
        pos.step += 1
        record_step = pos.step == total or pos.step % cfg.log_every == 0
        if pos.step % cfg.checkpoint_every == 0 and not record_step:
            _checkpoint(runs, cfg, world, pos, out, extra)
        bar.update(pos.step)
        if stop is not None and stop.requested and not record_step:
            return False  # Ctrl-C between records: the caller checkpoints this step (a resume's records start here)
    for a in acc:
        world.all_reduce_(a)
    records = metric_records(runs, acc, pos.step - start, pos.step, pos.step * cfg.batch_size,
                             time.perf_counter() - t0, cfg)
    if log is not None:
        log.write(records)
    if pos.step % cfg.checkpoint_every == 0 or pos.step == total:
        _checkpoint(runs, cfg, world, pos, out, extra)
    bar.update(pos.step, records)
    return True


def _checkpoint(runs: list[Run], cfg: TrainConfig, world: World, pos: Position, out: Path, extra: dict) -> None:
    """Check the weights are finite (every rank), then write the checkpoint (rank 0)."""
    check_finite_(runs)
    if world.rank == 0:
        save_checkpoint(out / CHECKPOINT, runs, cfg, runs[0].sae.cfg.d_in, pos.step, extra)
    pos.saved = pos.step


def train(store: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig, *, progress: bool = True) -> list[Path]:
    """``llama-sae train``: open the activation store at ``store`` and run :func:`train_sae`."""
    from llama_sae.store import ActivationStore

    source = ActivationStore(store)
    source.hook(cfg.hook)  # a wrong hook fails here, with the store's own message
    return train_sae(source, cfg, out, progress=progress)
