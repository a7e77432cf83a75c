"""The ``llama-sae`` command line: one thin command per stage, plus ``demo``.

Every command parses its options and calls a library function; nothing runs at import.
Problems with the user's input are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llama_sae.cli_sae import sae_app
from llama_sae.errors import (
    PATH_ERRORS,
    UserError,
    check_device,
    check_output_dir,
    check_output_file,
    first_line,
    path_error_message,
)
from llama_sae.terminal import print_stream, printable


def _plain_help_types() -> None:
    """Show option values in help as PATH, INTEGER, TEXT... and nothing after a flag.

    typer 0.27+ prints each parameter's Python annotation instead (``<bool>`` after every flag, ``--help`` included,
    ``<list[Path]>``, ``<int range>``); from 0.29 (the version pyproject requires) that text comes from
    ``display_type_rich``, which this replaces. An explicit ``metavar`` wins.
    """
    from typing import get_args

    from typer import core

    for cls in (getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)):
        typed = getattr(cls, "display_type_rich", None)
        if typed is None or getattr(typed, "plain", False):
            continue

        def display(self, ctx, typed=typed, argument=cls.__name__ == "TyperArgument"):
            if argument and self.metavar is not None:
                return None  # the argument's column already shows its metavar
            if self.metavar is not None:
                return self.metavar
            if getattr(self, "is_flag", False):
                return None
            desc = getattr(self, "type_descriptor", None)
            if desc is None or desc.is_choice or desc.is_tuple or desc.is_datetime:
                return typed(self, ctx)
            annotation = get_args(desc.annotation)[0] if desc.is_list else desc.annotation
            word = {int: "INTEGER", float: "FLOAT", str: "TEXT"}.get(annotation, "PATH" if desc.is_path or
                                                                      annotation is Path else None)
            if word is None:
                return typed(self, ctx)
            return word  # a repeatable option says so in its help

        display.plain = True
        cls.display_type_rich = display


_plain_help_types()


def _finite_numbers() -> None:
    """Refuse NaN and infinities for every FLOAT option, and integers outside int64 for every INTEGER one, by name.

    Without this an option's own bound names the wrong reason for NaN ("should be greater than or equal to 0")
    and a number past 64 bits reaches torch or islice and ends in an internal error."""
    from typing import get_args

    from typer import core

    cls = getattr(core, "_TyperParameter", None)
    original = getattr(cls, "process_value", None)
    if original is None or getattr(original, "finite", False):
        return
    try:
        from typer._click.exceptions import BadParameter
    except ImportError:
        from click.exceptions import BadParameter

    def process_value(self, ctx, value):
        desc = getattr(self, "type_descriptor", None)
        annotation = None if desc is None else get_args(desc.annotation)[0] if desc.is_list else desc.annotation
        if annotation in (int, float):
            for raw in value if isinstance(value, (list, tuple)) else [value]:
                try:
                    number = float(raw) if isinstance(raw, str) else None
                    whole = int(raw) if isinstance(raw, str) and annotation is int else None
                except ValueError:
                    continue  # not a number at all: typer says so
                if number is None:
                    continue
                why = ("is not a number" if math.isnan(number) else "is not a finite number" if math.isinf(number)
                       else "is too large: give a number in -2^63..2^63-1" if whole is not None
                       and not -(2**63) <= whole < 2**63 else None)
                if why:
                    raise BadParameter(f"{raw} {why}", ctx=ctx, param=self)
        return original(self, ctx, value)

    process_value.finite = True
    cls.process_value = process_value


_finite_numbers()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sparse autoencoders for Llama 3.x: capture, train, interpret, steer.")
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False, soft_wrap=True)  # one line per message, whatever the width

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="checkpoint directory (Meta or Hugging Face "
                                                                   "format); default: the shipped tinyworld model")]
DtypeOpt = Annotated[str | None, typer.Option(help="bfloat16, float16 or float32; default: the checkpoint's")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="tokens to generate per prompt")]
TempOpt = Annotated[float, typer.Option(min=0, help="sampling temperature; 0 = greedy")]
TopPOpt = Annotated[float, typer.Option(min=0, max=1, help="nucleus sampling: keep the smallest set "
                                                                         "of tokens with this mass")]
SeedOpt = Annotated[int | None, typer.Option(help="seed for sampling (repeatable output)")]
SaeOpt = Annotated[list[Path] | None, typer.Option("--sae", help="SAE directory to splice in (repeatable, one per "
                                                               "hook point); default: the shipped tinyworld SAE")]
SteerOpt = Annotated[list[str] | None, typer.Option(
    "--steer", metavar="SPEC", help="a steer (repeatable): LATENT:KIND:STRENGTH with KIND clamp, add or bias and "
    "STRENGTH in units of the latent's typical max; append :WHERE (all, the default; prompt, generated, last, last+N, "
    "prompt+N) to choose the tokens, prefix HOOK@ to choose the SAE")]
SplitOpt = Annotated[bool | None, typer.Option(
    "--split-sentences/--no-split-sentences", help="split records into sentences, or keep each whole; default: "
    "split when more than 10% of the first 256 records hold several sentences")]
CORPUS_HELP = ("one of tinyworld[:N[:heldout]], txt:PATH, jsonl:PATH[:FIELD], parquet:PATH[:COLUMN], hf:NAME:SPLIT or "
               "hf:NAME:CONFIG:SPLIT (then [:COLUMN]), hfdisk:PATH[:COLUMN], or openwebtext-sentences")
FeaturesOpt = Annotated[list[Path] | None, typer.Option("--features", help="features artifact of a loaded SAE: "
                                                                         "steering units and explanations")]
RecordOpt = Annotated[Path | None, typer.Option(help="write the steering record (JSON) here; default "
                                                     "runs/steer/<time>.json")]


def _model_path(model: str | None) -> str:
    if model is not None:
        return model
    from llama_sae.tinyworld import model_path

    return str(model_path())


def _check_record_path(record: Path | None) -> None:
    """Before generating: --record names a file that can be written and is new, or an earlier steering record
    (a re-run replaces it); anything else is refused, never overwritten."""
    if record is None:
        return
    if record.is_dir():
        raise UserError(f"--record {record} is a directory: pass a file path, e.g. {record / 'steer.json'}")
    blocker = next((p for p in record.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--record {record}: {blocker} is a file, not a directory: pass another path")
    if record.exists():
        from llama_sae.steer import RECORD_KEYS

        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict) or not set(RECORD_KEYS) <= set(old):
            raise UserError(f"--record {record} exists and is not a steering record: it is not overwritten; pass a "
                            "new file name (or leave --record out: runs/steer/<time>.json)")


def _load(model: str | None, dtype: str | None, device: str):
    from llama_sae.llama import load_model, load_tokenizer

    path = _model_path(model)
    return load_model(path, dtype=dtype, device=device), load_tokenizer(path)


def model_table(args, fmt: str, path: str):
    """A rich table of a checkpoint's shape and parameter count."""
    import torch
    from rich.table import Table

    from llama_sae.llama.model import Transformer

    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(args).parameters())
    table = Table(title=f"{path} ({'Hugging Face' if fmt == 'hf' else 'Meta'} format)", show_header=False)
    rows = {"parameters": f"{n_params:,}", "layers": args.n_layers, "d_model": args.dim,
            "heads (q / kv)": f"{args.n_heads} / {args.n_kv_heads}", "head_dim": args.head_dim,
            "ffn width": args.hidden_dim, "vocab": args.vocab_size, "tied embeddings": args.tie_embeddings,
            "rope theta": args.rope_theta,
            "rope scaling": "none" if args.rope_scaling is None else f"llama3, factor {args.rope_scaling.factor:g}",
            "context": args.max_seq_len,
            "hook points": f"resid_pre|attn_in|attn_out|mlp_in|mlp_out|resid_post . 0..{args.n_layers - 1}"}
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


@app.command()
def info(model: ModelOpt = None) -> None:
    """Show a checkpoint's format, shape and parameter count (reads no weights)."""
    from llama_sae.llama.checkpoint import read_args

    path = _model_path(model)
    fmt, args = read_args(path)
    console.print(model_table(args, fmt, path))


@app.command()
def generate(
    prompt: Annotated[list[str] | None, typer.Argument(
        metavar="PROMPT", help="prompt(s); several are generated as one batch")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="read prompts from a file, one per line")] = None,
    model: ModelOpt = None,
    max_new_tokens: MaxTokensOpt = 48,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 0.9,
    seed: SeedOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    stream: Annotated[bool, typer.Option(help="print tokens as they come (one prompt only)")] = True,
    sae: SaeOpt = None,
    steer: SteerOpt = None,
    features: FeaturesOpt = None,
    show_features: Annotated[bool, typer.Option(help="print each token's top latents and their explanations "
                                                     "(of --sae, default the shipped SAE)")] = False,
    top: Annotated[int, typer.Option(min=1, help="latents per token for --show-features")] = 3,
    record: RecordOpt = None,
    replay: Annotated[Path | None, typer.Option(help="run a steering record again and check the outputs match")] = None,
) -> None:
    """Complete text prompts with the model; with --sae, steer it (--steer) and show token features."""
    from llama_sae.llama import generate as run_generate

    if replay is not None:
        from llama_sae.cli_steer import run_replay

        if prompt or steer:
            raise UserError("--replay runs the recorded prompts and steers: drop the PROMPT and --steer arguments")
        return run_replay(replay, console, device=device, dtype=dtype)
    prompts = list(prompt or [])
    _check_record_path(record)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UserError(f"prompts file {prompts_file} does not exist or is not a file: pass a text file, one "
                            "prompt per line")
        try:
            prompts += [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UserError(f"prompts file {prompts_file} is not UTF-8 text: pass a text file, one prompt per "
                            "line") from None
    if not prompts:
        raise UserError("no prompt given: pass PROMPT arguments or --prompts-file FILE")
    if record is not None and not steer:
        err_console.print(f"note: nothing will be written to {record}: records keep steered generations (add "
                          "--steer)", style="yellow", markup=False, highlight=False)
    net, tok = _load(model, dtype, device)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if sae or steer or features or show_features:
        from llama_sae import cli_steer

        setup = cli_steer.setup(net, tok, sae, steer or [], features, console, err_console, model_given=bool(model))
        return cli_steer.steered_generate(console, err_console, net, tok, _model_path(model), prompts, setup,
                                          show_features=show_features, top=top, record=record, stream=stream, **kw)
    if stream and len(prompts) == 1:
        print_stream(console, prompts[0], run_generate(net, tok, prompts, stream=True, **kw))
        return
    for p, c in zip(prompts, run_generate(net, tok, prompts, **kw)):
        console.print(printable(p), end="", style="bold", markup=False, highlight=False)
        console.print(printable(c.text), markup=False, highlight=False)


@app.command()
def chat(
    message: Annotated[str | None, typer.Option("--message", help="one-shot: answer this and exit")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    model: ModelOpt = None,
    max_new_tokens: MaxTokensOpt = 128,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 0.9,
    seed: SeedOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    sae: SaeOpt = None,
    steer: SteerOpt = None,
    features: FeaturesOpt = None,
    record: RecordOpt = None,
) -> None:
    """Chat with the model in the Llama 3 chat format (interactive, or one-shot with --message); --steer steers it."""
    from llama_sae.steer import generate as run_generate

    _check_record_path(record)
    if message is not None and not message.strip():
        raise UserError("--message is empty: give the text to answer (or leave --message out to chat)")
    net, tok = _load(model, dtype, device)
    history = [{"role": "system", "content": system}] if system else []
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    steering = None
    if sae or steer or features:
        from llama_sae import cli_steer

        steering = cli_steer.setup(net, tok, sae, steer or [], features, console, err_console,
                                   model_given=bool(model)).steering

    def reply(text: str) -> None:
        history.append({"role": "user", "content": text})
        answer = ""
        for chunk in run_generate(net, tok, history, steering, chat=True, stream=True, **kw):
            answer += chunk.text
            console.print(printable(chunk.text), end="", markup=False, highlight=False)
        console.print()
        if steering is not None:  # one record per conversation, rewritten after every reply
            from llama_sae.cli_steer import write_record
            from llama_sae.steer import record as make_record

            nonlocal record
            first = record is None
            record = write_record(make_record(steering, _model_path(model), list(history), [answer], kw, chat=True,
                                              model=net), record)
            if first:
                console.print(f"record: {record} (rewritten after every reply; llama-sae generate --replay {record})",
                              style="dim", markup=False, highlight=False)
        history.append({"role": "assistant", "content": answer})

    if message is not None:
        reply(message)
        return
    console.print("[dim]chat: type a message, an empty line or Ctrl-D to quit[/dim]")
    while True:
        try:
            text = console.input("[bold]you> [/bold]")
        except (EOFError, KeyboardInterrupt):
            break
        if not text.strip():
            break
        console.print("[bold]model> [/bold]", end="")
        reply(text)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC",
                                        help="Meta checkpoint directory (params.json, consolidated.*.pth)")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="output directory for the Hugging Face checkpoint")],
    rope_factor: Annotated[float | None, typer.Option(help="'llama3' RoPE factor; default inferred "
                                                           "(32 for 3.2 1B/3B, else 8)")] = None,
    overwrite: Annotated[bool, typer.Option(help="write into a non-empty OUT (stale weight files are removed)")]
    = False,
) -> None:
    """Convert a Meta checkpoint to Hugging Face format (config.json, model.safetensors, tokenizer.json)."""
    from llama_sae.fileio import lock_output
    from llama_sae.llama.checkpoint import convert_meta_to_hf

    check_output_dir(out, "a Hugging Face checkpoint", overwrite=overwrite)
    with lock_output(out, f"the converted checkpoint {out}"):  # two converts: one sweeps the other's temp files
        convert_meta_to_hf(src, out, rope_factor=rope_factor)
    console.print(f"wrote Hugging Face checkpoint to {out}")
    if not (out / "tokenizer.json").exists() and not (out / "tokenizer.model").exists():
        err_console.print(f"note: {src} has no tokenizer.model, so {out} has no tokenizer: copy tokenizer.model "
                          f"from the Meta download into {out} before generating", markup=False, highlight=False)


tinyworld_app = typer.Typer(no_args_is_help=True, help="The embedded world: planted-concept corpus and tiny model.")
corpus_app = typer.Typer(no_args_is_help=True,
                         help="Corpus sources: tinyworld[:N], txt:, jsonl:, parquet:, hf:, hfdisk:, "
                              "openwebtext-sentences.")
app.add_typer(tinyworld_app, name="tinyworld")
app.add_typer(corpus_app, name="corpus")
app.add_typer(sae_app, name="sae")


@tinyworld_app.command("train")
def tinyworld_train(
    out: Annotated[Path, typer.Option(help="run directory: tokenizer/, checkpoint.pt, model/ (resumes if present)")],
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the data stream and the init")] = 0,
    evaluate: Annotated[bool, typer.Option(help="run the probes and the topic check, write the model card")] = True,
) -> None:
    """Train the tiny Llama on the tinyworld corpus (about 15 minutes on 2 CPU cores)."""
    from llama_sae.tinyworld.card import evaluate_model, write_model_card
    from llama_sae.tinyworld.train import TinyTrainConfig, train

    model_dir = train(out, TinyTrainConfig(steps=steps, seed=seed))
    if evaluate:
        evaluate_model(model_dir)
        card = write_model_card(model_dir, f"llama-sae tinyworld train --out DIR --steps {steps} --seed {seed}")
        console.print(f"model card: {card}")
    console.print(f"model: {model_dir}")


@tinyworld_app.command("concepts")
def tinyworld_concepts() -> None:
    """List the planted concepts (topics and forms)."""
    from rich.table import Table

    from llama_sae import tinyworld

    table = Table("name", "kind", "description")
    for c in tinyworld.concepts():
        table.add_row(c.name, c.kind, c.description)
    console.print(table)


@tinyworld_app.command("recovery")
def tinyworld_recovery(
    sae: Annotated[str, typer.Option(help="SAE of a tinyworld model (any format `sae info` reads)")],
    model: ModelOpt = None,
    sentences: Annotated[int, typer.Option(min=1000, help="held-out sentences: half choose each concept's best "
                                                        "latent, half score it")] = 4000,
    threshold: Annotated[float, typer.Option(min=0.5, max=1.0, help="AUROC that counts as recovered")] = 0.95,
    out: Annotated[Path | None, typer.Option(help="also write the result as JSON here")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Ground truth: the SAE latent that best picks out each planted concept, against the best single neuron.

    Held-out AUROC per concept: the demo's stage 7 on any SAE of a tinyworld model."""
    from llama_sae.fileio import atomic_write_json
    from llama_sae.sae import load
    from llama_sae.tinyworld.recovery import concept_recovery, print_recovery

    if out is not None:
        check_output_file(out)
    llama, tok = _load(model, None, device)
    result = concept_recovery(llama, tok, load(sae, device=device), n_sentences=sentences, threshold=threshold)
    print_recovery(console, result)
    if out is not None:
        atomic_write_json(out, result)


@corpus_app.command("preview")
def corpus_preview(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help=CORPUS_HELP)],
    n: Annotated[int, typer.Option("-n", min=0, help="samples to show")] = 5,
    scan: Annotated[int, typer.Option(min=1, help="sentences to scan for the counts")] = 1000,
    dedupe: Annotated[bool, typer.Option(help="drop exact duplicate sentences")] = False,
    split_sentences: SplitOpt = None,
) -> None:
    """Show counts, a fingerprint and samples of a corpus source."""
    from llama_sae.corpus import preview, preview_table

    console.print(preview_table(preview(source, n, scan=scan, dedupe=dedupe, split_sentences=split_sentences)))


@app.command()
def capture(
    corpus: Annotated[str, typer.Option(metavar="SOURCE", help=CORPUS_HELP)],
    hook: Annotated[list[str], typer.Option(metavar="HOOK",
                                            help="hook point KIND.LAYER (repeatable), e.g. resid_post.12")],
    tokens: Annotated[str, typer.Option(help="tokens to capture, BOS excluded (e.g. 2M, 700_000_000)")],
    out: Annotated[Path, typer.Option(help="store directory; re-run the same command to resume")],
    model: ModelOpt = None,
    context: Annotated[int, typer.Option(help="tokens per packed row; longer sentences are truncated")] = 256,
    batch_tokens: Annotated[int, typer.Option(help="tokens per forward pass")] = 8192,
    dtype: DtypeOpt = None,
    store_dtype: Annotated[str, typer.Option(help="activation dtype on disk: bfloat16, float16, float32")] = "bfloat16",
    shard_rows: Annotated[int | None, typer.Option(help="rows per shard; default: about 64 MiB per shard")] = None,
    outlier_factor: Annotated[float | None, typer.Option(help="drop tokens whose norm is above this x the "
                                                              "batch median (attention sinks); off by default")] = None,
    val_percent: Annotated[int, typer.Option(min=0, max=99, help="percent of sentences in the validation split")] = 5,
    device: DeviceOpt = "cpu",
    progress: Annotated[bool, typer.Option(help="progress bar with tokens/s and ETA (rank 0)")] = True,
    repair: Annotated[bool, typer.Option(help="finished store: recompute shards that fail verification")] = False,
    split_sentences: SplitOpt = None,
) -> None:
    """Capture hook-point activations over a corpus into a sharded store (resumable; torchrun for several ranks)."""
    import os

    from rich.table import Table

    from llama_sae.capture import capture as run_capture
    from llama_sae.capture import capture_config, parse_count

    cfg = capture_config(model=_model_path(model), corpus=corpus, hooks=hook, tokens=parse_count(tokens, "--tokens"),
                         out=str(out), context=context, batch_tokens=batch_tokens, dtype=dtype,
                         store_dtype=store_dtype, shard_rows=shard_rows, outlier_factor=outlier_factor,
                         val_percent=val_percent, device=device, progress=progress, repair=repair,
                         split_sentences=split_sentences)
    summary = run_capture(cfg, console=console)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for the whole store
    table = Table(show_header=False, title="capture")
    for key, value in summary.rows_table():
        table.add_row(key, value)
    console.print(table)


store_app = typer.Typer(no_args_is_help=True, help="Inspect and check activation stores.")
app.add_typer(store_app, name="store")


@store_app.command("info")
def store_info(path: Annotated[Path, typer.Argument(metavar="STORE", help="store directory")]) -> None:
    """Show a store's model, hook points, rows, bytes per token, split and statistics (finished or not)."""
    from llama_sae.store import store_info_table

    console.print(store_info_table(path))


@store_app.command("verify")
def store_verify(path: Annotated[Path, typer.Argument(metavar="STORE", help="store directory")]) -> None:
    """Re-hash every shard against the manifest's sha256; exit status 1 names the bad shards and the fix."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from llama_sae.store import read_manifest, verify_store

    manifest = read_manifest(path)  # not a store: one line before the progress bar (which would leave a blank line)
    finished = manifest["status"] == "complete"
    with Progress(TextColumn("verify"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("verify", total=None)
        report = verify_store(path, on_shard=lambda n, total: bar.update(task, advance=n, total=total))
    for name in report.leftovers:  # a finished store's capture sweeps temp files only, not unlisted shards
        fate = "delete it" if finished else "the next capture run removes it"
        err_console.print(f"note: {name} is not part of the store (left by a crash); {fate}",
                          style="yellow", markup=False, highlight=False)
    if report.ok:
        console.print(f"ok: {report.shards} shards, {report.bytes:,} bytes match their checksums"
                      + ("" if finished else "; the capture is unfinished: run the same capture command again to "
                         "complete it"))
        return
    for problem in report.problems:
        err_console.print(f"bad: {problem}", style="red", markup=False, highlight=False)
    raise typer.Exit(1)


@app.command()
def train(
    store: Annotated[Path, typer.Option(help="activation store directory")],
    out: Annotated[Path, typer.Option(help="output directory: the SAE (SAELens v6 layout), checkpoint, metrics")],
    preset: Annotated[str | None, typer.Option(help="named preset, e.g. 'seed' (the seed project's settings)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of training options: any TrainConfig field, e.g. "
                                                     "normalize_activations: none (needed for a sparsify export), "
                                                     "log_every, k_aux")] = None,
    d_sae: Annotated[str | None, typer.Option(help="latents, or a comma list for a sweep (e.g. 4096,8192) "
                                                   "(default: 8 x d_in)")] = None,
    k: Annotated[str | None, typer.Option(help="active latents per token, or a comma list for a sweep "
                                               "(default: 32)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="tokens per optimizer step (all ranks) (default: 4096)")]
    = None,
    tokens: Annotated[str | None, typer.Option(help="training tokens, e.g. 500k or 2M (default: epochs x the "
                                                    "split)")] = None,
    epochs: Annotated[int | None, typer.Option(help="passes over the split when --tokens is not set "
                                                    "(default: 1)")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default: 2e-4 / sqrt(d_sae / 16384))")]
    = None,
    bf16: Annotated[bool | None, typer.Option(help="bf16 encoder GEMM with fp32 master weights (default: off)")]
    = None,
    hook: Annotated[str | None, typer.Option(help="hook point of a multi-hook store (default: the store's only "
                                                  "one)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cpu)")] = None,
    wandb: Annotated[bool | None, typer.Option(help="also log to Weights & Biases (default: off)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the init and the shuffle (default: 0)")] = None,
    dead_tokens: Annotated[str | None, typer.Option(help="a latent that has not fired for this many tokens is dead "
                                                         "and gets the aux-k loss, e.g. 10M (default: 1M; the seed "
                                                         "preset's 655M suits its 6.5B tokens: scale it with a "
                                                         "shorter run)")] = None,
    eval_every: Annotated[int | None, typer.Option(help="steps between spliced evaluations (CE recovered, KL) "
                                                        "in --eval-model, taken at the next metrics record (every "
                                                        "log_every = 50 steps); one more at the end")] = None,
    eval_model: Annotated[str | None, typer.Option(help="checkpoint to splice the SAE into for evaluation "
                                                        "(default with --eval-every: the store's model)")] = None,
    eval_corpus: Annotated[str | None, typer.Option(help="SOURCE of held-out evaluation texts")] = None,
) -> None:
    """Train TopK SAE(s) on an activation store (resumes from out/checkpoint.pt; torchrun for several ranks)."""
    from llama_sae.sae.train import load_config, parse_int_list
    from llama_sae.sae.train import train as run_train

    if tokens is not None and epochs is not None:
        raise UserError("pass --tokens or --epochs, not both: --tokens sets the length exactly, --epochs in passes "
                        "over the training split")

    from llama_sae.capture import parse_count

    defaults = {}
    if eval_every is not None or eval_corpus is not None:  # below a preset's or config file's eval_model
        from llama_sae.store import ActivationStore

        defaults["eval_model"] = ActivationStore(store).manifest["model"]["path"]  # where the activations came from
    cfg = load_config(preset, config, defaults=defaults, d_sae=parse_int_list(d_sae), k=parse_int_list(k),
                      batch_size=batch_size, tokens=None if tokens is None else parse_count(tokens, "--tokens"),
                      epochs=epochs, lr=lr, bf16=bf16, hook=hook, device=device, wandb=wandb, seed=seed,
                      eval_every=eval_every, eval_model=eval_model, eval_corpus=eval_corpus,
                      dead_tokens_threshold=None if dead_tokens is None else parse_count(dead_tokens, "--dead-tokens"))
    from_store = cfg.eval_model is not None and cfg.eval_model == defaults.get("eval_model")
    if from_store and not Path(cfg.eval_model).exists():
        raise UserError(f"the spliced evaluation uses the store's model, {cfg.eval_model} (from its manifest), "
                        "which is not there any more: pass --eval-model PATH")
    try:
        for path in run_train(store, out, cfg):
            console.print(f"SAE: {path}")
    except KeyboardInterrupt as e:  # typer turns a KeyboardInterrupt into a silent exit 130: say what was kept
        err_console.print(str(e) or f"interrupted: the same command resumes from {out / 'checkpoint.pt'} if one "
                          "was written (every checkpoint_every steps), else starts over",
                          style="bold red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(130)  # past typer and main: their exit-130 message would repeat this one


@app.command()
def evaluate(
    sae: Annotated[str, typer.Option(help="SAE: SAELens or sparsify directory, seed .pth, hf://org/repo\\[/dir]")],
    store: Annotated[Path | None, typer.Option(help="activation store: metrics on its val split")] = None,
    corpus: Annotated[str | None, typer.Option(help="SOURCE for the model metrics (CE recovered, KL); without "
                                                    "--store, the activation metrics too (on its texts, BOS "
                                                    "left out)")] = None,
    model: ModelOpt = None,
    n_texts: Annotated[int, typer.Option(min=1, help="texts of the corpus for the model metrics")] = 200,
    out: Annotated[Path | None, typer.Option(help="write the JSON report here (and the frequency histogram "
                                                  "beside it, NAME_frequency.png)")] = None,
    k: Annotated[int | None, typer.Option(min=1, help="k to evaluate at (default: the SAE file's; the seed's .pth "
                                                      "has none: pass --k 64, its setting)")] = None,
    hook: Annotated[str | None, typer.Option(help="hook point, where the SAE file lacks it")] = None,
    bf16_encoder: Annotated[bool, typer.Option(help="spliced CE/KL with the encoder GEMM in bf16: faster on AMX "
                                                    "CPUs and GPUs; on a GPU it may swap near-tied latents at the "
                                                    "k-th place")
                            ] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    split_sentences: SplitOpt = None,
) -> None:
    """Evaluate an SAE: FVU, L0, dead / dense latents; with --corpus, also CE loss recovered and KL in the model.

    The activation metrics run on --store's held-out split, or on the --corpus texts' activations."""
    from itertools import islice

    import torch
    from rich.table import Table

    from llama_sae.fileio import atomic_write_json
    from llama_sae.sae import load
    from llama_sae.sae.evaluate import (
        activation_metrics,
        hook_activations,
        model_metrics,
        plot_frequency,
        rows_mean,
        summary_rows,
        token_batches,
    )

    if out is not None:
        check_output_file(out)
        check_output_file(out.with_name(f"{out.stem}_frequency.png"))  # written beside it, after the work
    from llama_sae.sae.formats import find

    check_device(device)  # before any file is read, as load does
    found = find(sae)  # once: an hf:// SAE is not looked up again for its metadata
    net = load(found.path, device=device, k=k, hook_name=hook)
    if store is None and corpus is None:
        raise UserError("nothing to evaluate on: pass --store STORE_DIR and/or --corpus SOURCE")
    report: dict = {"inputs": {"sae": str(sae), "k": net.cfg.k, "hook": net.cfg.hook_name,  # what was evaluated
                               "store": None if store is None else str(store), "corpus": corpus,
                               "model": None if corpus is None else _model_path(model)}}
    if store is not None:
        from llama_sae.store import ActivationStore

        src = ActivationStore(store)
        trained_on, holds = found.metadata.get("model_fingerprint"), src.manifest["model"]["fingerprint"]
        if trained_on and trained_on != holds:  # a transfer test, or a mix-up
            err_console.print(f"note: the SAE was trained on activations of another checkpoint (fingerprint "
                              f"{trained_on[:16]}) than store {store} holds ({holds[:16]})", style="yellow",
                              markup=False, highlight=False)
        if src.d != net.cfg.d_in:
            raise UserError(f"the SAE reads {net.cfg.d_in}-wide activations but store {store} holds {src.d}-wide ones: "
                            "the SAE belongs to another model (or layer kind); pass its own store")
        report.update(activation_metrics(net, src.loader(4096, shuffle=False, split="val", epochs=1, drop_last=False,
                                                         hook=net.cfg.hook_name)))
    if corpus is not None:
        from llama_sae.corpus import iter_sentences

        llama, tok = _load(model, dtype, device)
        texts = [s.text for s in islice(iter_sentences(corpus, split_sentences=split_sentences), n_texts)]
        report["inputs"]["texts"] = len(texts)
        batches = list(token_batches(tok, texts))
        mean = None
        if store is None:  # the activation metrics on the same texts, whose mean is also the mean ablation's
            from llama_sae.splice import check_fits

            acts = list(hook_activations(llama, check_fits(llama, net), batches))
            report.update(activation_metrics(net, acts))
            report["activations"] = f"{corpus}, first {len(texts)} texts (no --store)"
            mean = rows_mean(acts)
        report.update(model_metrics(llama, net, batches, compute_dtype=torch.bfloat16 if bf16_encoder else None,
                                    mean=mean))
        report["encoder_dtype"] = "bfloat16" if bf16_encoder else str(net.W_enc.dtype).removeprefix("torch.")
        report["model_dtype"] = str(llama.dtype).removeprefix("torch.")
    table = Table("metric", "value", title=f"evaluation of {sae}")
    for key, value in summary_rows(report):
        table.add_row(key, value)
    console.print(table)
    if out is not None:
        atomic_write_json(out, report)
        if "frequency" in report and plot_frequency(report, out.with_name(f"{out.stem}_frequency.png")):
            console.print(f"report: {out}; frequency histogram: {out.with_name(f'{out.stem}_frequency.png')}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory for the demo's files")] = Path("runs/demo"),
    device: DeviceOpt = "cpu",
) -> None:
    """Run every stage end to end on the shipped tiny model and corpus."""
    from llama_sae.demo import run_demo

    run_demo(out, console, check_device(device))


def _register_stages() -> None:
    from llama_sae import cli_ui
    from llama_sae.cli_interpret import register

    register(app)
    cli_ui.register(app)


_register_stages()


def _peer_gone(e: BaseException) -> bool:
    """Whether ``e`` is a gloo collective failing because the other end's process exited (not a timeout: a rank
    that hangs has not stopped)."""
    text = str(e)
    return "gloo" in text and ("Connection closed by peer" in text or "Connection reset by peer" in text)


def _disk_trouble(e: BaseException) -> str | None:
    """One line for a full or read-only file system (ENOSPC, EDQUOT, EROFS, or safetensors' and torch's wrapping
    of them, found also as the context of torch.save's "unexpected pos" error), or None for anything else."""
    import errno

    if isinstance(e.__context__, OSError) and e.__context__.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return _disk_trouble(e.__context__)
    where = getattr(e, "filename", None)
    at = f" writing {where}" if where else ""
    code = getattr(e, "errno", None)
    text = str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "(os error 28)" in text:
        return (f"the disk is full{at}: free some space and run the same command again (written files are "
                "complete or absent; a resumable run continues from its last checkpoint)")
    if code == errno.EROFS or "Read-only file system" in text or "(os error 30)" in text:
        return f"the file system is read-only{at}: choose an output on a writable disk"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main() -> None:
    """Console-script entry point: user errors (and errors about paths) become one line on stderr, exit status 2."""
    try:  # recent typer vendors click (its errors are typer._click's classes, not click's)
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError

    try:
        rc = app(standalone_mode=False, prog_name="llama-sae")  # click errors come back here, not as a usage box
    except UsageError as e:  # a bad option or value: one line, like every other error
        if not e.format_message():  # a command group run bare: its help is already printed
            sys.exit(e.exit_code)
        where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        message = e.format_message()
        option = getattr(e, "option_name", "") or ""
        if _is_number(option):  # click reads a negative number as an option name
            message = (f"{option} was read as an option: numbers given without an option name are 0 or more (a "
                       f"negative value for an option is written --name={option})")
        err_console.print(f"error: {message}{where}", style="bold red", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except typer.Abort:  # end of input at a prompt
        err_console.print("aborted", style="bold red", markup=False, highlight=False)
        sys.exit(1)
    except UserError as e:
        err_console.print(f"error: {e}", style="bold red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except PATH_ERRORS as e:  # a path no check caught earlier (a file where a directory goes, ...)
        err_console.print(f"error: {path_error_message(e)}", style="bold red", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except Exception as e:  # an input no check foresaw, or a bug: one line, the traceback on request
        if os.environ.get("LLAMA_SAE_TRACEBACK"):
            raise
        disk = _disk_trouble(e)
        if disk:  # the machine's, not an input's: say what to do
            err_console.print(f"error: {disk}", style="bold red", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        rank = os.environ.get("RANK", "0")
        if os.environ.get("WORLD_SIZE", "1") != "1" and _peer_gone(e):  # rank 0 too: any rank can fail first
            err_console.print(f"error: rank {rank} stopped: another rank of this torchrun run stopped first (its "
                              "error is printed beside this one)", style="bold red", markup=False, highlight=False,
                              soft_wrap=True)
            sys.exit(1)
        err_console.print(f"error: {type(e).__name__}: {first_line(e, 240)} (an input llama-sae does not check, or "
                          "a bug; LLAMA_SAE_TRACEBACK=1 shows where: please report it)", style="bold red",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    if rc == 130:  # typer's silent exit on Ctrl-C (train says what it kept, and exits itself)
        err_console.print("interrupted (capture, features, explain and score resume from what they finished when "
                          "run again)", style="bold red", markup=False, highlight=False)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
