"""``llama-sae features``, ``explain`` and ``score``: the interpretation stages of the command line.

Each command parses its options and calls ``llama_sae.features`` or ``llama_sae.interpret``; cli.py
registers them with ``register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()

FeaturesArg = Annotated[Path, typer.Argument(help="features artifact directory (from `llama-sae features`)")]


def features(
    sae: Annotated[Path, typer.Option(help="SAE directory (SAELens v6 layout)")],
    out: Annotated[Path, typer.Option(help="output directory of the features artifact")],
    corpus: Annotated[str, typer.Option(help="SOURCE of the sentences")] = "tinyworld:20000:heldout",
    sentences: Annotated[int, typer.Option(help="sentences to read from the corpus")] = 20_000,
    top_n: Annotated[int, typer.Option(help="top sentences kept per latent and aggregation (max, mean, last)")] = 20,
    reservoir: Annotated[int, typer.Option(help="activating sentences sampled per latent for quantile bins")] = 40,
    n_quantiles: Annotated[int, typer.Option(help="quantile bins of the sampled sentences")] = 10,
    pool: Annotated[int, typer.Option(help="random sentences for the non-activating examples")] = 512,
    batch_size: Annotated[int, typer.Option(help="sentences per forward pass")] = 64,
    max_tokens: Annotated[int, typer.Option(help="tokens per sentence, BOS included (longer: truncated)")] = 128,
    model: Annotated[str | None, typer.Option("--model", "-m", help="checkpoint directory; default: the "
                                                                     "shipped tinyworld model")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the random samples")] = 0,
    overwrite: Annotated[bool, typer.Option(help="rebuild when OUT holds an artifact with other settings")] = False,
) -> None:
    """Top-activating sentences, quantile samples and statistics of every latent (one pass; resumable)."""
    from rich.progress import Progress

    from llama_sae.cli import _load
    from llama_sae.features import build_features, load_features
    from llama_sae.sae import load

    llama, tok = _load(model, None, device)
    net = load(sae, device=device)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("features", total=sentences)
        build_features(llama, tok, net, corpus, out, sentences=sentences, top_n=top_n, reservoir=reservoir,
                       n_quantiles=n_quantiles, pool=pool, batch_size=batch_size, max_tokens=max_tokens, seed=seed,
                       overwrite=overwrite, sae_path=str(sae), progress=lambda d, n: bar.update(task, completed=d))
    f = load_features(out)
    m = f.meta
    console.print(f"{out}: {m['sentences']:,} sentences, {m['tokens']:,} tokens; {m['live_latents']:,} of "
                  f"{m['d_sae']:,} latents fired; {m['examples']:,} examples over {m['stored_sentences']:,} "
                  "stored sentences")


def register(app: typer.Typer) -> None:
    """Add the interpretation commands to the ``llama-sae`` app."""
    app.command()(features)
