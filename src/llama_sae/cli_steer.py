"""``llama-sae generate/chat --sae PATH [--steer SPEC] [--show-features]``: steered generation in the terminal.

cli.py keeps the options; this module loads the SAEs, prints and records. Every steered generation is
saved as a JSON record (model, SAEs with fingerprints, steers with their units, sampling, prompts,
outputs) that ``llama-sae generate --replay FILE`` runs again.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llama_sae.errors import UserError
from llama_sae.terminal import literal, print_stream, printable


@dataclass
class SteerSetup:
    """What --sae / --steer / --features resolve to."""

    saes: dict  # hook -> SAE
    features: dict  # hook -> Features
    steering: object | None  # steer.Steering, None without --steer


def _same_device(a: str, b: str) -> bool:
    """Whether two device strings name one device ("cuda" is the current GPU: the same as "cuda:0" there)."""
    def key(d: str) -> tuple[str, int]:
        dev = torch.device(d)
        current = torch.cuda.current_device() if dev.type == "cuda" and torch.cuda.is_available() else 0
        return dev.type, current if dev.index is None else dev.index
    return key(a) == key(b)


def setup(model, tokenizer, sae_paths: list[Path] | None, specs: list[str], feature_paths: list[Path] | None,
          console: Console, err_console: Console, *, model_given: bool = False) -> SteerSetup:
    """Load SAEs and artifacts, parse and check the steers (warnings printed), estimating units if needed.

    Without --sae on the shipped tiny model, the shipped tinyworld SAE (and its features artifact) is used."""
    from llama_sae import tinyworld
    from llama_sae.steer import ESTIMATE_SENTENCES, build_steering, load_saes, match_features, parse_steers

    steers = parse_steers(specs)  # malformed specs fail before anything loads
    feature_paths = list(feature_paths or [])
    if not sae_paths:
        if model_given:
            raise UserError("--steer, --features and --show-features need an SAE of this model: pass --sae PATH")
        sae_paths = [tinyworld.sae_path()]
        if not feature_paths and tinyworld.features_path().exists():
            feature_paths = [tinyworld.features_path()]
        err_console.print(f"note: no --sae: using the shipped tinyworld SAE {sae_paths[0]}", style="dim",
                          markup=False, highlight=False)
    saes, sources = load_saes(model, sae_paths)
    notes: list[str] = []
    features = match_features(feature_paths, saes, sources, notes)
    for line in notes:
        err_console.print(f"note: {line}", style="yellow", markup=False, highlight=False)
    steering = None
    if steers:
        def note(missing: list[str]) -> None:
            err_console.print(f"note: no features artifact for {', '.join(missing)}: estimating each latent's "
                              f"typical max activation over {ESTIMATE_SENTENCES:,} tinyworld sentences (pass "
                              "--features DIR for one built on your corpus)",
                              style="yellow", markup=False, highlight=False)
        steering = build_steering(model, tokenizer, saes, steers, sources=sources, features=features, on_estimate=note)
        for line in steering.warnings:
            err_console.print(f"warning: {line}", style="yellow", markup=False, highlight=False)
        table = Table("steer", "unit (typical max)", "value", title="steering")
        for d in steering.describe():
            table.add_row(Text(d["spec"]), f"{d['unit']:.3g}", f"{d['value']:.3g}")  # Text: no ":emoji:" codes
        console.print(table)
    return SteerSetup(saes, features, steering)


def write_record(rec: dict, record: Path | None) -> Path:
    """Write the record (default: runs/steer/<UTC time>.json); returns the path."""
    from llama_sae.fileio import atomic_write_json

    if record is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        record = Path("runs/steer") / f"{stamp}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, rec)
    return record


def run_replay(path: Path, console: Console, *, device: str = "cpu", dtype: str | None = None) -> None:
    """``--replay FILE``: generate the recorded prompts again and say whether the outputs match."""
    from llama_sae.steer import replay

    if not path.is_file():
        raise UserError(f"record {path} does not exist or is not a file: pass a JSON file written by a steered "
                        "generate or chat")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"record {path} is not valid JSON ({e}): pass a file written by llama-sae") from None
    outs = replay(rec, device=device, dtype=dtype)
    same = outs == rec["outputs"]
    for prompt, out in zip(rec["prompts"] if not rec["chat"] else [rec["prompts"][-1]["content"]], outs):
        console.print(printable(prompt), end="", style="bold", markup=False, highlight=False)
        console.print(printable(out), markup=False, highlight=False)
    console.print(f"replay of {path}: outputs {'match the record' if same else 'DIFFER from the record'}")
    if not same and not _same_device(rec.get("device", device), device):
        console.print(f"the record was made on {rec['device']}: sampled outputs repeat only there (--device "
                      f"{rec['device']})", markup=False, highlight=False)
    if not same:
        raise SystemExit(1)


def token_features(model, tokenizer, saes: dict, tokens: list[int], top: int = 3) -> dict[str, list]:
    """For each SAE: per token (BOS skipped) [(token text, [(latent, activation), ...])], strongest first.

    The activations are the SAE's reading of the residual stream at its hook (before any steering edit there).
    A token's text is what it adds to the decoded text: a token holding part of a character shows nothing, and
    the token that completes it shows the whole character, so the rows join up to the text."""
    ids = torch.tensor([tokens], device=model.device)
    acts = model.capture(ids, list(saes))
    out = {}
    for hook, sae in saes.items():
        vals, idx = sae.encode_topk(acts[hook][0])  # [T, k]
        order = vals.argsort(dim=-1, descending=True)[:, :top]
        vals, idx = vals.gather(1, order).cpu(), idx.gather(1, order).cpu()  # one copy, not one per element
        rows, text = [], tokenizer.stream_decoder()
        for t, tok in enumerate(tokens):
            if t == 0 and tok == tokenizer.bos_id:
                continue
            rows.append((text.feed(tok), [(int(i), float(v)) for i, v in zip(idx[t], vals[t]) if v > 0]))
        if rows and (rest := text.flush()):  # bytes that never completed a character
            rows[-1] = (rows[-1][0] + rest, rows[-1][1])
        out[hook] = rows
    return out


def explanation_text(features, latent: int) -> str:
    e = None if features is None else features.explanation(latent)
    return "" if e is None else e.text


def print_token_features(console: Console, model, tokenizer, setup: SteerSetup, prompt_tokens: list[int],
                         new_tokens: list[int], top: int) -> None:
    """The seed's terminal view: each token of prompt and completion with its top latents and explanations."""
    n_prompt = len(prompt_tokens) - (1 if prompt_tokens and prompt_tokens[0] == tokenizer.bos_id else 0)
    for hook, rows in token_features(model, tokenizer, setup.saes, prompt_tokens + new_tokens, top).items():
        table = Table("", "token", f"top {top} latents (activation) explanation", title=f"features at {hook}",
                      show_lines=False)
        for t, (text, latents) in enumerate(rows):
            where = "prompt" if t < n_prompt else "gen"
            cells = [f"{i} ({v:.2f}) {explanation_text(setup.features.get(hook), i)}".rstrip() for i, v in latents]
            table.add_row(where if t in (0, n_prompt) else "", Text(repr(text)), literal(" · ".join(cells)))
        console.print(table)


def steered_generate(console: Console, err_console: Console, model, tokenizer, model_path: str,
                     prompts: list[str], setup: SteerSetup, *, show_features: bool, top: int, record: Path | None,
                     stream: bool, **kw) -> None:
    """``generate`` with an SAE loaded: steered (if any steers), token features (if asked), a record."""
    from llama_sae import steer

    if stream and len(prompts) == 1 and not show_features:
        outputs = [print_stream(console, prompts[0],
                                steer.generate(model, tokenizer, prompts, setup.steering, stream=True, **kw))]
    else:
        outs = steer.generate(model, tokenizer, prompts, setup.steering, **kw)
        outputs = [o.text for o in outs]
        for p, o in zip(prompts, outs):
            console.print(printable(p), end="", style="bold", markup=False, highlight=False)
            console.print(printable(o.text), markup=False, highlight=False)
            if show_features:
                print_token_features(console, model, tokenizer, setup, o.prompt_tokens, o.tokens, top)
    if setup.steering is not None:
        path = write_record(steer.record(setup.steering, model_path, prompts, outputs, kw, model=model), record)
        where = "" if str(model.device) == "cpu" else f" --device {model.device}"
        console.print(f"record: {path} (re-run with llama-sae generate --replay {path}{where})", style="dim",
                      markup=False)
