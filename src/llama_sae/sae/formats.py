"""SAEs on disk: SAELens v6 (native), EleutherAI sparsify, and the seed project's checkpoint.

Native, SAELens v6 (``sae_lens.SAE.load_from_disk(path)`` reads our SAEs, and we read its TopK SAEs):

    cfg.json                  {"architecture": "topk", "d_in", "d_sae", "k", "dtype", "device",
                               "apply_b_dec_to_input": true, "normalize_activations": "layer_norm" | "none",
                               "reshape_activations": "none", "rescale_acts_by_decoder_norm": false,
                               "metadata": {"model_name", "hook_name", "hf_hook_name", "context_size",
                                            "prepend_bos", ...}}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    sparsity.safetensors      optional: "sparsity" [d_sae], log10 of each latent's firing rate

Pre-6 SAELens configs (``hook_point``, ``activation_fn_str: "topk"`` with ``activation_fn_kwargs.k``, top-level
model_name / hook_name) are read too.

sparsify (EleutherAI, ``SparseCoder.save_to_disk``), read and written; no input normalization:

    cfg.json                  {"activation": "topk", "expansion_factor", "normalize_decoder", "num_latents", "k",
                               "multi_topk", "skip_connection", "transcode", "d_in"}
                              (we add "llama_sae": {hook_name, model_name, ...}; sparsify ignores extra keys)
    sae.safetensors           encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

    its encode: pre = (x - b_dec) @ encoder.weight.T + encoder.bias, ReLU(TopK); decode: Σ acts · W_dec rows + b_dec.
    Its hook point is the directory name, a Hugging Face module name (``layers.3`` = its output = resid_post.3).

The seed (PaulPauls/llama3_interpretability_sae): ``torch.save(TopKSparseAutoencoder.state_dict())`` in a .pth,
read with ``torch.load(weights_only=True)``: b_pre [d], encoder.weight [n, d], encoder.bias [n],
decoder.weight [d, n]. Its input normalization is ours ((x - mean) / (unbiased std + eps), undone on output) with
eps 1e-6 instead of 1e-5. The file holds neither k (the seed used 64) nor the layer (it captured the attention
input, ``attn_in.L``; the published SAE read layer 23 of Llama 3.2-3B): pass them.

Our module stores W_enc latent-major ([d_sae, d_in]); SAELens's file has it transposed, converted here.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from llama_sae.errors import UserError, check_device, first_line
from llama_sae.fileio import atomic_write_file, atomic_write_json, sweep_temp_files
from llama_sae.llama.model import HOOK_KINDS
from llama_sae.sae.model import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
METADATA_KEYS = ("model_name", "hook_name", "context_size", "prepend_bos")
OWN_METADATA = (*METADATA_KEYS, "hook_point", "hf_hook_name", "sae_lens_version")  # metadata written from the config
FORMATS = ("saelens", "sparsify", "seed")
SAELENS_LAYOUT = "6.0.0"  # the SAELens cfg.json layout we write (metadata.sae_lens_version)
SEED_K = 64  # the seed's k (its README and sae_training.py); its checkpoint does not store it
Weights = dict[str, torch.Tensor]  # ours: W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d]


# --------------------------------------------------------------------------- hook names
_HF_SUFFIX = {"": "resid_post", "input_layernorm": "attn_in", "self_attn": "attn_out",
              "post_attention_layernorm": "mlp_in", "mlp": "mlp_out"}
_TL_NAMES = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
             "hook_mlp_out": "mlp_out"}
# TransformerLens's ln1/ln2.hook_normalized is x / rms(x) before the RMSNorm weight multiplies it (with or without
# fold_ln); our attn_in / mlp_in include the weight, so an SAE there would run on activations of another scale.
_TL_BEFORE_NORM_WEIGHT = {"ln1.hook_normalized": "attn_in", "ln2.hook_normalized": "mlp_in"}
NO_HOOK_HERE = "do not pass --hook for it"  # a note's words for an SAE no hook point here can run (see _verdict)


def our_hook_name(name: str | None) -> tuple[str | None, str | None]:
    """(our hook name, a note or None) for a hook name from another library.

    Accepts ours (``resid_post.3``), TransformerLens names (``blocks.3.hook_resid_post``) and Hugging Face module
    names whose output is the activation (sparsify's hookpoints: ``layers.3``, ``model.layers.3.mlp``).
    """
    if not name:
        return None, "hook point: missing"
    kind, _, layer = name.partition(".")
    if kind in HOOK_KINDS and layer.isdecimal():
        return f"{kind}.{int(layer)}", None  # "resid_post.03" names layer 3
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        if m[2] in _TL_BEFORE_NORM_WEIGHT:
            return None, (f"hook point {name!r} (TransformerLens) is the RMSNorm output before its weight; "
                          f"{_TL_BEFORE_NORM_WEIGHT[m[2]]}.{int(m[1])} here includes the weight, so this SAE has no "
                          f"equivalent hook point ({NO_HOOK_HERE}: its inputs would be scaled wrongly)")
        kind = _TL_NAMES.get(m[2])
        if kind is None:
            return None, f"hook point {name!r} (TransformerLens) has no equivalent here"
        return f"{kind}.{int(m[1])}", None
    if m := re.fullmatch(r"(?:model\.)?layers\.(\d+)(?:\.(\w+))?", name):
        kind = _HF_SUFFIX.get(m[2] or "")
        if kind is None:
            return None, f"hook point {name!r} (a Hugging Face module) has no equivalent here"
        return f"{kind}.{int(m[1])}", None
    if name in ("embed_tokens", "model.embed_tokens"):
        return "resid_pre.0", None
    return None, f"hook point {name!r} has no equivalent here"


def hf_module_name(hook: str | None) -> str | None:
    """The Hugging Face LlamaForCausalLM module whose output is our hook point (None if it is not a hook name)."""
    kind, _, layer = (hook or "").partition(".")
    if kind not in HOOK_KINDS or not layer.isdecimal():
        return None  # not one of ours (e.g. a bare array's "acts"): no module to name
    if kind == "resid_pre":
        return "model.embed_tokens" if layer == "0" else f"model.layers.{int(layer) - 1}"
    suffix = {v: k for k, v in _HF_SUFFIX.items()}[kind]
    return f"model.layers.{layer}" + (f".{suffix}" if suffix else "")


# --------------------------------------------------------------------------- reading
@dataclass
class Found:
    """What an SAE file or directory says about itself, before its weights are read.

    ``values`` holds SAEConfig fields (k or hook_name may be None: missing); ``notes`` says, one line each, what is
    missing or approximated; ``weights()`` reads the tensors in our layout.
    """

    format: str
    path: Path
    values: dict[str, Any]
    weights: Callable[[], Weights]
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)  # other facts (training tokens, dataset): kept by convert


def _read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: not readable JSON ({e}): the file is damaged; export or download it again") from e
    if not isinstance(raw, dict):
        raise UserError(f"{file}: not a JSON object: this is not an SAE config")
    return raw


def _read_safetensors(file: Path, read: Callable[[Path], Any]) -> Any:
    """``read(file)``, with a missing, truncated or foreign file as a one-line UserError."""
    if not file.exists():
        raise UserError(f"{file} is missing: the SAE directory is incomplete; export or download it again")
    try:
        return read(file)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign bytes
        raise UserError(f"{file}: not a readable safetensors file ({first_line(e)}): it is truncated or not an SAE; "
                        "export or download it again") from e


def _safetensors(file: Path) -> Weights:
    return _read_safetensors(file, load_file)


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} from a safetensors file's header, no tensor data read (a truncated file fails here too)."""
    from safetensors import safe_open

    def shapes(path: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(path, "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}

    return _read_safetensors(file, shapes)


def _k_of(raw: dict) -> Any:
    """cfg.json's k (SAELens v6 and sparsify: "k"; older SAELens: activation_fn_kwargs.k), None if absent; a
    value that is not a whole number is returned as it is, for :func:`_config` to refuse and ``sae info`` to show."""
    k = raw.get("k")
    if k is None:
        k = (raw.get("activation_fn_kwargs") or {}).get("k")
    if isinstance(k, str) and k.strip().isdecimal() or isinstance(k, float) and k.is_integer():
        return int(k)
    return k


def _find_saelens(path: Path) -> Found:
    file = path / CFG_FILE
    raw = _read_json(file)
    _check_types(file, raw, {"d_in": int, "d_sae": int, "metadata": dict, "activation_fn_kwargs": dict,
                             "normalize_activations": (str, bool), "hook_name": str, "hook_point": str,
                             "apply_b_dec_to_input": bool, "rescale_acts_by_decoder_norm": bool,
                             "reshape_activations": str})
    _check_types(file, raw.get("metadata") or {}, {"hook_name": str, "hook_point": str, "model_name": str})
    act = raw.get("activation_fn", raw.get("activation_fn_str"))
    arch = raw.get("architecture") or "standard"
    if arch == "standard" and act == "topk":  # pre-6 SAELens: a "standard" SAE with a TopK activation
        arch = "topk"
    if arch != "topk":
        raise UserError(f"{file}: architecture {arch!r} is not supported: only 'topk' SAEs load")
    fold_b_dec = raw.get("apply_b_dec_to_input") is False  # SAELens encodes W_enc·x + b_enc: b_dec folds into b_enc
    fold_norms = raw.get("rescale_acts_by_decoder_norm") is True  # SAELens's fold_W_dec_norm, done on reading
    norm = raw.get("normalize_activations", "none")
    norm = {None: "none", False: "none"}.get(norm, norm) if not isinstance(norm, str) else norm
    if norm not in ("none", "layer_norm"):
        raise UserError(f"{file}: normalize_activations {norm!r} is not supported: use 'none' or 'layer_norm'")
    if raw.get("hook_head_index", raw.get("hook_point_head_index")) is not None or \
            (raw.get("reshape_activations") or "none") != "none":
        raise UserError(f"{file}: SAEs on single attention heads (hook_z) are not supported: use a residual, "
                        "attention-output or MLP hook")
    meta = {**{k: raw[k] for k in (*METADATA_KEYS, "hook_point") if k in raw}, **(raw.get("metadata") or {})}
    hook, note = our_hook_name(meta.get("hook_name") or meta.get("hook_point"))
    values = {"d_in": raw.get("d_in"), "d_sae": raw.get("d_sae"), "k": _k_of(raw),
              "normalize_activations": norm, "hook_name": hook,
              **{key: meta[key] for key in ("model_name", "context_size", "prepend_bos") if meta.get(key) is not None}}
    notes = [note] if note else []
    if values["k"] is None:
        notes.append('k: missing (cfg.json has no "k"): add "k": N to cfg.json, or convert it with '
                     '`llama-sae sae convert PATH --k N`')
    if fold_b_dec:
        notes.append("apply_b_dec_to_input=false: read with b_enc + W_enc·b_dec as b_enc (the same encoder)")
    if fold_norms:
        notes.append("rescale_acts_by_decoder_norm=true: read with the decoder norms folded into the encoder "
                     "(SAELens's fold_W_dec_norm: the same latents and reconstruction)")

    def weights() -> Weights:
        w = _safetensors(path / WEIGHTS_FILE)
        scale = w.pop("scaling_factor", None)  # pre-6 SAELens fine-tuning scale; all ones when unused
        if scale is not None and not torch.all(scale == 1):
            raise UserError(f"{path}/{WEIGHTS_FILE}: a non-trivial scaling_factor (SAELens fine-tuning) is not "
                            "supported: fold it into W_dec with SAELens first")
        _refuse_extra_tensors(path / WEIGHTS_FILE, w, {"W_enc", "b_enc", "W_dec", "b_dec"})
        if "W_enc" in w:
            w["W_enc"] = w["W_enc"].T
        shapes_fit = {"W_enc", "b_enc", "W_dec", "b_dec"} <= set(w) and w["W_enc"].dim() == 2 and \
            w["W_dec"].shape == w["W_enc"].shape and w["b_enc"].shape == w["W_enc"].shape[:1] and \
            w["b_dec"].shape == w["W_enc"].shape[1:]  # else load's shape check names what is wrong
        if (fold_b_dec or fold_norms) and shapes_fit:
            w = {name: t.double() for name, t in w.items()}
            if fold_b_dec:
                w["b_enc"] = w["b_enc"] + w["W_enc"] @ w["b_dec"]
            if fold_norms:
                norms = w["W_dec"].norm(dim=-1).clamp(min=1e-8)  # [n], as SAELens's get_W_dec_norm
                w["W_dec"], w["W_enc"], w["b_enc"] = w["W_dec"] / norms[:, None], w["W_enc"] * norms[:, None], \
                    w["b_enc"] * norms
            w = {name: t.float() for name, t in w.items()}
        return w

    extra = {key: value for key, value in meta.items() if key not in OWN_METADATA}
    return Found("saelens", path, values, weights, notes, extra)


def _find_sparsify(path: Path) -> Found:
    file = path / CFG_FILE
    raw = _read_json(file)
    _check_types(file, raw, {"d_in": int, "num_latents": int, "expansion_factor": (int, float), "llama_sae": dict,
                             "activation": str, "transcode": bool, "skip_connection": bool, "multi_topk": bool})
    _check_types(file, raw.get("llama_sae") or {}, {"hook_name": str, "model_name": str})
    if raw.get("activation", "topk") != "topk":
        raise UserError(f"{file}: activation {raw['activation']!r} is not supported: only TopK SAEs load")
    for flag in ("transcode", "skip_connection"):
        if raw.get(flag):
            raise UserError(f"{file}: {flag}=true (a sparsify transcoder or skip connection) is not supported: "
                            "only plain SAEs load")
    if "d_in" not in raw:
        raise UserError(f"{file}: no d_in: this is not a sparsify cfg.json (SparseCoder.save_to_disk writes it)")
    ours = raw.get("llama_sae") or {}
    hook, note = our_hook_name(ours.get("hook_name") or path.name)
    n = raw.get("num_latents") or raw["d_in"] * raw.get("expansion_factor", 32)
    values = {"d_in": raw["d_in"], "d_sae": n, "k": _k_of(raw), "normalize_activations": "none",
              "hook_name": hook, **{key: ours[key] for key in ("model_name", "context_size", "prepend_bos")
                                    if ours.get(key) is not None}}
    notes = []
    if hook is None:
        notes.append(f"hook point: missing (sparsify names it by directory, here {path.name!r}): pass --hook, "
                     "or name the directory after the Hugging Face module, e.g. layers.3 for resid_post.3")
    elif note:
        notes.append(note)
    if values["k"] is None:
        notes.append('k: missing (cfg.json has no "k"): add "k": N to cfg.json, or convert it with '
                     '`llama-sae sae convert PATH --k N`')
    if raw.get("multi_topk"):
        notes.append("multi_topk: trained with Multi-TopK; run here with plain TopK at k")

    def weights() -> Weights:
        w = _safetensors(path / SPARSIFY_WEIGHTS)
        rename = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
        _refuse_extra_tensors(path / SPARSIFY_WEIGHTS, w, set(rename))
        return {ours_: w[theirs] for theirs, ours_ in rename.items() if theirs in w}

    extra = {key: value for key, value in ours.items() if key not in OWN_METADATA}
    return Found("sparsify", path, values, weights, notes, extra)


def _find_seed(path: Path) -> Found:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # a torch.save zip, or a legacy pickle (protocol 2+)
        raise UserError(f"{path}: not a torch checkpoint (neither a torch.save zip nor a pickle): pass an SAE "
                        "directory, a seed .pth file or hf://org/repo[/subdir]")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle (weights_only refuses its classes), not a torch file
        if "Weights only load failed" in str(e):
            raise UserError(f"{path}: holds pickled Python objects besides tensors, which a weights-only load "
                            "refuses (for safety, it is not loaded otherwise): it is not the seed's SAE checkpoint, "
                            "or re-save its state_dict of tensors alone") from e
        raise UserError(f"{path}: not a readable torch checkpoint ({first_line(e, 120)}): it is truncated or "
                        "not the seed's SAE; copy it again") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model_state_dict")), dict):
        state = state.get("state_dict", state.get("model_state_dict"))
    if isinstance(state, dict):
        state = {re.sub(r"^(module\.|_orig_mod\.)+", "", str(k)): v for k, v in state.items()}
    want = ("b_pre", "encoder.weight", "encoder.bias", "decoder.weight")
    if not isinstance(state, dict) or any(not isinstance(state.get(k), torch.Tensor) for k in want):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not the seed's SAE checkpoint: expected tensors {', '.join(want)}, found {found}")
    n, d = state["encoder.weight"].shape
    values = {"d_in": d, "d_sae": n, "k": None, "normalize_activations": "layer_norm", "hook_name": None,
              "prepend_bos": False}  # the seed fed its sentences without BOS (its README)
    notes = [f"k: missing (the seed's checkpoint does not store it): convert it once with `llama-sae sae convert "
             f"{path} --k {SEED_K} --hook attn_in.L --to saelens --out DIR` ({SEED_K} is the seed's setting; in "
             f"Python sae.load(path, k={SEED_K}, hook_name=...))",
             "hook point: missing (the seed captured the attention input attn_in.L; the file does not say which "
             "layer): give --hook attn_in.L to `llama-sae sae convert`, e.g. attn_in.23 for the published Llama "
             "3.2-3B SAE",
             "normalization: the seed's layer norm used eps 1e-6; read with eps 1e-5 (SAELens's)"]
    weights = {"W_enc": state["encoder.weight"], "b_enc": state["encoder.bias"],
               "W_dec": state["decoder.weight"].T, "b_dec": state["b_pre"]}
    return Found("seed", path, values, lambda: weights, notes)


def find(path: str | os.PathLike) -> Found:
    """Recognize an SAE at ``path`` (a directory, a seed .pth file, or ``hf://org/repo[/subdir]``).

    Reads the config (and, for the seed, the state dict), not yet the weights of a directory.
    """
    if str(path).startswith("hf://"):
        from llama_sae.sae.hub import download

        path = download(str(path))
    path = Path(path)
    if path.is_file() and path.suffix in (".safetensors", ".json"):
        path = path.parent  # a file of an SAE directory (cfg.json, sae_weights.safetensors): the directory
    if path.is_file():
        return _find_seed(path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist: pass an SAE directory, a seed .pth file or hf://org/repo[/subdir]")
    if not (path / CFG_FILE).exists():
        subdirs = sorted(p.name for p in path.iterdir() if (p / CFG_FILE).exists())
        hint = f" (it has SAEs in {', '.join(subdirs[:5])}: pass one of them)" if subdirs else ""
        raise UserError(f"{path} holds no {CFG_FILE}: pass an SAE directory (SAELens or sparsify layout){hint}")
    if (path / WEIGHTS_FILE).exists() and (path / SPARSIFY_WEIGHTS).exists():  # both: the config says which
        raw = _read_json(path / CFG_FILE)
        read = _find_saelens if "d_sae" in raw or "architecture" in raw else _find_sparsify
    else:
        read = _find_saelens if (path / WEIGHTS_FILE).exists() or not (path / SPARSIFY_WEIGHTS).exists() \
            else _find_sparsify
    try:
        return read(path)
    except (TypeError, AttributeError, ValueError, KeyError) as e:  # a hand-edited field of another type
        raise UserError(f"{path / CFG_FILE}: a field has a type its format does not allow ({first_line(e)}): "
                        "the config is damaged; compare it with one `llama-sae sae convert` writes") from e


def _refuse_extra_tensors(file: Path, tensors: Weights, known: set[str]) -> None:
    """A tensor the format's TopK SAE does not have (a JumpReLU threshold, a skip connection) means math this
    loader would leave out: refuse it rather than run a different SAE."""
    extra = sorted(set(tensors) - known)
    if extra:
        raise UserError(f"{file}: holds tensors a TopK SAE does not have ({', '.join(extra)}): it computes something "
                        "this loader would leave out; only plain TopK SAEs load")


JSON_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
                   dict: "a JSON object"}


def _check_types(file: Path, raw: dict, types: dict[str, type | tuple[type, ...]]) -> None:
    """Refuse a cfg.json field of the wrong JSON type (a hand edit), naming the field: ``types`` {key: types}."""
    for key, want in types.items():
        value = raw.get(key)
        if value is not None and (not isinstance(value, want) or isinstance(value, bool) and bool not in
                                  (want if isinstance(want, tuple) else (want,))):
            names = " or ".join(JSON_TYPE_NAMES[t] for t in (want if isinstance(want, tuple) else (want,)))
            raise UserError(f"{file}: {key} is {value!r}, not {names}: the config is damaged; fix {key} in it")


def read_cfg(path: str | os.PathLike) -> tuple[SAEConfig, dict]:
    """(SAEConfig, the raw cfg.json dict) of a SAELens directory, checked to be one we can run."""
    found = _find_saelens(Path(path))
    return _config(found), _read_json(Path(path) / CFG_FILE)


def _config(found: Found, **overrides: Any) -> SAEConfig:
    values = {**found.values, **{k: v for k, v in overrides.items() if v is not None}}
    if values.get("k") is None:
        what = next((n for n in found.notes if n.startswith("k:")), "k: missing")
        raise UserError(f"{found.path}: k is {what.removeprefix('k: ')}")
    if values.get("hook_name") is not None:
        hook, note = our_hook_name(values["hook_name"])
        if hook is None:
            raise UserError(f"{note}: use KIND.LAYER with KIND one of {', '.join(HOOK_KINDS)}")
        values["hook_name"] = hook
    if isinstance(values["k"], bool) or not isinstance(values["k"], int):
        raise UserError(f'{found.path}: k is {values["k"]!r}, not a whole number of latents: set "k": N in '
                        f"{CFG_FILE}, or pass --k N")
    for key in ("d_in", "d_sae"):
        if not isinstance(values.get(key), int):
            raise UserError(f"{found.path}/{CFG_FILE}: {key} is missing or not an integer: the config is damaged")
    try:
        return SAEConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        field_name = ".".join(str(part) for part in err["loc"])
        fix = f"fix {field_name or 'it'} in {CFG_FILE}" + (" or pass --k N" if field_name == "k" else "")
        if overrides.get("k") is not None and "k=" in err["msg"]:  # k came from --k, not from the file
            fix = "pass a smaller --k"
        raise UserError(f"{found.path}: {field_name + ': ' if field_name else ''}"
                        f"{err['msg'].removeprefix('Value error, ')}: {fix}") from e


def weight_shapes(d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The shape of each of an SAE's weights, as :class:`SAE` holds them."""
    return {"W_enc": (d_sae, d_in), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}


def _unfit_note(found: Found) -> str | None:
    """The note of an SAE no hook point here can run (see :func:`our_hook_name`), or None."""
    return next((note for note in found.notes if NO_HOOK_HERE in note), None)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, k: int | None = None,
         hook_name: str | None = None) -> SAE:
    """Load an SAE: SAELens (TopK) or sparsify directory, seed .pth, or ``hf://org/repo[/subdir]``.

    Args:
        path: see above (the format is recognized from the files).
        device: where to put the weights (float32).
        k, hook_name: supply or override what the files lack (the seed's .pth stores neither).
    Returns:
        The SAE in eval mode; ``sae.cfg`` holds d_in, d_sae, k, normalization and the hook point.
    Example:
        >>> sae = load("runs/sae"); latents = sae.encode(x)
        >>> sae = load("seed/model.pth", k=64, hook_name="attn_in.23")
    """
    check_device(str(device))
    found = find(path)
    unfit = _unfit_note(found)
    if unfit is not None:  # no --hook makes it right: its inputs would be scaled wrongly at any hook point here
        raise UserError(f"{found.path}: {unfit.replace(f'{NO_HOOK_HERE}: ', '')}: it cannot run here")
    cfg = _config(found, k=k, hook_name=hook_name)
    weights = found.weights()
    shapes = weight_shapes(cfg.d_in, cfg.d_sae)
    for name, shape in shapes.items():
        if name not in weights or tuple(weights[name].shape) != shape:
            got = tuple(weights[name].shape) if name in weights else "missing"
            if found.format == "saelens" and name == "W_enc":  # name the shapes as the file stores them
                shape, got = shape[::-1], got[::-1] if isinstance(got, tuple) else got
            config = "its shapes" if found.format == "seed" else "cfg.json"
            raise UserError(f"{found.path}: {name} should be {shape} by its config, found {got}: "
                            f"the weights and {config} do not belong together")
    sae = SAE(cfg, device=device)
    with torch.no_grad():
        for name in shapes:
            getattr(sae, name).copy_(weights[name])
    return sae.eval()


def load_sparsity(path: str | os.PathLike, d_sae: int | None = None) -> torch.Tensor | None:
    """The [d_sae] log10 firing rates of an SAE directory, or None if it has no sparsity file; UserError if the
    file holds no "sparsity" tensor, or (given ``d_sae``) one of another length."""
    file = Path(path) / SPARSITY_FILE
    if not file.exists():
        return None
    tensors = _safetensors(file)
    rates = tensors.get("sparsity")
    if rates is None or rates.dim() != 1 or d_sae is not None and rates.shape[0] != d_sae:
        got = "no 'sparsity' tensor" if rates is None else f"a 'sparsity' tensor of shape {list(rates.shape)}"
        raise UserError(f"{file} holds {got}, not the SAE's {d_sae or 'd_sae'} log10 firing rates: delete it, or "
                        "write it again")
    return rates


def describe(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(field, value) rows for ``llama-sae sae info``: format, shape, k, normalization, hook point, and notes."""
    found = find(path)
    v = found.values
    rows = [("format", found.format), ("path", str(found.path)), ("d_in", str(v.get("d_in"))),
            ("d_sae", str(v.get("d_sae"))), ("k", str(v["k"]) if v.get("k") is not None else "missing"),
            ("normalization", v.get("normalize_activations", "none")),
            ("hook point", v.get("hook_name") or "missing"),
            ("HF module", hf_module_name(v.get("hook_name")) or "-")]
    rows += [(key, str(v[key])) for key in ("model_name", "context_size", "prepend_bos") if key in v]
    trained = found.metadata.get("trained_tokens")
    if isinstance(trained, int) and not isinstance(trained, bool):
        rows.append(("trained tokens", f"{trained:,}"))
    if found.format == "saelens" and (found.path / SPARSITY_FILE).exists():
        try:
            # log10 firing rates; the trainer writes log10(0 + 1e-10) = -10
            log_rate = load_sparsity(found.path, v.get("d_sae") if isinstance(v.get("d_sae"), int) else None)
            rows.append(("sparsity", f"{SPARSITY_FILE}: median firing rate {10 ** float(log_rate.median()):.2g}, "
                                     f"{int((log_rate <= -9.99).sum())} latents never fired"))
        except UserError as e:
            rows.append(("sparsity", f"unreadable (optional; loading ignores it): {e}"))
    weights = _weights_rows(found)
    rows += weights
    rows += [("note", note) for note in found.notes]
    return rows + [("verdict", _verdict(found, weights))]


def _verdict(found: Found, weights: list[tuple[str, str]]) -> str:
    """"loads", or "does not load: why" (the config :func:`load` would build, and the weights' header)."""
    missing_k = found.values.get("k") is None
    try:
        _config(found, k=1 if missing_k else None)  # a placeholder k when the file has none: the rest is checked
    except UserError as e:
        return f"does not load: {e}"
    bad = [value for key, value in weights if key == "note" or value.startswith("unreadable")]
    if bad:
        return f"does not load: {bad[0]}"
    unfit = _unfit_note(found)
    if unfit is not None:
        return f"does not run here: {unfit}"
    needs = [what for what, missing in (("--k K (the file has no k)", missing_k),
                                        ("--hook KIND.LAYER to run it in a model (the file names no hook point of "
                                         "ours)", found.values.get("hook_name") is None)) if missing]
    return "loads" + (" with " + " and ".join(needs) if needs else "")


def _weights_rows(found: Found) -> list[tuple[str, str]]:
    """The ``weights`` row of :func:`describe` (tensors and shapes from the file's header) and a note for each
    tensor its config does not account for; for the seed's .pth (read whole by :func:`find`), a note for each
    tensor whose shape disagrees with its encoder's."""
    if found.format == "seed":
        d, n, weights = found.values.get("d_in"), found.values.get("d_sae"), found.weights()
        want = weight_shapes(d, n)
        return [("note", f"weights: {name} should be {list(shape)} by the checkpoint's encoder, found "
                         f"{list(weights[name].shape) if name in weights else 'missing'}: the checkpoint is damaged")
                for name, shape in want.items() if name not in weights or tuple(weights[name].shape) != shape]
    file = found.path / (WEIGHTS_FILE if found.format == "saelens" else SPARSIFY_WEIGHTS)
    try:
        shapes = _header_shapes(file)
    except UserError as e:
        return [("weights", f"unreadable: {e}")]
    rows = [("weights", f"{file.name}: " + ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items()))]
    d, n = found.values.get("d_in"), found.values.get("d_sae")
    if not isinstance(d, int) or not isinstance(n, int):
        return rows  # the config is damaged: the verdict says so
    enc, enc_b = ("W_enc", "b_enc") if found.format == "saelens" else ("encoder.weight", "encoder.bias")
    want = {enc: (d, n) if found.format == "saelens" else (n, d), enc_b: (n,), "W_dec": (n, d), "b_dec": (d,)}
    for name, shape in want.items():
        if shapes.get(name) != shape:
            got = list(shapes[name]) if name in shapes else "missing"
            rows.append(("note", f"weights: {name} should be {list(shape)} by {CFG_FILE}, found {got}: the weights "
                                 f"and {CFG_FILE} do not belong together"))
    extra = sorted(set(shapes) - set(want) - {"scaling_factor"})
    if extra:
        rows.append(("note", f"weights: {', '.join(extra)} is not part of a TopK SAE: it computes something this "
                             "loader would leave out"))
    return rows


# --------------------------------------------------------------------------- writing
def sae_lens_cfg(cfg: SAEConfig, **metadata: Any) -> dict:
    """The cfg.json dict for ``cfg``; extra ``metadata`` (e.g. training facts) goes under "metadata"."""
    meta = {key: getattr(cfg, key) for key in METADATA_KEYS}
    meta["hf_hook_name"] = hf_module_name(cfg.hook_name)
    meta["sae_lens_version"] = SAELENS_LAYOUT  # without it SAELens reads the file as pre-6 and drops this metadata
    meta.update(metadata)
    return {"architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": cfg.normalize_activations,
            "reshape_activations": "none", "rescale_acts_by_decoder_norm": False, "metadata": meta}


def _write_tensors(file: Path, tensors: dict[str, torch.Tensor], before_replace=None) -> None:
    """Write ``tensors`` as float32 safetensors to ``file`` atomically, straight from their memory (safetensors'
    save_file: no second copy of a 65,536-latent SAE's 1.6 GB of weights as bytes); ``before_replace``: see
    :func:`atomic_write_file`."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    atomic_write_file(file, lambda tmp: save_file(tensors, tmp), before_replace)


def save(sae: SAE, path: str | os.PathLike, *, sparsity: torch.Tensor | None = None, **metadata: Any) -> Path:
    """Write ``sae`` to the directory ``path`` (created if needed) in the SAELens v6 layout, each file atomically.

    Args:
        sae: the SAE (any device; written as float32 on CPU).
        path: output directory.
        sparsity: optional [d_sae] log10 firing rates, written to sparsity.safetensors.
        **metadata: extra JSON-serializable facts stored under cfg.json's "metadata".
    Returns:
        The directory.
    Example:
        >>> save(sae, "runs/sae", trained_tokens=10_000_000)
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # cfg.json goes just before the new weights replace the old and is written after them: a kill in between leaves
    # no old config beside new weights, and a failed write leaves the old SAE whole
    _write_tensors(path / WEIGHTS_FILE, {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec,
                                         "b_dec": sae.b_dec},
                   before_replace=lambda: (path / CFG_FILE).unlink(missing_ok=True))
    if sparsity is not None:
        _write_tensors(path / SPARSITY_FILE, {"sparsity": sparsity})
    atomic_write_json(path / CFG_FILE, sae_lens_cfg(sae.cfg, **metadata))
    return path


def save_sparsify(sae: SAE, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``sae`` to the directory ``path`` in sparsify's layout (``SparseCoder.load_from_disk`` reads it);
    extra ``metadata`` goes under cfg.json's "llama_sae" (sparsify ignores that key).

    sparsify has no input normalization, so an SAE with layer_norm cannot be written exactly: UserError.
    """
    cfg = sae.cfg
    if cfg.normalize_activations != "none":
        raise UserError("sparsify SAEs have no input normalization and this SAE uses layer_norm: "
                        "export it with --to saelens (or train with normalize_activations none)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_tensors(path / SPARSIFY_WEIGHTS, {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec,
                                             "b_dec": sae.b_dec},  # W_enc keeps our layout: sparsify's too
                   before_replace=lambda: (path / CFG_FILE).unlink(missing_ok=True))
    ours = {**metadata, **{key: getattr(cfg, key) for key in METADATA_KEYS},
            "hf_hook_name": hf_module_name(cfg.hook_name)}
    atomic_write_json(path / CFG_FILE, {
        "activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
        "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": False, "transcode": False,
        "d_in": cfg.d_in, "llama_sae": ours})
    return path


def convert(src: str | os.PathLike, to: str, out: str | os.PathLike, *, k: int | None = None,
            hook_name: str | None = None) -> Path:
    """Read the SAE at ``src`` (any format :func:`load` reads) and write it to ``out`` as ``to`` (saelens|sparsify)."""
    if to not in ("saelens", "sparsify"):
        raise UserError(f"cannot write format {to!r}: use --to saelens or --to sparsify")
    found = find(src)  # an hf:// source is downloaded once: load and the sparsity file read the local copy
    sae = load(found.path, k=k, hook_name=hook_name)
    if sae.cfg.hook_name is None and found.format == "seed":  # its .pth never says; the converted SAE must
        raise UserError(f"{src} is a seed checkpoint, which does not say which hook point it reads: pass --hook "
                        "(attn_in.23 for the seed's Llama 3.2-3B run)")
    unknown = next((n for n in found.notes if n.endswith("has no equivalent here")), None)
    if sae.cfg.hook_name is None and unknown:  # the file names a hook point: writing "none" would lose it
        raise UserError(f"{src}: {unknown}: pass --hook KIND.LAYER (one of {', '.join(HOOK_KINDS)}) to say "
                        "where it reads here")
    from llama_sae.sae.evaluate import EVAL_REPORT

    extra = {key: value for key, value in found.metadata.items() if key not in ("sae", "path", "sparsity")}
    in_place = Path(out).resolve() == found.path.resolve()
    sweep_temp_files(out)  # what a convert killed mid-write left (safetensors' own temp file can be GBs)
    results = () if in_place else (EVAL_REPORT, "frequency.png")  # another SAE's evaluation, left in --out
    if to == "sparsify":
        written = save_sparsify(sae, out, **extra)
        _remove_stale(written, (WEIGHTS_FILE, SPARSITY_FILE, *results))
        return written
    sparsity, skipped = None, False
    if found.format == "saelens" and (found.path / SPARSITY_FILE).exists():
        try:
            sparsity = load_sparsity(found.path, sae.cfg.d_sae)
        except UserError as e:  # optional: the SAE converts without it
            print(f"note: {SPARSITY_FILE} skipped, it is unreadable ({e})", file=sys.stderr)
            skipped = True
    written = save(sae, out, sparsity=sparsity, **extra)
    keep_sparsity = sparsity is not None or (skipped and in_place)  # a file we could not read is not ours to delete
    _remove_stale(written, (SPARSIFY_WEIGHTS, *results) + (() if keep_sparsity else (SPARSITY_FILE,)))
    return written


def _remove_stale(out: Path, names: tuple[str, ...]) -> None:
    """After a conversion into an existing directory (--overwrite): remove the SAE files the new SAE did not
    write (the other format's weights, an old sparsity file, another SAE's evaluation.json and frequency.png),
    which would otherwise be read, or pushed to the hub, as this SAE's."""
    for name in names:
        (Path(out) / name).unlink(missing_ok=True)
