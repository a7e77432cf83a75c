"""``llama-sae sae ...``: inspect, convert and share SAE files (SAELens, sparsify, the seed's .pth, the HF hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

sae_app = typer.Typer(no_args_is_help=True, help="SAE files: info, convert (SAELens, sparsify, seed .pth), push, pull.")
console = Console(emoji=False)

PathArg = Annotated[str, typer.Argument(metavar="SAE", help="SAE directory (SAELens or sparsify), seed .pth, or hf://org/repo\\[/dir]")]
KOpt = Annotated[int | None, typer.Option(min=1, help="k (default: the file's; the seed's .pth has none: pass --k 64, "
                                                      "its setting)")]
HookOpt = Annotated[str | None, typer.Option(help="hook point, where the file lacks it (e.g. attn_in.23)")]


@sae_app.command("info")
def info(path: PathArg) -> None:
    """What an SAE file says: format, shape, k, normalization, hook point, what is missing, whether it loads.

    The exit status is 1 when it does not load."""
    from rich.table import Table

    from llama_sae.sae.formats import describe

    table = Table("field", "value", title=str(path))
    rows = describe(path)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if dict(rows)["verdict"].startswith(("does not load", "does not run here")):
        raise typer.Exit(1)


@sae_app.command("convert")
def convert(
    path: PathArg,
    to: Annotated[str, typer.Option(help="saelens or sparsify")],
    out: Annotated[Path, typer.Option(help="output directory")],
    k: KOpt = None,
    hook: HookOpt = None,
    overwrite: Annotated[bool, typer.Option(help="write into a non-empty --out directory")] = False,
) -> None:
    """Rewrite an SAE in another format (reads SAELens, sparsify, the seed's .pth; writes SAELens or sparsify)."""
    from llama_sae.errors import check_output_dir
    from llama_sae.fileio import lock_output
    from llama_sae.sae.formats import convert as run_convert

    check_output_dir(out, f"a {to} SAE", overwrite=overwrite)
    with lock_output(out, f"the converted SAE {out}"):  # two converts into one --out: one SAE's files over the other's
        done = run_convert(path, to, out, k=k, hook_name=hook)
    console.print(f"wrote {to} SAE to {done}")
    if to == "sparsify":
        from llama_sae.sae.formats import find, hf_module_name

        module = (hf_module_name(find(done).values.get("hook_name")) or "").removeprefix("model.")
        if module and done.name != module:
            console.print(f"note: sparsify's load_many names SAEs by their directory, the hook module: "
                          f"for this SAE, {done.parent / module}")


@sae_app.command("push")
def push(
    path: Annotated[Path, typer.Argument(metavar="SAE", help="SAE directory to upload")],
    repo: Annotated[str, typer.Argument(metavar="REPO", help="Hugging Face repo: org/name, or hf://org/name/subdir")],
    subdir: Annotated[str | None, typer.Option(help="folder inside the repo (one SAE per hook, e.g. resid_post.3)")]
    = None,
    private: Annotated[bool, typer.Option(help="create the repo private")] = False,
) -> None:
    """Upload an SAE directory to the Hugging Face hub (token: HF_TOKEN or `hf auth login`)."""
    from llama_sae.sae.hub import push as run_push

    console.print(f"uploaded: {run_push(path, repo, subdir=subdir, private=private)}")


@sae_app.command("pull")
def pull(
    uri: Annotated[str, typer.Argument(metavar="URI", help="hf://org/repo, optionally /subdir and @revision")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="directory to copy the SAE into")],
    overwrite: Annotated[bool, typer.Option(help="copy into a non-empty directory")] = False,
) -> None:
    """Download an SAE from the Hugging Face hub into a directory."""
    from llama_sae.sae.hub import pull as run_pull

    console.print(f"downloaded to {run_pull(uri, out, overwrite=overwrite)}")
