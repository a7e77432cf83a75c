"""Read and write Llama 3.x checkpoints: Meta format and Hugging Face format.

Meta: ``params.json``, ``consolidated.NN.pth`` (model-parallel slices, concatenated here),
``tokenizer.model``. Hugging Face: ``config.json``, ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, ``tokenizer.json``. Both are detected automatically and loaded with
memory maps in the checkpoint's dtype: the model is built on the meta device and the mapped tensors
are assigned to it, so nothing is allocated twice.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import Tensor

from llama_sae.errors import UserError, check_device, first_line
from llama_sae.fileio import atomic_write, atomic_write_file, atomic_write_json, atomic_writer, sweep_temp_files
from llama_sae.llama.model import ModelArgs, RopeScaling, Transformer, ffn_hidden_dim

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_SHARD_BYTES = 5 * 10**9  # save_hf: weights per file at most (beyond one tensor), transformers' default
HF_INDEX = "model.safetensors.index.json"

# Hugging Face key -> our (Meta) key; {} is the layer index.
_HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
_META_TO_HF = {v: k for k, v in _HF_TO_META.items()}
_LAYER = re.compile(r"\.(\d+)\.")


def _rename(key: str, table: dict[str, str]) -> str | None:
    m = _LAYER.search(key)
    if m is None:
        return table.get(key)
    new = table.get(key[: m.start()] + ".{}." + key[m.end():])
    return None if new is None else new.format(m.group(1))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map "bf16"/"bfloat16"/torch.bfloat16 (and fp16, fp32) to a torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in SUPPORTED_DTYPES.values():
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = str(dtype).removeprefix("torch.")
    name = aliases.get(name, name)
    if name not in SUPPORTED_DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported: use one of bfloat16, float16, float32")
    return SUPPORTED_DTYPES[name]


# --------------------------------------------------------------------------- format detection
def detect_format(path: Path) -> str:
    """Return "hf" or "meta" for a checkpoint directory, or raise a UserError naming what is missing."""
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist: pass a Llama 3 checkpoint directory "
                        "(Hugging Face: config.json + *.safetensors; Meta: params.json + consolidated.*.pth)")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file: pass the directory that holds it")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    if (path / "original" / "params.json").exists():  # `huggingface-cli download ... --include "original/*"`
        raise UserError(f"{path} holds a Meta checkpoint in original/ and no config.json: pass {path / 'original'}")
    raise UserError(f"{path} holds neither config.json (Hugging Face) nor params.json (Meta): "
                    "pass a Llama 3 checkpoint directory")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object of settings: re-download it")
    return data


# --------------------------------------------------------------------------- configs
def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face ``config.json`` (transformers 4 or 5 spelling)."""
    if cfg.get("model_type") != "llama":
        raise UserError(f"config.json has model_type={cfg.get('model_type')!r}, not 'llama': "
                        "only Llama 3.x text checkpoints are supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("config.json sets attention_bias or mlp_bias: Llama 3 has no biases; "
                        "this checkpoint is not a Llama 3.x model")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"config.json sets hidden_act={cfg['hidden_act']!r}: Llama 3's MLP is SwiGLU (silu); "
                        "this checkpoint is not a Llama 3.x model")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))  # transformers' default when absent
    scaling = None
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_max_position_embeddings=rope["original_max_position_embeddings"])
    elif rope_type != "default":
        raise UserError(f"config.json uses RoPE type {rope_type!r}: only 'llama3' and 'default' are supported")
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], head_dim=cfg.get("head_dim"), norm_eps=cfg["rms_norm_eps"],
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_seq_len=cfg.get("max_position_embeddings", 8192),
    )


LLAMA3_BOS, LLAMA3_STOPS = 128000, [128001, 128008, 128009]  # what Meta's Hugging Face configs state


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None,
                        eos_ids: list[int] | None = None) -> dict:
    """A Hugging Face ``config.json`` dict that transformers' LlamaForCausalLM loads. ``bos_id`` and ``eos_ids``
    (the tokenizer's; transformers' generate stops at any of the latter) default to Llama 3's where the
    vocabulary holds them, else null: ids of another vocabulary would point at ordinary tokens."""
    if bos_id is None and eos_ids is None and args.vocab_size > max(LLAMA3_STOPS):
        bos_id, eos_ids = LLAMA3_BOS, LLAMA3_STOPS
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": bos_id, "eos_token_id": eos_ids,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rope_scaling": None,
    }
    if args.rope_scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling.model_dump()}
    return cfg


SMALL_LLAMA_32 = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B: RoPE factor 32, tied embeddings


def infer_rope_factor(params: dict) -> float:
    """Meta's params.json only says ``use_scaled_rope``: 3.2 1B/3B use factor 32, 3.1/3.3 use 8."""
    return 32.0 if (params["dim"], params["n_layers"]) in SMALL_LLAMA_32 else 8.0


def meta_ties_embeddings(path: Path, args: ModelArgs) -> bool:
    """Whether a Meta checkpoint ties its output to the embedding: its first shard has no ``output.weight`` (read
    memory-mapped: the tensor index only), or, with no shard at hand, the shape is a 3.2 1B/3B one."""
    shards = sorted(path.glob("consolidated.*.pth"))
    if shards:
        return "output.weight" not in _load_meta_shard(shards[0])
    return (args.dim, args.n_layers) in SMALL_LLAMA_32


def args_from_meta_params(params: dict, *, rope_factor: float | None = None) -> ModelArgs:
    """ModelArgs from Meta's ``params.json``; the RoPE factor is inferred unless given."""
    if rope_factor is not None and not rope_factor > 0:
        raise UserError(f"--rope-factor {rope_factor:g}: the RoPE scaling factor must be positive (Llama 3.1+: 8, "
                        "3.2 1B/3B: 32)")
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "rope_scaling_factor"}
    unknown = set(params) - known
    if unknown:
        raise UserError(f"params.json has keys this loader does not know ({', '.join(sorted(unknown))}): "
                        "it is not a Llama 3.x text checkpoint")
    scaling = None
    if params.get("use_scaled_rope"):
        factor = rope_factor or params.get("rope_scaling_factor") or infer_rope_factor(params)
        scaling = RopeScaling(factor=factor)
        params.setdefault("max_seq_len", 131072)  # the 3.1+ context that scaled RoPE is for
    fields = {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                                     "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")
              if k in params}
    return ModelArgs(rope_scaling=scaling, **fields)


# --------------------------------------------------------------------------- q/k layout
def meta_to_hf_qk(w: Tensor, n_heads: int) -> Tensor:
    """Permute q/k rows from Meta's interleaved rotary pairs to HF's rotate-half layout."""
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def hf_to_meta_qk(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of :func:`meta_to_hf_qk`."""
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(out_dim, dim)


# --------------------------------------------------------------------------- state dicts
def _hf_shard_files(path: Path) -> list[Path]:
    index = path / HF_INDEX
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} has no weight_map of tensor names to shard files: it is damaged; download "
                            "it again (or delete it if the directory holds a single model.safetensors)")
        names = sorted(set(weight_map.values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(f"{path}: shard(s) {', '.join(missing)} listed in the index are missing: "
                        "download the whole checkpoint again")
    if not files:
        raise UserError(f"{path} has config.json but no *.safetensors weights: download the weights "
                        "(PyTorch .bin checkpoints are not supported; convert them to safetensors)")
    return files


def _load_safetensors(files: list[Path]) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))  # memory-mapped; pages are read on first use
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e}): re-download it") from None
    return state


def hf_state_dict(path: Path, args: ModelArgs) -> dict[str, Tensor]:
    """Our-named state dict from a Hugging Face checkpoint directory (no q/k permutation needed)."""
    state = {}
    for key, tensor in _load_safetensors(_hf_shard_files(path)).items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        new = _rename(key, _HF_TO_META)
        if new is None:
            raise UserError(f"{path}: unexpected tensor {key!r}: this is not a Llama 3.x text checkpoint")
        state[new] = tensor
    return state


def meta_state_dict(path: Path, args: ModelArgs) -> dict[str, Tensor]:
    """Our-named state dict from Meta ``consolidated.NN.pth`` shards, slices concatenated.

    One shard is used in place (memory-mapped). Several are read one at a time, each shard's slices copied
    into tensors of the full shape and the shard unmapped before the next, so the peak is about the
    model's size plus one shard, not twice the model.
    """
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{path} has params.json but no consolidated.*.pth: download the weights")
    names = [f.name for f in files]
    gaps = [f"consolidated.{i:02d}.pth" for i in range(len(files)) if f"consolidated.{i:02d}.pth" not in names]
    if gaps:  # the slices are numbered 00..N-1
        raise UserError(f"{path}: model-parallel shard {gaps[0]} is missing (found {', '.join(names)}): download "
                        "the whole checkpoint again")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state: dict[str, Tensor] = {}
    keys: list[str] = []
    for i, f in enumerate(files):
        shard = _load_meta_shard(f)
        if i > 0 and set(shard) != set(keys):
            raise UserError(f"{f} holds other tensors than {files[0]}: the shards belong to different models")
        keys = list(shard)
        for key in keys:
            if key == "rope.freqs":
                continue
            if key not in expected:
                raise UserError(f"{f}: unexpected tensor {key!r}: this is not a Llama 3.x text checkpoint")
            _place_slice(state, key, shard[key], i, len(files), expected[key])
        del shard  # unmaps the shard (its tensors were copied) before the next one is read
    for key in ("wq", "wk"):
        heads = args.n_heads if key == "wq" else args.n_kv_heads
        for i in range(args.n_layers):
            name = f"layers.{i}.attention.{key}.weight"
            if name in state:
                state[name] = meta_to_hf_qk(state[name], heads)
    return state


def _load_meta_shard(f: Path) -> dict[str, Tensor]:
    try:
        shard = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise UserError(f"{f} could not be read as a PyTorch checkpoint ({type(e).__name__}): re-download it") from None
    bad = next((k for k, v in shard.items() if not isinstance(v, Tensor)), None) if isinstance(shard, dict) else ""
    if bad is not None:
        what = f"its {bad!r} is a {type(shard[bad]).__name__}" if bad else f"it holds a {type(shard).__name__}"
        raise UserError(f"{f} is not a state dict of tensors ({what}): it is not a Meta Llama checkpoint shard")
    return shard


def _place_slice(state: dict[str, Tensor], key: str, piece: Tensor, i: int, n: int, shape: torch.Size) -> None:
    """Put shard i of n's slice of ``key`` into ``state``: model-parallel slices are split along the one
    dimension where n of them make the full shape; replicated tensors are taken from the first shard."""
    if n == 1:
        state[key] = piece  # still memory-mapped: no copy at all
        return
    if piece.shape == shape and piece.dim() == 1:  # norm weights are replicated; every matrix is split
        if i == 0:
            state[key] = piece.clone()
        return
    if piece.shape == shape:
        raise UserError(f"tensor {key!r}: shard {i} of {n} holds the whole {tuple(shape)} matrix that params.json "
                        "implies, where each shard should hold a slice: params.json does not describe these shards "
                        "(a head_dim other than dim / n_heads cannot be written in it)")
    dims = [d for d in range(len(shape)) if piece.dim() == len(shape) and piece.shape[d] * n == shape[d]
            and all(piece.shape[e] == shape[e] for e in range(len(shape)) if e != d)]
    if not dims:
        raise UserError(f"tensor {key!r}: {n} shards of shape {tuple(piece.shape)} do not make the shape "
                        f"{tuple(shape)} that params.json implies: the shards belong to another model")
    if i == 0:
        state[key] = torch.empty(shape, dtype=piece.dtype)
    size = piece.shape[dims[0]]
    state[key].narrow(dims[0], i * size, size).copy_(piece)


# --------------------------------------------------------------------------- loading
def read_args(path: str | os.PathLike, *, rope_factor: float | None = None) -> tuple[str, ModelArgs]:
    """The format ("hf" or "meta") and ModelArgs of a checkpoint directory, without reading weights."""
    path = Path(path)
    fmt = detect_format(path)
    try:
        if fmt == "hf":
            return fmt, args_from_hf_config(_read_json(path / "config.json"))
        args = args_from_meta_params(_read_json(path / "params.json"), rope_factor=rope_factor)
        args.tie_embeddings = meta_ties_embeddings(path, args)
        return fmt, args
    except ValidationError as e:  # a field of the wrong type or value: name it, in one line
        name = "config.json" if fmt == "hf" else "params.json"
        err = e.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise UserError(f"{path / name} is not a valid Llama 3 config ({where + ': ' if where else ''}"
                        f"{err['msg'].removeprefix('Value error, ')}): check the file") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        name = "config.json" if fmt == "hf" else "params.json"
        what = f"no {e}" if isinstance(e, KeyError) else first_line(e, 160)
        raise UserError(f"{path / name} is not a valid Llama 3 config ({what}): check the file") from None


def load_model(path: str | os.PathLike, *, dtype=None, device="cpu", rope_factor: float | None = None
               ) -> Transformer:
    """Load a Llama 3.x checkpoint (Meta or Hugging Face format, detected automatically).

    Args:
        path: checkpoint directory.
        dtype: None keeps the checkpoint's dtype; else bfloat16, float16 or float32.
        device: where the model runs.
        rope_factor: Meta checkpoints only: the "llama3" RoPE factor (inferred from the shape if None).

    Returns:
        The model in eval mode.
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    check_device(str(device))
    fmt, args = read_args(path, rope_factor=rope_factor)
    state = hf_state_dict(path, args) if fmt == "hf" else meta_state_dict(path, args)
    if fmt == "meta":
        args.tie_embeddings = "output.weight" not in state  # Meta's 3.2 1B/3B files have no output.weight
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        state.pop("output.weight", None)
    else:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    _check_state(state, model, path)
    ckpt_dtype = state["tok_embeddings.weight"].dtype
    if ckpt_dtype not in SUPPORTED_DTYPES.values():
        raise UserError(f"{path} stores {ckpt_dtype}: pass --dtype bfloat16, float16 or float32")
    target = dtype or ckpt_dtype
    if target != ckpt_dtype or torch.device(device).type != "cpu":
        state = {k: v.to(device=device, dtype=target) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=False)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = model.inv_freq.to(device)
    return model.eval().requires_grad_(False)


def _check_state(state: dict[str, Tensor], model: Transformer, path: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "output.weight"
                or not model.args.tie_embeddings}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{path}: {len(missing)} tensor(s) missing, first {missing[0]!r}: "
                        "the checkpoint is incomplete or does not match its config")
    unused = sorted(set(state) - set(expected) - {"output.weight"})
    if unused:  # e.g. more layers of weights than the config's layer count: the model would silently be cut
        raise UserError(f"{path}: {len(unused)} tensor(s) the config does not use, first {unused[0]!r}: the "
                        f"weights do not fit the config (it says {model.args.n_layers} layers)")
    for key, shape in expected.items():
        if state[key].shape != shape:
            got = tuple(state[key].shape)
            short = [d for d in range(len(shape)) if len(got) == len(shape) and 0 < got[d] < shape[d]
                     and shape[d] % got[d] == 0]
            hint = (f" (a {shape[short[0]] // got[short[0]]}-way model-parallel slice: are consolidated.NN.pth "
                    "shards missing?)") if short and any(path.glob("consolidated.*.pth")) else ""
            raise UserError(f"{path}: tensor {key!r} has shape {got} but the config implies {tuple(shape)}{hint}: "
                            "the weights do not fit the config")


# --------------------------------------------------------------------------- writing
def save_hf(model: Transformer, out: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = HF_SHARD_BYTES) -> Path:
    """Write ``model`` as a Hugging Face checkpoint in ``out``: config.json and model.safetensors, or shards of
    at most ``max_shard_bytes`` (model-00001-of-0000N.safetensors, listed in model.safetensors.index.json) when
    the weights are larger, as transformers writes them. Each file is written straight from the weights (no
    copy of them in memory: an 8B model converts in the memory it loads in) and atomically; weight files of an
    earlier save that the new one does not list are removed (a loader would otherwise read them too)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = model.args
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in model.state_dict().items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][_rename(key, _META_TO_HF)] = value.contiguous()
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards):
        atomic_write_file(out / name, lambda tmp, part=part: save_file(part, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for part in shards for t in part.values())
        atomic_write_json(out / HF_INDEX, {"metadata": {"total_size": total},
                                           "weight_map": {k: n for n, part in zip(names, shards) for k in part}})
    stale = [f for f in out.glob("model*.safetensors") if f.name not in names]
    stale += [out / HF_INDEX] if len(shards) == 1 and (out / HF_INDEX).exists() else []
    for f in stale:
        f.unlink()
    bos_id = eos_ids = None
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out)
        try:
            tokenizer = _tokenizer_in(Path(tokenizer_dir))
        except UserError:  # a tokenizer our loaders refuse (no BOS, ...): copied all the same, its ids not stated
            tokenizer = None
        ids = [] if tokenizer is None else [tokenizer.bos_id, *sorted(tokenizer.stop_ids)]
        if ids and max(ids) < args.vocab_size:  # (a tokenizer too large for the model is refused at load)
            bos_id, eos_ids = ids[0], ids[1:]
    atomic_write_json(out / "config.json", hf_config_from_args(args, model.dtype, bos_id, eos_ids))
    return out


def save_meta(model: Transformer, out: str | os.PathLike, *, shards: int = 1) -> Path:
    """Write ``model`` as a Meta checkpoint (params.json + ``shards`` model-parallel .pth slices).

    Refused (UserError, nothing written) for what params.json cannot state: a head_dim other than dim / n_heads,
    llama3 RoPE scaling with other than Meta's low/high frequency factors and original context, and a shard
    count that does not divide every split dimension."""
    out = Path(out)
    a = model.args
    if a.head_dim != a.dim // a.n_heads:
        raise UserError(f"head_dim {a.head_dim} is not dim / n_heads = {a.dim // a.n_heads}: Meta's params.json "
                        "cannot state it; save in Hugging Face format (save_hf) instead")
    default = RopeScaling(factor=a.rope_scaling.factor) if a.rope_scaling is not None else None
    if a.rope_scaling is not None and a.rope_scaling != default:
        raise UserError(f"RoPE scaling {a.rope_scaling.model_dump()}: Meta's params.json states only the factor "
                        f"(the rest is {default.model_dump()}); save in Hugging Face format (save_hf) instead")
    split = {"n_heads x head_dim": a.n_heads * a.head_dim, "n_kv_heads x head_dim":
             a.n_kv_heads * a.head_dim, "hidden_dim": a.hidden_dim, "vocab_size": a.vocab_size}
    uneven = [f"{name} {size}" for name, size in split.items() if size % shards]
    if uneven:
        raise UserError(f"{shards} shards do not divide {', '.join(uneven)}: choose a shard count that divides "
                        "every split dimension")
    out.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    if a.tie_embeddings:
        del state["output.weight"]  # Meta's 3.2 1B/3B files tie it too: absent means tied
    for i in range(a.n_layers):
        for key, heads in (("wq", a.n_heads), ("wk", a.n_kv_heads)):
            name = f"layers.{i}.attention.{key}.weight"
            state[name] = hf_to_meta_qk(state[name], heads)
    row_parallel = ("attention.wo.weight", "feed_forward.w2.weight")
    column_parallel = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                       "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight",
                       "tok_embeddings.weight")
    for rank in range(shards):
        part = {}
        for key, value in state.items():
            dim = 1 if key.endswith(row_parallel) else 0 if key.endswith(column_parallel) else None
            part[key] = (value if dim is None else value.chunk(shards, dim=dim)[rank]).cpu().clone()  # loads anywhere
        with atomic_writer(out / f"consolidated.{rank:02d}.pth") as f:
            torch.save(part, f)
    multiple_of, multiplier = _meta_ffn_rule(a)
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
              "norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "use_scaled_rope": a.rope_scaling is not None}
    if a.rope_scaling is not None:
        params["rope_scaling_factor"] = a.rope_scaling.factor
    atomic_write_json(out / "params.json", params)
    return out


def _meta_ffn_rule(a: ModelArgs) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's FFN rule give ``a.hidden_dim``.

    HF configs state the width directly; Meta's params.json can only derive it. Rounding up to a
    multiple of the width itself gives the width whenever the unrounded value is not above it.
    """
    if ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier) == a.hidden_dim:
        return a.multiple_of, a.ffn_dim_multiplier
    base = int(2 * 4 * a.dim / 3)
    multiplier = None if base <= a.hidden_dim else a.hidden_dim / base * (1 - 1e-9)
    return a.hidden_dim, multiplier


def _tokenizer_in(directory: Path):
    """The tokenizer in ``directory`` (tokenizer.json or tokenizer.model, as load_tokenizer picks), or None."""
    from llama_sae.llama.tokenizer import _tokenizer_from_dir

    names = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
    return _tokenizer_from_dir(directory) if any((directory / n).is_file() for n in names) else None


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "generation_config.json"):
        if (src / name).exists():
            atomic_write(out / name, (src / name).read_bytes())


def convert_meta_to_hf(src: str | os.PathLike, out: str | os.PathLike, *, rope_factor: float | None = None
                       ) -> Path:
    """Convert a Meta checkpoint directory to a Hugging Face one that transformers loads."""
    if detect_format(Path(src)) != "meta":
        raise UserError(f"{src} holds config.json: it is a Hugging Face checkpoint already (convert reads Meta's "
                        "params.json + consolidated.*.pth); load it as it is")
    if rope_factor is not None and not _read_json(Path(src) / "params.json").get("use_scaled_rope"):
        raise UserError(f"--rope-factor {rope_factor:g}: {src}/params.json does not use scaled RoPE "
                        "(use_scaled_rope), so there is no factor to set; leave --rope-factor out")
    model = load_model(src, rope_factor=rope_factor)
    src, out = Path(src), Path(out)
    sweep_temp_files(out)  # what a convert killed mid-write left (a safetensors temp file is the model's size)
    for stale in (out / "config.json", out / HF_INDEX):  # an earlier output's (--overwrite): config.json comes last
        stale.unlink(missing_ok=True)
    if (src / "tokenizer.model").exists() and not (src / "tokenizer.json").exists():
        from llama_sae.llama.tokenizer import write_hf_tokenizer_json

        write_hf_tokenizer_json(src / "tokenizer.model", out)  # first: a tokenizer it cannot read stops it here
    return save_hf(model, out, tokenizer_dir=src)  # config.json last: a killed convert leaves no loadable output
