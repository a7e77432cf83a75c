"""``llama-sae dashboard`` (static HTML) and ``llama-sae ui`` (the Gradio app); cli.py registers them."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from llama_sae.errors import UserError, check_output_dir

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="checkpoint directory; default: the shipped "
                                                                   "tinyworld model")]


def parse_latents(text: str | None, d_sae: int) -> list[int] | None:
    """'3,17,40-49' -> [3, 17, 40, ..., 49] (each once, in order); None or 'live' -> None (every latent that
    fired)."""
    if text is None or text == "live":
        return None
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdecimal() or (hi and not hi.isdecimal()):
            raise UserError(f"--latents {text!r}: write ids and ranges like 3,17,40-49 (or 'live')")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise UserError(f"--latents {text!r}: the range {part.strip()} runs backwards: write it low-high")
        if last >= d_sae:  # (checked before the range is listed: 0-99999999999 is no list to build)
            raise UserError(f"--latents: latent {last} is out of range, the SAE has latents 0..{d_sae - 1}")
        out += range(first, last + 1)
    return list(dict.fromkeys(out))  # a latent named twice is one latent


def resolve_sae(model: str | None, sae: Path | None, features: Path | None) -> tuple[Path, Path | None]:
    """The SAE and artifact to show: as given, or the shipped tinyworld SAE and its shipped artifact."""
    from llama_sae import tinyworld

    if sae is not None:
        return sae, features
    if model is not None:
        raise UserError("--model without --sae: pass the SAE trained on that model with --sae PATH")
    shipped = tinyworld.features_path()
    return tinyworld.sae_path(), features or (shipped if shipped.exists() else None)


def dashboard(
    out: Annotated[Path, typer.Option(help="output directory: index.html and latents/<i>.html")],
    sae: Annotated[Path | None, typer.Option(help="SAE directory; default: the shipped tinyworld SAE")] = None,
    features: Annotated[Path | None, typer.Option(help="features artifact of the SAE; default: the shipped one, "
                                                       "or built into OUT/features")] = None,
    model: ModelOpt = None,
    latents: Annotated[str | None, typer.Option(help="latents to show: ids and ranges (3,17,40-49); default: "
                                                     "every latent that fired")] = None,
    corpus: Annotated[str, typer.Option(help="SOURCE for a features artifact built here")] = "tinyworld:5000:heldout",
    sentences: Annotated[int, typer.Option(min=1, help="sentences for a features artifact built here")] = 5000,
    ui_url: Annotated[str, typer.Option(help="where `llama-sae ui` serves, for the steer links")] = (
        "http://127.0.0.1:7860"),
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Write a static HTML feature dashboard that opens from disk, one page per latent.

    Each page: explanation, top and quantile sentences, histogram, decoder logits, nearest latents, and a link to
    steer the latent in the UI."""
    from llama_sae import tinyworld
    from llama_sae.cli import _load, console
    from llama_sae.features import build_features, load_features
    from llama_sae.sae import load
    from llama_sae.ui.dashboard import write_dashboard

    if not ui_url.startswith(("http://", "https://")):  # it goes into every page's steer link
        raise UserError(f"--ui-url {ui_url!r} is not an http(s) address: pass where `llama-sae ui` serves, e.g. "
                        "http://127.0.0.1:7860")
    check_output_dir(out, "a dashboard", ours={"index.html", "latents", "dashboard.json", "features"})
    sae, features = resolve_sae(model, sae, features)
    llama, tok = _load(model, None, device)
    net = load(sae, device=device)
    if features is None:
        features = out / "features"
        console.print(f"no --features: building one from {sentences:,} sentences of {corpus} into {features}")
        build_features(llama, tok, net, corpus, features, sentences=sentences, sae_path=str(sae))
    f = load_features(features)
    ui_command = "llama-sae ui"  # the UI that serves the steer links: this SAE and artifact, this model
    if Path(sae).resolve() != tinyworld.sae_path().resolve() or model is not None or \
            Path(features).resolve() != tinyworld.features_path().resolve():  # another artifact: other units
        ui_command += (f" --sae {shlex.quote(str(Path(sae).resolve()))} --features "
                       f"{shlex.quote(str(Path(features).resolve()))}")
        if model is not None:
            ui_command += f" --model {shlex.quote(str(Path(model).resolve()) if Path(model).exists() else model)}"
    index = write_dashboard(out, f, net, llama, tok, latents=parse_latents(latents, net.cfg.d_sae), ui_url=ui_url,
                            ui_command=ui_command)
    console.print(f"dashboard: {index.resolve()} (open it in a browser; no server needed)")


def ui(
    model: ModelOpt = None,
    sae: Annotated[list[Path] | None, typer.Option(help="SAE directory (repeatable); default: the shipped "
                                                        "tinyworld SAE")] = None,
    features: Annotated[list[Path] | None, typer.Option(help="features artifact of a loaded SAE (repeatable)")] = None,
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the UI to your network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to serve on")] = 7860,
    open_browser: Annotated[bool, typer.Option("--open", help="open a browser tab")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Chat with the model in the browser: steering sliders, feature search, per-token features (Gradio)."""
    from llama_sae.cli import console

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the UI needs gradio: pip install 'llama-sae[ui]'") from None
    from llama_sae.ui.app import check_port, launch, load_session

    check_port(host, port)  # before loading anything
    session = load_session(model, [str(p) for p in sae or []], [str(p) for p in features or []], device)
    for note in session.notes:
        console.print(f"[dim]{note}[/dim]")
    console.print(f"llama-sae ui: http://{host}:{port} (Ctrl-C to stop)")
    launch(session, host=host, port=port, open_browser=open_browser)


def register(app: typer.Typer) -> None:
    """Add the dashboard and ui commands to the ``llama-sae`` app."""
    app.command()(dashboard)
    app.command()(ui)
