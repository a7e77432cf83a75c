"""Train the tinyworld model: a small Llama 3 (our own code) on the planted-concept corpus.

    llama-sae tinyworld train --out runs/tinyworld-model          # ~15 min on 2 CPU cores
    llama-sae tinyworld train --out runs/tinyworld-model          # again after a crash: resumes

The data stream is a pure function of (seed, chunk index): documents (``BOS text EOS``), chat
dialogues in the Llama 3 format, and single sentences, tokenized and packed into rows of
``context + 1`` tokens. A checkpoint holds the weights, the optimizer, the step and the RNG, so a
restarted run continues with exactly the batches it had not seen.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from llama_sae.errors import UserError, check_output_dir
from llama_sae.fileio import atomic_write_json, atomic_writer
from llama_sae.llama.model import ModelArgs, RopeScaling, Transformer


class TinyTrainConfig(BaseModel):
    """Shape of the tiny model and its training run."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    vocab_size: int = Field(4096, description="BPE vocabulary size (special tokens included)")
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    context: int = Field(128, description="tokens per training row")
    batch_rows: int = Field(32, description="rows per optimizer step")
    steps: int = 1000
    lr: float = 3e-3
    lr_min: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    rows_per_chunk: int = Field(256, description="rows generated at once (a multiple of batch_rows)")
    eval_rows: int = 128
    checkpoint_every: int = 100
    bf16: bool = Field(True, description="bf16 autocast (fp32 master weights): much faster on AMX CPUs")
    tokenizer_sentences: int = 60_000

    def model_args(self) -> ModelArgs:
        """The Llama shape, with the Llama 3.2 RoPE ("llama3", factor 32) and tied embeddings."""
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                         vocab_size=self.vocab_size, multiple_of=64, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True, max_seq_len=2048)


# --------------------------------------------------------------------------- data
def _chunk_seed(seed: int, chunk: int, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}:{split}".encode()).digest()[:4], "little")


def _examples(tokenizer, seed: int, split: str, n: int) -> list[list[int]]:
    """About ``n`` tokenized examples: 55% documents, 25% dialogues, 20% single sentences."""
    from llama_sae import tinyworld

    eos = tokenizer.eos_id
    docs = tinyworld.documents(int(n * 0.55), seed=seed, split=split)
    dialogues = tinyworld.dialogues(int(n * 0.25), seed=seed, split=split)
    sents = tinyworld.sentences(int(n * 0.20), seed=seed, split=split)
    out = [tokenizer.encode(d.text, bos=True) + [eos] for d in docs]
    out += [tokenizer.encode(s.text, bos=True) + [eos] for s in sents]
    for d in dialogues:
        *asked, answer = d.messages
        out.append(tokenizer.encode_chat(asked) + tokenizer.encode(answer["content"], bos=False)
                   + [tokenizer.eot_id])
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))
    return [out[i] for i in order.tolist()]


def make_chunk(tokenizer, cfg: TinyTrainConfig, chunk: int, split: str = "train") -> torch.Tensor:
    """Rows [rows_per_chunk, context + 1] of packed tokens; a pure function of (seed, chunk, split)."""
    seed = _chunk_seed(cfg.seed, chunk, split)
    need = cfg.rows_per_chunk * (cfg.context + 1)
    stream: list[int] = []
    while len(stream) < need:
        for ex in _examples(tokenizer, seed, split, 400):
            stream.extend(ex)
        seed += 1
    return torch.tensor(stream[:need], dtype=torch.long).view(cfg.rows_per_chunk, cfg.context + 1)


def batch_for_step(tokenizer, cfg: TinyTrainConfig, step: int, cache: dict) -> torch.Tensor:
    """Rows [batch_rows, context + 1] for optimizer step ``step`` (chunks are cached one at a time)."""
    per_chunk = cfg.rows_per_chunk // cfg.batch_rows
    chunk, offset = divmod(step, per_chunk)
    if cache.get("index") != chunk:
        cache.update(index=chunk, rows=make_chunk(tokenizer, cfg, chunk))
    return cache["rows"][offset * cfg.batch_rows:(offset + 1) * cfg.batch_rows]


# --------------------------------------------------------------------------- model and optimizer
def init_weights_(model: Transformer, seed: int) -> None:
    """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers), norms at 1."""
    g = torch.Generator().manual_seed(seed)
    std_out = 0.02 / math.sqrt(2 * model.args.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = std_out if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_optimizer(model: Transformer, cfg: TinyTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (no decay on norm weights)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(step: int, cfg: TinyTrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr_min."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * min(t, 1.0)))


def lm_loss(model: Transformer, rows: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over rows [B, T+1]."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(rows[:, :-1])  # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model: Transformer, tokenizer, cfg: TinyTrainConfig) -> float:
    """Mean next-token loss on ``eval_rows`` held-out rows (fp32)."""
    rows = make_chunk(tokenizer, cfg.model_copy(update={"rows_per_chunk": cfg.eval_rows}), 0, "heldout")
    losses = [lm_loss(model, rows[i:i + 32], bf16=False).item() for i in range(0, len(rows), 32)]
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, model, opt, step: int, cfg: TinyTrainConfig, history: list) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "config": cfg.model_dump(), "rng": torch.get_rng_state(), "history": history}
    with atomic_writer(path) as f:
        torch.save(state, f)


def _load_checkpoint(path: Path, model, opt, cfg: TinyTrainConfig) -> tuple[int, list]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != cfg.model_dump():
        saved, now = state["config"], cfg.model_dump()
        changed = ", ".join(f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
                            if saved.get(k) != now.get(k))
        raise UserError(f"{path} was written with another configuration: {changed}; the learning-rate schedule "
                        "and data stream follow the configuration, so a run cannot change it midway: use the same "
                        "options, or a new --out directory")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["history"]


# --------------------------------------------------------------------------- the run
def train(out: str | Path, cfg: TinyTrainConfig | None = None, *, progress: bool = True, log_every: int = 0
          ) -> Path:
    """Train (or resume) the tiny model in ``out``; writes the HF checkpoint to ``out/model``.

    ``progress`` shows a progress bar; ``log_every`` > 0 also prints a plain line every so many steps
    (for logs that are not a terminal).
    """
    from llama_sae import tinyworld
    from llama_sae.llama.checkpoint import save_hf
    from llama_sae.llama.tokenizer import load_tokenizer

    cfg = cfg or TinyTrainConfig()
    out = Path(out)
    check_output_dir(out, "a tinyworld training run", ours={"tokenizer", "checkpoint.pt", "model"})
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        texts = [s.text for s in tinyworld.sentences(cfg.tokenizer_sentences, seed=cfg.seed)]
        texts += [m["content"] for d in tinyworld.dialogues(2000, seed=cfg.seed) for m in d.messages]
        tinyworld.train_bpe_tokenizer(texts, tok_dir, vocab_size=cfg.vocab_size)
    tokenizer = load_tokenizer(tok_dir)
    model = Transformer(cfg.model_args())
    init_weights_(model, cfg.seed)
    opt = make_optimizer(model, cfg)
    ckpt = out / "checkpoint.pt"
    step, history = (0, [])
    if ckpt.exists():
        step, history = _load_checkpoint(ckpt, model, opt, cfg)
        if progress or log_every:
            done = "finished, " if step >= cfg.steps else ""
            print(f"resumed from {ckpt}: {done}step {step:,} of {cfg.steps:,}", flush=True)
    model.train()
    cache: dict = {}
    t0, tokens_per_step, first = time.perf_counter(), cfg.batch_rows * cfg.context, step
    bar = _progress(progress and step < cfg.steps, cfg.steps, step, history[-1][1] if history else float("nan"))
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = lm_loss(model, batch_for_step(tokenizer, cfg, step, cache), cfg.bf16)
        if not torch.isfinite(loss):
            raise UserError(f"training diverged at step {step} (loss {loss.item()}): lower --lr; "
                            f"the last good checkpoint is {ckpt}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append([step, round(loss.item(), 4)])
        rate = tokens_per_step * (step - first) / max(1e-9, time.perf_counter() - t0)  # this process's steps
        bar.update(step, loss.item(), rate)
        if log_every and step % log_every == 0:
            eta = (cfg.steps - step) * tokens_per_step / rate
            print(f"step {step}/{cfg.steps} loss {loss.item():.4f} {rate:,.0f} tok/s eta {eta / 60:.1f} min",
                  flush=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, model, opt, step, cfg, history)
    bar.close()
    model.eval()
    final = {"steps": step, "train_tokens": step * tokens_per_step, "heldout_loss": heldout_loss(model, tokenizer, cfg)}
    final["heldout_perplexity"] = math.exp(final["heldout_loss"])
    model_dir = save_hf(model.to(torch.bfloat16), out / "model", tokenizer_dir=tok_dir)
    atomic_write_json(model_dir / "training.json", {"config": cfg.model_dump(), **final,
                                                     "loss_history": history[:: max(1, len(history) // 200)]})
    return model_dir


class _progress:
    """A rich progress bar with loss, tokens/s and ETA (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int, loss: float = float("nan")):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("loss {task.fields[loss]:.3f}  {task.fields[rate]:,.0f} tok/s"),
                                TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=done, loss=loss, rate=0.0)

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
