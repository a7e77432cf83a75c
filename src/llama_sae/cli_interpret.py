"""``llama-sae features``, ``explain`` and ``score``: the interpretation stages of the command line.

Each command parses its options and calls ``llama_sae.features`` or ``llama_sae.interpret``; cli.py
registers them with ``register(app)``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from llama_sae.cli_ui import parse_latents
from llama_sae.errors import UserError
from llama_sae.terminal import literal, printable

console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False, soft_wrap=True)

FeaturesArg = Annotated[Path, typer.Argument(metavar="FEATURES",
                                             help="features artifact directory (from `llama-sae features`)")]


def features(
    sae: Annotated[Path, typer.Option(help="SAE directory (SAELens v6 layout)")],
    out: Annotated[Path, typer.Option(help="output directory of the features artifact")],
    corpus: Annotated[str, typer.Option(help="SOURCE of the sentences")] = "tinyworld:20000:heldout",
    sentences: Annotated[int, typer.Option(min=1, help="sentences to read from the corpus")] = 20_000,
    top_n: Annotated[int, typer.Option(min=1, help="top sentences kept per latent and aggregation (max, mean, "
                                                   "last)")] = 20,
    reservoir: Annotated[int, typer.Option(min=1, help="activating sentences sampled per latent for quantile "
                                                       "bins")] = 40,
    n_quantiles: Annotated[int, typer.Option(min=1, help="quantile bins of the sampled sentences")] = 10,
    pool: Annotated[int, typer.Option(min=1, help="random sentences for the non-activating examples")] = 512,
    batch_size: Annotated[int, typer.Option(min=1, help="sentences per forward pass")] = 64,
    max_tokens: Annotated[int, typer.Option(min=2, help="tokens per sentence, BOS included (longer: truncated)")] = 128,
    model: Annotated[str | None, typer.Option("--model", "-m", help="checkpoint directory; default: the "
                                                                     "shipped tinyworld model")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="the model's dtype (bfloat16, float16, float32); default: the "
                                                   "checkpoint's. float32 chooses the same sentences at any "
                                                   "batch size")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random samples")] = 0,
    dedupe: Annotated[bool, typer.Option(help="read each distinct sentence once (repeats would fill the top "
                                              "lists)")] = False,
    cache_gb: Annotated[float, typer.Option(min=0, help="disk for pass 1's sparse codes, which spare pass 2 the model "
                                                 "(GiB; 0 = run the model again)")] = 2.0,
    overwrite: Annotated[bool, typer.Option(help="rebuild when OUT holds an artifact with other settings")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar with ETA")] = True,
    split_sentences: Annotated[bool | None, typer.Option(
        "--split-sentences/--no-split-sentences", help="split records into sentences, or keep each whole; "
        "default: split when more than 10% of the first 256 records hold several sentences")] = None,
) -> None:
    """Top-activating sentences, quantile samples and statistics of every latent (one pass; resumable)."""
    from rich.progress import Progress

    from llama_sae.cli import _load
    from llama_sae.features import PARTIAL_DIR, STATE_FILE, build_features, load_features
    from llama_sae.sae import load

    llama, tok = _load(model, dtype, device)
    net = load(sae, device=device)
    if (out / PARTIAL_DIR / STATE_FILE).exists():
        console.print(f"resuming the interrupted build in {out} (a build with other settings starts over)",
                      markup=False, highlight=False)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("features", total=sentences)
        second: list = []  # pass 2's task, added when it starts

        def pass2(done: int, total: int) -> None:
            if not second:
                bar.update(task, completed=sentences)
                second.append(bar.add_task("examples (pass 2)", total=total))
            bar.update(second[0], completed=done)

        build_features(llama, tok, net, corpus, out, sentences=sentences, top_n=top_n, reservoir=reservoir,
                       n_quantiles=n_quantiles, pool=pool, batch_size=batch_size, max_tokens=max_tokens, seed=seed,
                       overwrite=overwrite, sae_path=str(sae), cache_bytes=int(cache_gb * 2**30),
                       progress=lambda d, n: bar.update(task, completed=d), split_sentences=split_sentences,
                       model_dtype=None if dtype is None else str(llama.dtype).removeprefix("torch."), dedupe=dedupe,
                       pass2_progress=pass2)
    f = load_features(out)
    m = f.meta
    console.print(f"{out}: {m['sentences']:,} sentences, {m['tokens']:,} tokens; {m['live_latents']:,} of "
                  f"{m['d_sae']:,} latents fired; {m['examples']:,} examples over {m['stored_sentences']:,} "
                  f"stored sentences ({time.perf_counter() - t0:.0f} s)")
    if m["sentences"] < sentences:
        console.print(f"note: the corpus {corpus} holds only {m['sentences']:,} sentences (asked for {sentences:,})",
                      markup=False, highlight=False)


BackendOpt = Annotated[str, typer.Option(help="offline (default, no key), chat (any OpenAI-compatible server), "
                                              "anthropic (Message Batches), openai-batch (Batch API), local (the "
                                              "Llama itself)")]
LlmModelOpt = Annotated[str | None, typer.Option(help="LLM model name (anthropic default: claude-haiku-4-5; "
                                                      "openai-batch: gpt-4o-mini; chat: required)")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="server base URL, e.g. http://localhost:8000/v1 (vLLM)")]
KeyEnvOpt = Annotated[str | None, typer.Option(help="environment variable holding the chat server's key "
                                                    "(default OPENAI_API_KEY; keys are never read from options)")]
ConcurrencyOpt = Annotated[int, typer.Option(min=1, help="chat backend: requests in flight at once")]
PerMinuteOpt = Annotated[float | None, typer.Option(min=0.001, help="chat backend: at most this many requests "
                                                                   "per minute")]
ThresholdOpt = Annotated[float, typer.Option("--confirm-above", help="ask before sending when the estimated "
                                                                     "cost exceeds this many US dollars")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="send without asking, whatever the estimate")]
RetryOpt = Annotated[bool, typer.Option(help="re-send only the requests that failed (errored, canceled, expired, "
                                             "malformed)")]
FreshOpt = Annotated[bool, typer.Option(help="start a new journal (the old one is kept beside it)")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="batch backends: submit and return; run again later "
                                                          "to collect")]
PollOpt = Annotated[float, typer.Option(min=0, help="batch backends: seconds between status checks")]
TimeoutOpt = Annotated[float, typer.Option(min=1, help="seconds to wait for one server reply before retrying it "
                                                       "(a slow self-hosted model may need more)")]
LocalDeviceOpt = Annotated[str, typer.Option(help="local backend: where the checkpoint runs (cpu, cuda, cuda:1, ...)")]


def _backend(f, backend, llm_model, base_url, api_key_env, concurrency, per_minute, poll, no_wait, model, device,
             timeout):
    from llama_sae.errors import check_device
    from llama_sae.interpret import make_backend

    check_device(device)  # a bad value is an error whatever the backend (only the local one uses it)
    if backend in ("offline", "local") and (base_url or llm_model):
        given = " and ".join(name for name, v in (("--base-url", base_url), ("--llm-model", llm_model)) if v)
        err_console.print(f"note: the {backend} backend sends nothing anywhere: {given} is not used", style="yellow",
                          markup=False, highlight=False)
    llama = tok = checkpoint = None
    if backend == "local":
        from llama_sae.capture import model_fingerprint
        from llama_sae.cli import _load, _model_path

        llama, tok = _load(model, None, device)
        checkpoint = model_fingerprint(_model_path(model))  # answers of another checkpoint are not this one's
    return make_backend(backend, f, model=llm_model, base_url=base_url, api_key_env=api_key_env,
                        concurrency=concurrency, per_minute=per_minute, poll_interval=poll, wait=not no_wait,
                        llama=llama, tokenizer=tok, timeout=timeout, checkpoint=checkpoint)


def _check_fresh_and_retry(fresh: bool, retry_failed: bool) -> None:
    if retry_failed and fresh:
        raise UserError("--retry-failed re-sends what failed in the current journal and --fresh starts a new one: "
                        "pass one of them")


def _confirm(yes: bool):
    return (lambda question: True) if yes else (lambda question: typer.confirm(question, default=False))


def _fail_if_nothing_came_back(out: dict, stage: str) -> None:
    """Exit 1 with the reason when every request sent this run failed (a wrong URL, key or model name)."""
    from llama_sae.interpret.journal import FAILED

    outcomes = out.get("outcomes") or {}
    failed = sum(n for kind, n in outcomes.items() if kind in FAILED)
    why = f": {out['first_error']}" if out.get("first_error") else ""
    if failed and not outcomes.get("succeeded"):
        err_console.print(f"error: every {stage} request failed ({failed}){why}; the journal has each one; fix the "
                          "backend settings and run again (a changed model, URL or temperature starts a new journal by "
                          "itself; with the same settings, add --retry-failed)", style="bold red", markup=False,
                          highlight=False)
        raise typer.Exit(1)
    if failed:
        err_console.print(f"warning: {failed} {stage} request(s) failed (first{why}); re-send only those with "
                          "--retry-failed", style="yellow", markup=False, highlight=False)


@contextlib.contextmanager
def _answers_bar(task: str, enabled: bool):
    """A progress bar with ETA over a run's requests (shown once the run has something to send); yields the
    ``progress(done, total)`` callback for run_requests (called from the backend's threads too)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(f"[bold]{task}[/bold] answers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True, disable=not enabled)
    tasks = []

    def update(done: int, total: int) -> None:
        if not tasks:  # started at the first answer, after the cost question (a live display would erase it)
            bar.start()
            tasks.append(bar.add_task(task, total=total))
        bar.update(tasks[0], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def explain(
    path: FeaturesArg,
    backend: BackendOpt = "offline",
    llm_model: LlmModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    latents: Annotated[str | None, typer.Option(help="latents and ranges, e.g. 3,17,40-49; default: every live "
                                                     "latent")] = None,
    n_top: Annotated[int, typer.Option(min=1, help="top sentences shown per latent (plus half the quantile "
                                                   "samples)")] = 10,
    max_tokens: Annotated[int, typer.Option(min=1, help="reply tokens per request")] = 300,
    concurrency: ConcurrencyOpt = 8,
    per_minute: PerMinuteOpt = None,
    confirm_above: ThresholdOpt = 5.0,
    yes: YesOpt = False,
    retry_failed: RetryOpt = False,
    fresh: FreshOpt = False,
    no_wait: NoWaitOpt = False,
    poll: PollOpt = 30.0,
    timeout: TimeoutOpt = 120.0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="local backend: the checkpoint")] = None,
    device: LocalDeviceOpt = "cpu",
    progress: Annotated[bool, typer.Option(help="progress bar with ETA while answers come in")] = True,
) -> None:
    """Explain every live latent (journaled: a killed run started again neither re-sends nor loses)."""
    from llama_sae.features import load_features
    from llama_sae.interpret import explain as run_explain

    f = load_features(path)
    chosen = parse_latents(latents, f.meta["d_sae"])
    _check_fresh_and_retry(fresh, retry_failed)
    b = _backend(f, backend, llm_model, base_url, api_key_env, concurrency, per_minute, poll, no_wait, model, device,
                 timeout)
    with _answers_bar("explain", progress) as bar:
        out = run_explain(f, b, latents=chosen, n_top=n_top, max_tokens=max_tokens, fresh=fresh,
                          retry_failed=retry_failed, confirm=_confirm(yes), threshold=confirm_above, say=console.print,
                          progress=bar)
    console.print(f"{out['explained']:,} of {out['requests']:,} latents explained; outcomes: {out['outcomes']}; "
                  f"{path / 'explanations.jsonl'}")
    _fail_if_nothing_came_back(out, "explain")


def score(
    path: FeaturesArg,
    backend: BackendOpt = "offline",
    llm_model: LlmModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    n: Annotated[int, typer.Option(min=1, help="held-out activating and as many non-activating sentences per "
                                               "latent")] = 10,
    sample: Annotated[str, typer.Option(help="held-out activating sentences: 'top' (the top sentences the explainer "
                                             "did not see) or 'quantile' (across activation quantiles)")] = "top",
    control: Annotated[bool, typer.Option(help="also score shuffled explanations (should give ~0.5)")] = True,
    concurrency: ConcurrencyOpt = 8,
    per_minute: PerMinuteOpt = None,
    confirm_above: ThresholdOpt = 5.0,
    yes: YesOpt = False,
    retry_failed: RetryOpt = False,
    fresh: FreshOpt = False,
    no_wait: NoWaitOpt = False,
    poll: PollOpt = 30.0,
    timeout: TimeoutOpt = 120.0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="local backend: the checkpoint")] = None,
    device: LocalDeviceOpt = "cpu",
    progress: Annotated[bool, typer.Option(help="progress bar with ETA while answers come in")] = True,
) -> None:
    """Score every explanation: detection and fuzzing balanced accuracy per latent, and the shuffled control."""
    from llama_sae.features import load_features
    from llama_sae.interpret import score as run_score

    if sample not in ("top", "quantile"):
        raise UserError(f"--sample must be 'top' or 'quantile', not {sample!r}")
    _check_fresh_and_retry(fresh, retry_failed)
    f = load_features(path)
    b = _backend(f, backend, llm_model, base_url, api_key_env, concurrency, per_minute, poll, no_wait, model, device,
                 timeout)
    with _answers_bar("score", progress) as bar:
        out = run_score(f, b, n=n, sample=sample, control=control, fresh=fresh, retry_failed=retry_failed,
                        confirm=_confirm(yes), threshold=confirm_above, say=console.print, progress=bar)
    for name in ("detection", "fuzzing", "control_detection", "control_fuzzing"):
        if out.get(name) is not None:
            ci = out.get(f"{name}_ci")
            span = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
            console.print(f"{name}: mean balanced accuracy {out[name]:.3f}{span}")
    if out.get("certainty_vs_detection") is not None:
        rho = out["certainty_vs_detection"]
        console.print(f"the explainer's certainty vs the detection score: Spearman {rho:.3f}"
                      + (" (near 0: its self-report says little)" if abs(rho) < 0.2 else ""))
    console.print(f"{out['scored']:,} of {out['latents']:,} explained latents scored ({out['unscorable']:,} "
                  f"unscorable: no held-out activating or no non-activating sentence); outcomes: "
                  f"{out['outcomes']}; {path / 'scores.jsonl'}")
    _fail_if_nothing_came_back(out, "score")


def _scores(e) -> str:
    """An explanation's scores, as the dashboard shows them."""
    def fmt(x):
        return "–" if x is None else f"{x:.2f}"
    return f"detection {fmt(e.detection)} · fuzzing {fmt(e.fuzzing)}"


def token_line(tokens: list[str], acts: list[float], scale: float) -> Text:
    """One sentence for the terminal: tokens where the latent fires in reverse video, the strongest in bold."""
    line = Text()
    for token, a in zip(tokens, acts):
        strength = 0.0 if scale <= 0 else a / scale
        line.append(printable(token), style="" if strength <= 0 else "bold reverse" if strength >= 0.5 else "reverse")
    return line


def latent(
    features_dir: FeaturesArg,
    latent_id: Annotated[int, typer.Argument(metavar="LATENT", min=0, help="latent id")],
    n: Annotated[int, typer.Option("-n", min=1, help="top sentences to show")] = 8,
    by: Annotated[str, typer.Option(help="rank the top sentences by the latent's max, mean or last-token "
                                         "activation over the sentence")] = "max",
) -> None:
    """Show one latent in the terminal: explanation, scores, frequency, top and quantile sentences.

    The tokens where it fires are highlighted, and the peak token named with its activation."""
    from llama_sae.features import load_features

    if by not in ("max", "mean", "last"):
        raise UserError(f"--by must be max, mean or last, not {by!r}")
    f = load_features(features_dir)
    top = f.examples(latent_id, by, n)
    e = f.explanation(latent_id)
    console.print(Text(f"latent {latent_id}", style="bold"), Text(f"fires on {float(f.frequency[latent_id]):.3%} of "
                  f"tokens · typical max activation {float(f.typical_max[latent_id]):.3g}"))
    console.print(Text(f"explanation: {printable(e.text)}  ({_scores(e)})") if e else
                  Text("no explanation yet (run `llama-sae explain` and `score`)", style="dim"))
    scale = max((max(x.acts, default=0.0) for x in top), default=0.0)
    for title, rows in ((f"top sentences{'' if by == 'max' else f' by {by} activation'}", top),
                        ("quantile samples (lowest first)", f.examples(latent_id, "quantile"))):
        console.print(Text(title, style="underline"))
        for x in rows:
            peak = max(range(len(x.acts)), key=x.acts.__getitem__, default=None)
            where = f"   (peak at {x.tokens[peak]!r})" if peak is not None and x.acts[peak] > 0 else ""
            console.print(Text(f"{x.activation:7.3f}  ") + token_line(x.tokens, x.acts, scale) + Text(where, "dim"))
        if not rows:
            console.print(Text("none", style="dim"))


def search(
    features_dir: FeaturesArg,
    query: Annotated[str, typer.Argument(metavar="TEXT", help="text to find in the explanations (case-insensitive)")],
    limit: Annotated[int, typer.Option(min=1, help="latents to list")] = 20,
) -> None:
    """Find latents by explanation text, best detection score first."""
    from rich.table import Table

    from llama_sae.features import load_features

    if not query.strip():
        raise UserError("search for a word or phrase of the explanations, e.g. llama-sae search FEATURES 'law'")
    f = load_features(features_dir)
    if not f.explanations():
        raise UserError(f"{features_dir} has no explanations to search: run `llama-sae explain {features_dir}` first")
    hits = f.search(query, limit)
    matching = len(f.search(query, limit=f.d_sae))
    table = Table("latent", "detection", "frequency", "explanation",
                  title=Text(f"{len(hits)} of {matching:,} latent(s) matching {query!r}"))
    for i in hits:
        e = f.explanation(i)
        table.add_row(str(i), "–" if e.detection is None else f"{e.detection:.2f}", f"{float(f.frequency[i]):.3%}",
                      literal(e.text))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the interpretation commands to the ``llama-sae`` app."""
    app.command()(features)
    app.command()(explain)
    app.command()(score)
    app.command()(latent)
    app.command()(search)
