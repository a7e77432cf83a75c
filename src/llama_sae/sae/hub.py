"""SAEs on the Hugging Face hub, through huggingface_hub (the ``hf`` extra).

    hf://org/repo                 the SAE at the repo's root
    hf://org/repo/resid_post.3    the SAE in a folder of the repo (one SAE per hook point)
    hf://org/repo/dir@v1.0        at a revision (branch, tag or commit)

``HF_ENDPOINT`` selects the server, ``HF_TOKEN`` (or ``hf auth login``) the credentials, ``HF_HUB_OFFLINE=1``
serves from the local cache only: all read by huggingface_hub itself.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

from llama_sae.errors import UserError, check_output_dir, first_line
from llama_sae.fileio import atomic_write


class HubRef(NamedTuple):
    repo_id: str
    subdir: str | None
    revision: str | None


SAE_MARKERS = ("cfg.json", "sae.safetensors", "sae_weights.safetensors")  # a folder holding one of these is an SAE
REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")  # the hub's rule for an org or repo name
# what pull writes, and what a pull --overwrite removes when the new SAE has none of it (else read as the new one's)
SAE_FILES = ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "sparsity.safetensors", "README.md",
             "train_config.yaml", "evaluation.json", "evaluation.jsonl", "frequency.png", "metrics.jsonl")


def _repo_part(part: str) -> bool:
    """Whether ``part`` is a valid org or repo name on the hub (no '--' or '..', no '.git', '-' or '.' at the end)."""
    return bool(REPO_PART.fullmatch(part)) and "--" not in part and ".." not in part \
        and not part.endswith((".git", "-", "."))


def parse_uri(uri: str) -> HubRef:
    """Split ``hf://org/repo[/subdir][@revision]``; a one-line error for anything else."""
    rest = uri.removeprefix("hf://")
    rest, _, revision = rest.partition("@")
    parts = [p for p in rest.split("/") if p]
    if not uri.startswith("hf://") or len(parts) < 2 or any(p in (".", "..") for p in parts) \
            or not all(_repo_part(p) for p in parts[:2]) or any(c in "*?[]" for c in rest):
        raise UserError(f"{uri!r} is not a hub reference: write hf://org/repo, hf://org/repo/subdir or "
                        "hf://org/repo/subdir@revision (org and repo: letters, digits, '-', '_', '.'; no '--' or "
                        "'..', no '.git' at the end)")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def _network_error(e: BaseException) -> bool:
    """Whether ``e`` comes from the network layer under huggingface_hub (a cut or stalled transfer, a refused
    connection): httpx's, requests', urllib3's own types, or the built-in ones."""
    return isinstance(e, (ConnectionError, TimeoutError)) or \
        type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors  # noqa: F401  (submodules the lazy package does not expose as attributes)
    except ImportError as e:
        raise UserError("the Hugging Face hub needs huggingface_hub: pip install 'llama-sae[hf]'") from e
    return huggingface_hub


def download(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory (in the huggingface_hub cache) holding the SAE at ``uri``; downloads what is missing.

    Without a folder in ``uri``, only the repo's top-level files are fetched (a repo of many SAEs in folders is not
    downloaded whole to say which folder to name)."""
    ref = parse_uri(uri)
    hub = _hub()
    quiet = logging.getLogger("huggingface_hub._snapshot_download")  # its "No files matched" warning: the
    level = quiet.level  # missing folder gets our one-line error below instead
    quiet.setLevel(logging.ERROR)
    try:
        patterns = [f"{ref.subdir}/*"] if ref.subdir else _top_level_files(hub, ref)
        root = hub.snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache_dir,
                                     allow_patterns=patterns)
    except UserError:
        raise
    except hub.errors.GatedRepoError as e:  # (a kind of RepositoryNotFoundError: first)
        raise UserError(f"{uri}: the repo is gated: accept its conditions on its hub page, and set HF_TOKEN to a "
                        "token of that account") from e
    except hub.errors.RepositoryNotFoundError as e:
        raise UserError(f"{uri}: no such repo on {hub.constants.ENDPOINT} (or it is private: set HF_TOKEN)") from e
    except hub.errors.RevisionNotFoundError as e:
        raise UserError(f"{uri}: revision {ref.revision!r} does not exist: use a branch, tag or commit") from e
    except hub.errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        fix = "HF_TOKEN was refused: set a valid token, or unset it for a public repo" if status == 401 else \
            "check the network and HF_ENDPOINT, and run the same command again"
        raise UserError(f"{uri}: cannot download ({first_line(e)}): {fix}") from e
    except (hub.errors.LocalEntryNotFoundError, OSError) as e:
        raise UserError(f"{uri}: cannot download ({first_line(e)}): check the network, or unset HF_HUB_OFFLINE "
                        "if it is set") from e
    except Exception as e:
        if not _network_error(e):
            raise
        raise UserError(f"{uri}: the download was cut off or timed out ({type(e).__name__}: {first_line(e)}): run "
                        "the same command again (finished files are kept in the cache)") from e
    finally:
        quiet.setLevel(level)
    path = Path(root) / ref.subdir if ref.subdir else Path(root)
    if not path.is_dir():
        raise UserError(f"{uri}: the repo has no folder {ref.subdir!r}: list its folders on the hub and pick one")
    return path


def _top_level_files(hub, ref: HubRef) -> list[str] | None:
    """The patterns of the SAE at the repo's top: its files (asked of the hub) and a features/ folder beside them;
    None offline (the cache then serves what it has).
    A repo with no SAE at its top but SAEs in folders is a one-line error naming them, before any download."""
    if hub.constants.HF_HUB_OFFLINE:
        return None
    names = [s.rfilename for s in hub.HfApi().model_info(ref.repo_id, revision=ref.revision).siblings or []]
    top = [n for n in names if "/" not in n]
    if not any(n in SAE_MARKERS for n in top):
        raise _no_sae(ref, names)
    return top + ["features/*"]  # the SAE's bundled features artifact, if it has one


def _no_sae(ref: HubRef, names: list[str]) -> UserError:
    """The error for a place in a repo with no SAE, naming the folders below it that hold one (``names``: file
    paths relative to that place)."""
    at = f"@{ref.revision}" if ref.revision else ""
    place = f"hf://{ref.repo_id}" + (f"/{ref.subdir}" if ref.subdir else "")
    inner = sorted({n.rsplit("/", 1)[0] for n in names if n.endswith("/cfg.json")})  # nested folders too
    hint = f": its SAEs are in {', '.join(inner)}; pull {place}/{inner[0]}{at}" if inner else ""
    return UserError(f"{place}{at} holds no SAE (no cfg.json){hint}")


def pull(uri: str, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Download the SAE at ``uri`` and copy its files into the directory ``out`` (each file written atomically;
    a non-empty ``out`` only with ``overwrite``)."""
    out = Path(out)
    check_output_dir(out, f"the SAE from {uri}", overwrite=overwrite)
    src = download(uri)
    if not any((src / name).is_file() for name in SAE_MARKERS):  # (offline: the cache's copy was not listed first)
        raise _no_sae(parse_uri(uri), [p.relative_to(src).as_posix() for p in src.rglob("cfg.json")])
    # this SAE's files and its features/ (the cache folder may also hold other folders' SAEs of the same repo)
    files = sorted(p for p in [*src.iterdir(), *(src / "features").rglob("*")] if p.is_file())
    out.mkdir(parents=True, exist_ok=True)
    for file in files:  # (a bundled features/ artifact too)
        (out / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out / file.relative_to(src), file.read_bytes())
    pulled = {f.relative_to(src).parts[0] for f in files}
    for name in (*SAE_FILES, "features"):  # the previous SAE's files, which would be read as this one's
        if name not in pulled and (out / name).is_file():
            (out / name).unlink()
        elif name not in pulled and (out / name).is_dir():
            shutil.rmtree(out / name)
    return out


def push(path: str | os.PathLike, repo_id: str, *, subdir: str | None = None, private: bool = False,
         message: str | None = None) -> str:
    """Upload the SAE directory ``path`` to ``repo_id`` (created if missing), under ``subdir`` if given.
    ``repo_id`` is org/name, or the hf://org/name[/subdir] that pull and load take.

    The directory is checked to load first; dotfiles and a trainer's checkpoint.pt are not uploaded (the weights,
    cfg.json, sparsity, evaluation.json, metrics and plots are). Returns the hf:// reference of the uploaded SAE.
    """
    from llama_sae.sae.formats import find, load

    path = Path(path)
    found = find(path)
    if found.format == "seed" or not path.is_dir():
        raise UserError(f"{path}: push uploads an SAE directory: convert the .pth first (llama-sae sae convert)")
    ref = parse_uri(repo_id if repo_id.startswith("hf://") else f"hf://{repo_id}")  # validates org/name
    if ref.revision:
        raise UserError(f"{repo_id!r}: an upload goes to the repo's main branch: drop @{ref.revision}")
    if subdir is not None:
        parts = subdir.strip("/").split("/")
        if subdir.startswith("/") or not subdir.strip("/") or any(p in ("", ".", "..") for p in parts):
            raise UserError(f"--subdir {subdir!r}: name a folder inside the repo, such as resid_post.3 (no '..', "
                            "no leading '/')")
        subdir = "/".join(parts)
    if ref.subdir and subdir and ref.subdir != subdir:
        raise UserError(f"{repo_id!r} names the folder {ref.subdir} and --subdir {subdir}: give it once")
    repo_id, subdir = ref.repo_id, subdir or ref.subdir
    load(path)  # weights, shapes and config: an SAE that does not load is not uploaded
    hub = _hub()
    api = hub.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(path), path_in_repo=subdir or "",
                          commit_message=message or f"Upload {found.format} SAE ({found.values.get('hook_name')})",
                          ignore_patterns=[".*", "checkpoint.pt"])  # the optimizer state stays home
    except hub.errors.OfflineModeIsEnabled:
        raise UserError(f"upload to {repo_id}: the hub is in offline mode (HF_HUB_OFFLINE is set): unset it "
                        "to upload") from None
    except hub.errors.HfHubHTTPError as e:
        raise UserError(f"upload to {repo_id} failed ({first_line(e)}): check HF_TOKEN has write access") from e
    except Exception as e:  # the network layer's own errors (connection refused, timeouts, TLS)
        raise UserError(f"upload to {repo_id} failed ({type(e).__name__}: {first_line(e)}): check the network "
                        f"and HF_ENDPOINT ({hub.constants.ENDPOINT})") from e
    return f"hf://{repo_id}" + (f"/{subdir}" if subdir else "")
