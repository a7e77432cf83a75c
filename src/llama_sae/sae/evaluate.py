"""How good is an SAE? Reconstruction metrics on activations, and what the model loses when it runs on them.

Activation metrics (held-out rows of a store, or any batches [N, d_in]):
    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²,  MSE, cosine(x, x̂), L0 (non-zero latents per token),
    dead latents (never fired in the evaluated tokens), dense latents (fire on > 10% of tokens),
    and the firing-frequency histogram.
Model metrics (token batches through the Llama with the SAE spliced in at its hook point):
    CE clean, CE spliced (the model runs on x̂, no error term), CE zero-ablated (the hook point set to 0),
    CE recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean), the same against mean ablation (the hook
    point set to its mean activation over all the texts), and KL(clean ‖ spliced) per position. The SAE and the
    ablations replace the real tokens after BOS (the tokens an SAE is trained on; BOS keeps its activation).
    The four forwards share the blocks before the hook's: those run once per batch (plus once for the ablation
    mean, unless the caller passes it from the activations it already has).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_sae.errors import UserError
from llama_sae.fileio import atomic_write, atomic_write_json, atomic_writer
from llama_sae.sae.model import SAE

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens is "dense"
EVAL_LOG = "eval.jsonl"  # the trainer's periodic spliced evaluations, one record per SAE and evaluation
EVAL_REPORT = "evaluation.json"  # the final evaluation, next to the SAE's weights
LOGIT_CHUNK = 1 << 24  # float32 logits per chunk of the CE / KL math (64 MiB: 130 positions of a 128k vocabulary)


@torch.no_grad()
def activation_metrics(sae: SAE, batches: Iterable[Tensor], *, dense_threshold: float = DENSE_THRESHOLD) -> dict:
    """Reconstruction metrics of ``sae`` over batches of activations [N, d_in].

    Returns a dict: tokens, fvu, mse, cosine, l0, dead/dense counts and fractions (with thresholds),
    and ``frequency`` (per-latent firing frequency, a list of d_sae floats). Batches on another device than
    the SAE are moved to the SAE's.
    """
    n_lat, device = sae.cfg.d_sae, sae.W_enc.device
    fires = torch.zeros(n_lat, dtype=torch.float64, device=device)
    sq_err = cos = l0 = 0.0
    sum_x_vec = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    sum_sq_vec = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    tokens = 0
    for x in batches:
        x = x.to(device, torch.float32)
        x_hat, vals, idx = sae.forward_topk(x)
        active = vals > 0
        fires.index_add_(0, idx[active], torch.ones(int(active.sum()), dtype=torch.float64, device=device))
        l0 += float(active.sum())
        sq_err += float((x - x_hat).double().pow(2).sum())
        sum_x_vec += x.double().sum(0)
        sum_sq_vec += x.double().pow(2).sum(0)
        cos += float(F.cosine_similarity(x, x_hat, dim=-1).double().sum())
        tokens += x.shape[0]
    if tokens == 0:
        raise UserError("no activations to evaluate: the held-out set is empty; give it some tokens")
    total_var = float((sum_sq_vec - sum_x_vec.pow(2) / tokens).sum())
    if total_var <= 0:
        raise UserError(f"the {tokens} evaluated activations are all equal: FVU is undefined; evaluate on more "
                        "(and different) tokens")
    freq = fires / tokens
    dead, dense = int((fires == 0).sum()), int((freq > dense_threshold).sum())
    return {"tokens": tokens, "fvu": sq_err / total_var, "explained_variance": 1 - sq_err / total_var,
            "mse": sq_err / (tokens * sae.cfg.d_in), "cosine": cos / tokens, "l0": l0 / tokens,
            "dead": dead, "dead_fraction": dead / n_lat, "dead_rule": f"no activation in {tokens:,} tokens",
            "dense": dense, "dense_fraction": dense / n_lat, "dense_threshold": dense_threshold,
            "dense_rule": f"fires on > {dense_threshold:.0%} of tokens",
            "frequency": freq.cpu().tolist()}


def position_metrics(clean: Tensor, recon: Tensor, *others: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per position, from logits [B, T, V] of the clean and spliced model and any others (the ablations) on
    tokens [B, T]: the next-token NLL of each, [2 + len(others), B, T-1], and KL(clean ‖ spliced), [B, T],
    float32.

    The softmax math runs in float32 over at most LOGIT_CHUNK logits at a time: with Llama 3's 128k vocabulary a
    whole batch in float32 would be several copies of 1 GB.
    """
    B, T, V = clean.shape
    targets = F.pad(tokens[:, 1:], (0, 1)).reshape(-1, 1)  # [B·T, 1]; the last position's target is a dummy
    logits = [t.reshape(B * T, V) for t in (clean, recon, *others)]
    nll, kl = torch.empty(len(logits), B * T, device=clean.device), torch.empty(B * T, device=clean.device)
    step = max(1, LOGIT_CHUNK // V)
    for s in range(0, B * T, step):
        rows = slice(s, s + step)
        logps = [F.log_softmax(t[rows].float(), -1) for t in logits]
        for i, lp in enumerate(logps):
            nll[i, rows] = -lp.gather(-1, targets[rows])[:, 0]
        kl[rows] = (logps[0].exp() * (logps[0] - logps[1])).sum(-1)
    return nll.view(len(logits), B, T)[:, :, :-1], kl.view(B, T)


@torch.no_grad()
def model_metrics(model, sae: SAE, token_batches: Iterable[tuple[Tensor, Tensor]],
                  compute_dtype: torch.dtype | None = None, mean: Tensor | None = None) -> dict:
    """CE clean / spliced / zero- and mean-ablated, CE recovered and KL, over batches of (tokens [B, T], mask [B, T]).

    ``mask`` marks real tokens (right padding is False). The SAE replaces the hook's activations at the real tokens
    after BOS, the tokens it was trained on (a store never holds BOS, whose residual norm is many times the others';
    SAELens's evaluation leaves special tokens alone too); the ablations replace the same tokens, with zeros or with
    the mean of those tokens' activations over all the texts (one mean, whatever the batching). A position counts
    when it predicts a real token: CE and KL(clean ‖ spliced) are means over the same positions. Batches move to the
    model's device; the SAE must be on it. Returns totals plus ``kl_by_position`` (at index t, the mean KL of the
    prediction made at position t, of token t + 1, for a per-position plot).
    ``compute_dtype`` bfloat16 runs the SAE's encoder GEMM in bf16 (see :meth:`SAE.select`). ``mean`` [d]: the
    mean-ablation value when the caller has it (:func:`rows_mean` of the texts' :func:`hook_activations`), else a
    first pass over the batches takes it.
    """
    from llama_sae.llama.model import parse_hook_name
    from llama_sae.splice import check_fits, splice_fn

    hook = check_fits(model, sae)
    kind, layer = parse_hook_name(hook, model.args.n_layers)
    point = hook
    if kind == "resid_post" and layer + 1 < model.args.n_layers:
        layer, point = layer + 1, f"resid_pre.{layer + 1}"  # the same tensor, one block later
    batches = list(token_batches)
    if mean is None:
        mean = rows_mean(hook_activations(model, hook, batches))  # [d]
    splice = splice_fn(sae, error_term=False, compute_dtype=compute_dtype)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0}
    kl_pos = torch.zeros(0, dtype=torch.float64)
    count_pos = torch.zeros(0, dtype=torch.float64)
    n = 0.0
    for tokens, mask in batches:
        tokens, mask = tokens.to(model.device), mask.to(model.device)
        replaced = after_bos(mask)[..., None]  # [B, T, 1] the tokens the SAE and the ablations replace
        targets = mask[:, 1:].float()  # [B, T-1] the positions whose prediction (of a real token) counts
        # The four forwards differ only from block `layer` on: the blocks before it run once.
        resume = (layer, model.residual_before(tokens, layer))
        clean = model(tokens, resume=resume)  # [B, T, V]
        with model.hooked({point: lambda x, r=replaced: torch.where(r, splice(x), x)}):
            recon = model(tokens, resume=resume)
        with model.hooked({point: lambda x, r=replaced: torch.where(r, x.new_zeros(()), x)}):
            zero = model(tokens, resume=resume)
        with model.hooked({point: lambda x, r=replaced: torch.where(r, mean.to(x.dtype), x)}):
            ablated = model(tokens, resume=resume)
        nll, kl = position_metrics(clean, recon, zero, ablated, tokens=tokens)
        for name, row in zip(("clean", "spliced", "zero", "mean"), nll * targets):
            sums[name] += float(row.sum())
        kl = kl[:, :-1] * targets  # [B, T-1]
        sums["kl"] += float(kl.sum())
        n += float(targets.sum())
        T = kl.shape[1]
        if kl_pos.numel() < T:
            kl_pos = F.pad(kl_pos, (0, T - kl_pos.numel()))
            count_pos = F.pad(count_pos, (0, T - count_pos.numel()))
        kl_pos[:T] += kl.sum(0).double().cpu()  # the per-position sums stay on the CPU, whatever the model's device
        count_pos[:T] += targets.sum(0).double().cpu()
    if n == 0:
        raise UserError("no token to predict in the evaluation texts (each needs a token after BOS): pass "
                        "longer or more texts")
    ce = {k: sums[k] / n for k in ("clean", "spliced", "zero", "mean")}
    recovered = (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])
    vs_mean = (ce["mean"] - ce["spliced"]) / (ce["mean"] - ce["clean"])
    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero_ablated": ce["zero"],
            "ce_recovered": recovered, "ce_mean_ablated": ce["mean"], "ce_recovered_vs_mean": vs_mean,
            "kl": sums["kl"] / n, "predicted_tokens": int(n),
            "kl_by_position": (kl_pos / count_pos.clamp_min(1)).tolist()}


def after_bos(mask: Tensor) -> Tensor:
    """The real tokens after BOS, [B, T] bool, of a mask [B, T] of real tokens (each row starts with BOS)."""
    keep = mask.bool().clone()
    keep[:, 0] = False
    return keep


def rows_mean(blocks: Iterable[Tensor]) -> Tensor:
    """The mean row of blocks of rows [N_i, d], [d] float32 (summed in float64): over :func:`hook_activations`,
    the mean-ablation value of :func:`model_metrics`, the same for every batch."""
    total, count = None, 0
    for rows in blocks:
        part = rows.double().sum(0)
        total, count = part if total is None else total + part, count + rows.shape[0]
    if not count:
        raise UserError("no token after BOS in the evaluation texts: pass longer or more texts")
    return (total / count).float()


def hook_activations(model, hook: str, token_batches: Iterable[tuple[Tensor, Tensor]]) -> Iterable[Tensor]:
    """Per batch of (tokens [B, T], mask [B, T]) from :func:`token_batches`: the float32 activations at ``hook``
    of its real tokens after BOS, [N, d] — the tokens an activation store holds (capture never stores BOS,
    whose residual norm is several times the others' and would dominate FVU)."""
    for tokens, mask in token_batches:
        yield model.capture(tokens.to(model.device), [hook])[hook][after_bos(mask.to(model.device))].float()


def token_batches(tokenizer, texts: Iterable[str], *, batch_size: int = 16, max_tokens: int = 128
                  ) -> Iterable[tuple[Tensor, Tensor]]:
    """Right-padded (tokens [B, T], mask [B, T]) batches of texts, each starting with BOS."""
    batch: list[list[int]] = []

    def flush():
        T = max(len(r) for r in batch)
        tokens = torch.full((len(batch), T), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, row in enumerate(batch):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        return tokens, mask

    for text in texts:
        batch.append(tokenizer.encode_prefix(text, max_tokens))
        if len(batch) == batch_size:
            yield flush()
            batch = []
    if batch:
        yield flush()


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(metric, value) rows for a human-readable table of an evaluation report."""
    rows = []
    if "fvu" in report:
        rows += [("tokens", f"{report['tokens']:,}"), ("FVU", f"{report['fvu']:.4f}"),
                 ("explained variance", f"{report['explained_variance']:.4f}"), ("MSE", f"{report['mse']:.4g}"),
                 ("cosine(x, x̂)", f"{report['cosine']:.4f}"), ("L0", f"{report['l0']:.2f}"),
                 ("dead latents", f"{report['dead']} ({report['dead_fraction']:.1%}; {report['dead_rule']})"),
                 ("dense latents", f"{report['dense']} ({report['dense_fraction']:.1%}; {report['dense_rule']})")]
    if "ce_clean" in report:
        rows += [("CE clean", f"{report['ce_clean']:.4f}"), ("CE spliced", f"{report['ce_spliced']:.4f}"),
                 ("CE zero-ablated", f"{report['ce_zero_ablated']:.4f}"),
                 ("CE recovered", f"{report['ce_recovered']:.3f}")]
        if "ce_mean_ablated" in report:  # reports of earlier versions have no mean ablation
            rows += [("CE mean-ablated", f"{report['ce_mean_ablated']:.4f}"),
                     ("CE recovered vs mean ablation", f"{report['ce_recovered_vs_mean']:.3f}")]
        rows += [("KL(clean ‖ spliced)", f"{report['kl']:.4f}")]
    return rows


# --------------------------------------------------------------------------- plots
def plot_frequency(report: dict, path: str | os.PathLike) -> Path | None:
    """PNG histogram of the latents' log10 firing frequency (dead latents counted apart); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("frequency plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    freq = torch.tensor(report["frequency"], dtype=torch.float64)
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=50, color="tab:blue")
    ax.axvline(torch.log10(torch.tensor(report.get("dense_threshold", DENSE_THRESHOLD))).item(), color="tab:red",
               linestyle="--", label="dense threshold")
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{len(freq):,} latents over {report['tokens']:,} tokens; dead: {report['dead']:,} "
                 f"({report['dead_fraction']:.1%})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- during training
class TrainingEval:
    """The trainer's spliced evaluation (model-loaded runs): each SAE in the model on fixed held-out texts.

    Every ``every`` steps (at the next metrics record) and at the end: CE clean / spliced / zero-ablated,
    CE recovered, KL, and FVU / L0 / dead fraction on the texts' activations. Records go to out/eval.jsonl;
    the final report of each SAE to SAE_DIR/evaluation.json (with its frequency histogram,
    SAE_DIR/frequency.png); curves to out/plots/eval_*.png.
    """

    KEYS = ("ce_recovered", "ce_recovered_vs_mean", "kl", "ce_spliced", "fvu", "l0", "dead_fraction")

    def __init__(self, model: str, corpus: str, n_texts: int, every: int, out: Path, resume_step: int = 0,
                 device: str = "cpu"):
        from itertools import islice

        from llama_sae.corpus import iter_sentences
        from llama_sae.llama import load_model, load_tokenizer
        from llama_sae.sae.train import read_metrics

        self.model = load_model(model, device=device)
        tok = load_tokenizer(model)
        texts = [s.text for s in islice(iter_sentences(corpus), n_texts)]
        if not texts:
            raise UserError(f"eval corpus {corpus!r} gave no texts: pass another --eval-corpus SOURCE")
        self.batches = [(t.to(device), m.to(device)) for t, m in token_batches(tok, texts)]
        self.every, self.path = every, out / EVAL_LOG
        self.acts: dict[str, Tensor] = {}
        self.reports: dict[str, dict] = {}  # the last full report of each SAE, by run name
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.logged = {(r["step"], r.get("sae")) for r in kept}  # a finished run run again: no second record
        # the last evaluation, not the resume's step: a run stopped between records still owes the one due next
        self.last = max((r["step"] for r in kept), default=0)

    def check(self, saes: Iterable[SAE]) -> None:
        """Fail before training if an SAE does not fit the model (width, hook point)."""
        from llama_sae.splice import check_fits

        for sae in saes:
            check_fits(self.model, sae)

    def _acts(self, hook: str) -> Tensor:
        """The evaluation texts' activations at ``hook`` [N, d], BOS left out as in a store (the model does not
        change: cached)."""
        if hook not in self.acts:
            self.acts[hook] = torch.cat(list(hook_activations(self.model, hook, self.batches)))
        return self.acts[hook]

    def report(self, sae: SAE) -> dict:
        """The full report of one SAE on the evaluation texts."""
        was_training = sae.training
        sae.eval()
        try:
            acts = self._acts(sae.cfg.hook_name)  # the model does not change: neither do these, nor their mean
            rep = activation_metrics(sae, [acts])
            rep.update(model_metrics(self.model, sae, self.batches, mean=rows_mean([acts])))
        finally:
            sae.train(was_training)
        return rep

    def maybe(self, runs: list, step: int, tokens: int, *, final: bool = False) -> list[dict]:
        """Evaluate every run's SAE when ``every`` steps have passed since the last evaluation (or ``final``)."""
        if not final and step // self.every <= self.last // self.every:
            return []
        self.last = step
        records = []
        for run in runs:
            rep = self.reports[run.name] = self.report(run.sae)
            records.append({"step": step, "tokens": tokens, "sae": run.name, **{k: rep[k] for k in self.KEYS}})
        again = {(r["step"], r["sae"]) for r in records} & self.logged
        if again:  # a finished run run again (its evaluation settings may differ): replace, never duplicate
            from llama_sae.sae.train import read_metrics

            old = [r for r in read_metrics(self.path) if (r.get("step"), r.get("sae")) not in again]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in old + records))
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
        self.logged |= {(r["step"], r["sae"]) for r in records}
        return records

    def final(self, runs: list, dirs: list[Path], step: int, tokens: int, plots: bool = True) -> None:
        """The end-of-training evaluation: eval.jsonl's last record and evaluation.json per SAE; with ``plots``,
        frequency.png per SAE and the curves (out/plots/eval_*.png)."""
        from llama_sae.sae.train import plot_metrics

        if self.last != step or not self.reports:
            self.maybe(runs, step, tokens, final=True)
        for run, path in zip(runs, dirs):
            rep = self.reports[run.name]
            atomic_write_json(path / EVAL_REPORT, {"step": step, "trained_tokens": tokens, **rep})
            if plots:
                plot_frequency(rep, path / "frequency.png")
        if plots:
            plot_metrics(self.path.parent, EVAL_LOG, self.KEYS, prefix="eval_")

