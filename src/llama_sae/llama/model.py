"""The Llama 3.x text transformer in one file, with named hook points.

References: meta-llama/llama-models `models/llama3/model.py` (parameter names), Hugging Face
`LlamaForCausalLM` (numerics: RMSNorm order, rotate-half RoPE, the order of casts), gpt-fast
`model.py` (meta-device construction, KV cache layout).

Our q/k projections use the Hugging Face "rotate-half" RoPE layout, so HF checkpoints load with no
copy; Meta checkpoints (interleaved rotary pairs) are permuted once at load time (checkpoint.py).

Hook points, per block L (0-based): ``resid_pre.L`` (block input), ``attn_in.L`` (after the attention
RMSNorm, weight included), ``attn_out.L`` (attention output after wo), ``mlp_in.L`` (after the FFN
RMSNorm), ``mlp_out.L`` (FFN output), ``resid_post.L`` (block output, before the final norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from llama_sae.errors import UserError

HOOK_KINDS = ("resid_pre", "attn_in", "attn_out", "mlp_in", "mlp_out", "resid_post")
Edit = Callable[[Tensor], Tensor]


class RopeScaling(BaseModel):
    """Llama 3 ("llama3") RoPE frequency scaling parameters."""

    model_config = ConfigDict(extra="forbid")
    factor: float = Field(8.0, gt=0, allow_inf_nan=False,
                          description="divide low frequencies by this (8 for 3.1/3.3, 32 for 3.2)")
    low_freq_factor: float = Field(1.0, gt=0, allow_inf_nan=False)
    high_freq_factor: float = Field(4.0, gt=0, allow_inf_nan=False)
    original_max_position_embeddings: int = Field(8192, gt=0, description="context length before scaling")


class ModelArgs(BaseModel):
    """Shape and numerics of a Llama 3.x text model (names follow Meta's params.json)."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(gt=0, description="residual stream width (d_model)")
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (GQA); None = n_heads")
    vocab_size: int = Field(gt=0)
    multiple_of: int = Field(256, description="FFN width is rounded up to a multiple of this")
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = Field(None, description="FFN width; None = derived from dim as Meta does")
    head_dim: int | None = Field(None, description="None = dim // n_heads")
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = Field(8192, description="longest sequence the KV cache is sized for by default")

    @model_validator(mode="after")
    def _derive(self) -> ModelArgs:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        return self


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width rule: 8/3·dim, times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse RoPE frequencies [head_dim // 2] in float32, with "llama3" scaling if configured."""
    hd = args.head_dim
    exponents = torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    s = args.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rotate_half(x: Tensor) -> Tensor:
    """[..., hd] -> [..., hd]: (x1, x2) -> (-x2, x1) on the two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm in float32, cast back to the input dtype, then scaled (Hugging Face's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # upcast island: the mean of squares overflows / loses bits in bf16
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Per-layer key/value cache: ``k`` and ``v`` are [batch, n_kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, hd] at positions start..start+T; return the cache up to there."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# torch >= 2.5: scaled_dot_product_attention takes K/V with fewer heads than Q
SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Attention(nn.Module):
    """Grouped-query attention with rotate-half RoPE."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start: int,
                cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, Hkv, start+T, hd]
        groups = self.n_heads // self.n_kv_heads
        gqa = {}
        if groups > 1 and SDPA_GQA:
            gqa = {"enable_gqa": True}  # SDPA reads each K/V head for its group of query heads: no copies
        elif groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # [B, H, S, hd]
            v = v.repeat_interleave(groups, dim=1)
        causal = mask is None and T > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)  # [B, H, T, hd]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, dim]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block; ``point(name, x)`` is called at each hook point and returns what flows on."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, start, point: Callable[[str, Tensor], Tensor],
                cache: KVCache | None = None) -> Tensor:
        L = self.layer_id
        x = point(f"resid_pre.{L}", x)
        attn = point(f"attn_out.{L}", self.attention(point(f"attn_in.{L}", self.attention_norm(x)),
                                                    cos, sin, mask, start, cache))
        h = x + attn
        mlp = point(f"mlp_out.{L}", self.feed_forward(point(f"mlp_in.{L}", self.ffn_norm(h))))
        return point(f"resid_post.{L}", h + mlp)


class _HookRun:
    """The hook points of one forward pass: apply edits, then record captures."""

    def __init__(self, edits: dict[str, Edit], capture: set[str]):
        self.edits, self.capture, self.captured = edits, capture, {}

    def __call__(self, name: str, x: Tensor) -> Tensor:
        edit = self.edits.get(name)
        if edit is not None:
            x = edit(x)
        if name in self.capture:
            self.captured[name] = x
        return x


def parse_hook_name(name: str, n_layers: int | None = None) -> tuple[str, int]:
    """Split ``"resid_post.12"`` into ("resid_post", 12), with a one-line error for bad names (and, given
    ``n_layers``, for a layer the model lacks)."""
    kind, _, layer = name.partition(".")
    if kind not in HOOK_KINDS or not layer.isdecimal() or not layer.isascii():
        raise UserError(f"unknown hook point {name!r}: use KIND.LAYER with KIND one of {', '.join(HOOK_KINDS)}"
                        + ("" if n_layers is None else f" (e.g. resid_post.{n_layers // 2})"))
    if layer != str(int(layer)):  # "resid_post.03" would name a hook point no layer runs
        raise UserError(f"hook point {name!r}: write the layer as a plain number, {kind}.{int(layer)}")
    if n_layers is not None and int(layer) >= n_layers:
        raise UserError(f"hook point {name!r}: layer {layer} is out of range, this model has layers "
                        f"0..{n_layers - 1}")
    return kind, int(layer)


class Transformer(nn.Module):
    """Llama 3.x decoder. ``model(tokens)`` [B, T] -> logits [B, T, vocab_size]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        on_meta = torch.empty(0).device.type == "meta"  # built to be loaded: skip the random init
        # nn.Embedding's normal_ init on the meta device goes through torch._refs and costs seconds
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim,
                                           _weight=torch.empty(args.vocab_size, args.dim) if on_meta else None)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # computed on the CPU even when the model is built on the meta device
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.edits: dict[str, Edit] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> cos, sin [B, T, head_dim], computed in float32, cast to ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device, torch.float32)  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        tokens: Tensor,
        *,
        start: int = 0,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        capture: set[str] | None = None,
        resume: tuple[int, Tensor] | None = None,
        last_only: bool = False,
        cache: list[KVCache] | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Run the model on tokens [B, T].

        Args:
            start: cache position of tokens[:, 0] (generation with a KV cache).
            cache: the KV cache of this generation, one :class:`KVCache` per layer (:meth:`new_cache`): the
                forward writes its keys and values at ``start`` and attends over the cache up to there. The
                cache belongs to the caller, so other forwards (a plain one between two steps of a stream)
                leave it alone.
            positions: RoPE positions [B, T]; default ``start + arange(T)`` for every row.
            mask: boolean attention mask [B, 1, T, S] (True = attend); default causal.
            capture: hook point names to record; the forward then ends after the last block needed
                and returns ``{name: [B, T, d]}`` instead of logits.
            resume: (L, x): start at block L with x [B, T, dim], the residual stream entering it
                (``resid_pre.L``, from :meth:`residual_before`), skipping the embedding and blocks 0..L-1.
                Several runs that differ only from block L on (a clean and a spliced forward) share
                that prefix, and each gives the logits of a whole forward, bit for bit.
            last_only: logits of the last position only, [B, 1, vocab_size] (generation's prefill: with
                Llama 3's 128k vocabulary the whole [B, T, vocab_size] of a long prompt is gigabytes).

        Returns:
            logits [B, T, vocab_size] in the model's dtype, or the captured dict.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)}: the model takes [batch, seq] (one sequence: "
                             "tokens[None])")
        B, T = tokens.shape
        stop_after = None
        if capture:
            stop_after = max(parse_hook_name(n, self.args.n_layers)[1] for n in capture)
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if mask is None and cache is not None and start > 0 and T > 1:
            # SDPA's is_causal aligns its triangle top-left (query i sees keys 0..i), but these queries sit at
            # start.. over keys 0..start+T-1: query i sees keys 0..start+i
            q = torch.arange(start, start + T, device=tokens.device)[:, None]
            mask = (torch.arange(start + T, device=tokens.device)[None, :] <= q)[None, None]  # [1, 1, T, start+T]
        run = _HookRun(self.edits, capture or set())
        first = 0
        if resume is None:
            x = self.tok_embeddings(tokens)  # [B, T, dim]
        else:
            first, x = resume
            if not 0 <= first < self.args.n_layers or x.shape != (B, T, self.args.dim):
                raise ValueError(f"resume at block {first} with a {tuple(x.shape)} residual: expected a block in "
                                 f"0..{self.args.n_layers - 1} and shape {(B, T, self.args.dim)}")
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers[first:]:
            x = layer(x, cos, sin, mask, start, run, None if cache is None else cache[layer.layer_id])
            if stop_after is not None and layer.layer_id >= stop_after:
                return run.captured
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))  # [B, T, vocab_size]

    def capture(self, tokens: Tensor, names: list[str] | tuple[str, ...], **kw) -> dict[str, Tensor]:
        """Hook point activations {name: [B, T, d]}; the forward stops after the last block needed."""
        if not names:
            raise UserError("capture needs at least one hook point name, e.g. resid_post.0")
        return self(tokens, capture=set(names), **kw)

    def residual_before(self, tokens: Tensor, layer: int, **kw) -> Tensor:
        """The residual stream entering block ``layer`` [B, T, dim] (``resid_pre.{layer}``), computed without
        running that block: what ``resume=(layer, x)`` of :meth:`forward` starts from."""
        if layer == 0:
            return self.tok_embeddings(tokens)
        return self.capture(tokens, [f"resid_post.{layer - 1}"], **kw)[f"resid_post.{layer - 1}"]

    @contextmanager
    def hooked(self, edits: dict[str, Edit]) -> Iterator[Transformer]:
        """Within the block, hook point ``name`` carries ``edits[name](x)`` instead of x."""
        for name in edits:
            parse_hook_name(name, self.args.n_layers)
        previous = self.edits
        self.edits = {**previous, **edits}
        try:
            yield self
        finally:
            self.edits = previous

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """A KV cache for ``batch`` sequences of up to ``max_len`` tokens, one per layer (pass it as ``cache=``)."""
        a = self.args
        return [KVCache(batch, max_len, a.n_kv_heads, a.head_dim, self.dtype, self.device) for _ in self.layers]


def _preset(dim, n_layers, n_heads, ffn_mult, multiple_of, factor, tied) -> ModelArgs:
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
                     multiple_of=multiple_of, ffn_dim_multiplier=ffn_mult, norm_eps=1e-5,
                     rope_theta=500000.0, rope_scaling=RopeScaling(factor=factor), tie_embeddings=tied,
                     max_seq_len=131072)


# The published Llama 3.x text shapes (Meta's params.json; FFN widths 8192, 8192, 14336, 28672).
PRESETS: dict[str, ModelArgs] = {
    "llama-3.2-1b": _preset(2048, 16, 32, 1.5, 256, 32.0, True),
    "llama-3.2-3b": _preset(3072, 28, 24, 1.0, 256, 32.0, True),
    "llama-3.1-8b": _preset(4096, 32, 32, 1.3, 1024, 8.0, False),
    "llama-3.1-70b": _preset(8192, 80, 64, 1.3, 4096, 8.0, False),
    "llama-3.3-70b": _preset(8192, 80, 64, 1.3, 4096, 8.0, False),
}


def preset(name: str) -> ModelArgs:
    """The ModelArgs of a published Llama 3.x model, e.g. ``preset("llama-3.2-3b")``."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name].model_copy()
