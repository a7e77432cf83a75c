"""Put SAEs inside a Llama: the model runs on their reconstructions, with an exact error term.

    with spliced(model, sae):                       # logits equal the plain model's, bit for bit
        logits = model(tokens)
    with spliced(model, sae, edit=lambda h: h * 0):  # edit the latents between encode and decode
        logits = model(tokens)
    with spliced(model, sae, error_term=False):     # the model runs on the reconstruction alone
        logits = model(tokens)
    sm = SplicedModel(model, sae)                   # the same, as an object that behaves like the model

With the error term, the hook point carries ``x + (x̂_edited − x̂)``: mathematically x̂_edited + (x − x̂),
the reconstruction of the edited latents plus the error of the unedited input. Written this way an
unchanged splice adds exactly zero, so it reproduces the model's output exactly, not just closely; the
difference is decoded from the changed latents only, so an edit that changes nothing is exact too.
``pre_bias`` adds a bias to the encoder's pre-activation before TopK (the seed's steering), for the
tokens it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_sae.errors import UserError
from llama_sae.llama.model import Transformer, parse_hook_name
from llama_sae.sae.model import SAE, denormalize, encode_select, normalize

LatentEdit = Callable[[Tensor], Tensor]
# A bias on the encoder pre-activation, before TopK (the seed's h_bias): given the hook input x [..., d_in],
# (bias [d_sae], where [...] bool: the tokens that get it), or None for no bias on this forward pass.
PreBias = Callable[[Tensor], "tuple[Tensor, Tensor] | None"]


def reconstruct(sae: SAE, x: Tensor, edit: LatentEdit | None = None, pre_bias: PreBias | None = None,
                compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """The SAE's reconstruction of x [..., d_in], and what an edit changes in it.

    ``edit`` receives the dense latents [..., d_sae] (zero outside each token's top k) and returns
    the latents to decode; ``pre_bias`` re-encodes the chosen tokens with a bias on the pre-activation
    (TopK then picks among the biased values), and ``edit`` sees those latents. Returns (x̂ [..., d_in],
    x̂_edited − x̂ [..., d_in] or None), float32. The difference is decoded from the changed latents
    alone, so an edit that changes nothing gives exactly zero. ``compute_dtype``: see :meth:`SAE.select`.
    """
    shape = x.shape
    flat = x.reshape(-1, sae.cfg.d_in)
    x_norm, mu, std = normalize(flat, sae.cfg.normalize_activations)
    xc = x_norm - sae.b_dec
    vals, idx = sae.select(xc, compute_dtype)
    clean = denormalize(F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec, mu, std)
    bias = None if pre_bias is None else pre_bias(x)
    if bias is not None and not bias[1].any():
        bias = None
    if edit is None and bias is None:
        return clean.view(shape), None
    dense = torch.zeros(flat.shape[0], sae.cfg.d_sae, device=flat.device).scatter_(1, idx, vals)  # [N, d_sae]
    latents = dense.clone()  # an edit may work in place
    if bias is not None:
        b, where = bias
        rows = where.reshape(-1).nonzero().flatten()  # the biased tokens
        b_vals, b_idx, _, _ = encode_select(xc[rows], sae.W_enc, sae.b_enc + b, sae.cfg.k, compute_dtype=compute_dtype)
        latents[rows] = torch.zeros(len(rows), sae.cfg.d_sae, device=flat.device).scatter_(1, b_idx, b_vals)
    if edit is not None:
        latents = edit(latents.view(*shape[:-1], sae.cfg.d_sae)).reshape(-1, sae.cfg.d_sae).float()
    change = latents - dense  # [N, d_sae]
    cols = change.any(0).nonzero().flatten()  # the latents some token changed
    delta = change[:, cols] @ sae.W_dec[cols]  # [N, d_in], b_dec cancels
    if std is not None:
        delta = delta * std  # denormalize a difference: the mean cancels
    return clean.view(shape), delta.view(shape)


def splice_fn(sae: SAE, *, error_term: bool = True, edit: LatentEdit | None = None,
              pre_bias: PreBias | None = None, compute_dtype: torch.dtype | None = None) -> Callable[[Tensor], Tensor]:
    """The replacement function for the SAE's hook point (see the module docstring)."""

    @torch.no_grad()
    def replace(x: Tensor) -> Tensor:
        if error_term and edit is None and pre_bias is None:
            return x  # x̂ + (x − x̂) with nothing edited: the SAE need not run at all
        clean, delta = reconstruct(sae, x, edit, pre_bias, compute_dtype)
        if not error_term:
            return (clean if delta is None else clean + delta).to(x.dtype)
        if delta is None:
            return x
        return x + delta.to(x.dtype)

    return replace


def check_fits(model: Transformer, sae: SAE) -> str:
    """The SAE's hook point, after checking the model has it and its width matches d_in."""
    hook = sae.cfg.hook_name
    if hook is None:
        raise UserError("the SAE does not say which hook point it reads (cfg hook_name is empty): "
                        "set metadata.hook_name in its cfg.json, e.g. resid_post.3")
    parse_hook_name(hook, model.args.n_layers)
    if sae.cfg.d_in != model.args.dim:
        raise UserError(f"the SAE reads {sae.cfg.d_in}-wide activations but {hook} of this model is "
                        f"{model.args.dim} wide: the SAE belongs to another model")
    return hook


def splice_fns(model: Transformer, sae_or_saes: SAE | Sequence[SAE], *, error_term: bool = True,
               edit: LatentEdit | dict[str, LatentEdit] | None = None,
               pre_bias: PreBias | dict[str, PreBias] | None = None,
               compute_dtype: torch.dtype | None = None) -> dict[str, Callable[[Tensor], Tensor]]:
    """{hook name: replacement function} for the SAE(s), each checked to fit ``model`` (see :func:`spliced`)."""
    saes = [sae_or_saes] if isinstance(sae_or_saes, SAE) else list(sae_or_saes)
    fns = {}
    for sae in saes:
        hook = check_fits(model, sae)
        if hook in fns:
            raise UserError(f"two SAEs read {hook}: splice one SAE per hook point")
        sae_edit = edit.get(hook) if isinstance(edit, dict) else edit
        sae_bias = pre_bias.get(hook) if isinstance(pre_bias, dict) else pre_bias
        fns[hook] = splice_fn(sae, error_term=error_term, edit=sae_edit, pre_bias=sae_bias, compute_dtype=compute_dtype)
    return fns


@contextmanager
def spliced(model: Transformer, sae_or_saes: SAE | Sequence[SAE], *, error_term: bool = True,
            edit: LatentEdit | dict[str, LatentEdit] | None = None,
            pre_bias: PreBias | dict[str, PreBias] | None = None,
            compute_dtype: torch.dtype | None = None) -> Iterator[Transformer]:
    """Within the block, ``model`` runs with the SAE(s) at their hook points (one SAE per hook point).

    Args:
        error_term: add back x − x̂ of the unedited input (the default: an unedited splice is exact).
        edit: a function of the dense latents [..., d_sae] applied between encode and decode, or a
            dict {hook name: function} when several SAEs are spliced.
        pre_bias: a bias on the encoder pre-activation before TopK (see :data:`PreBias`), or such a dict.
        compute_dtype: the encoder GEMM's dtype (default the SAE's, exact); ``torch.bfloat16`` is several
            times faster on AMX CPUs and GPUs, and may swap near-tied latents at the k-th place
            (:meth:`SAE.select`).
    """
    fns = splice_fns(model, sae_or_saes, error_term=error_term, edit=edit, pre_bias=pre_bias,
                     compute_dtype=compute_dtype)
    with model.hooked(fns):
        yield model


class SplicedModel:
    """The model with SAE(s) spliced in on every call: a wrapper that behaves like the model.

        sm = SplicedModel(model, sae)                         # exact: logits equal the model's
        logits = sm(tokens); acts = sm.capture(tokens, ["resid_post.3"])
        generate(sm, tok, ["Once upon"])                      # generation (KV cache) runs spliced too
        sm.edit = lambda h: h * 0                             # change the edit (or error_term) at any time

    Calls (forward, capture) run inside ``model.hooked``; every other attribute (args, device, setup_cache,
    ...) is the model's. The model itself is left unspliced outside the wrapper's calls.
    """

    def __init__(self, model: Transformer, sae_or_saes: SAE | Sequence[SAE], *, error_term: bool = True,
                 edit: LatentEdit | dict[str, LatentEdit] | None = None, compute_dtype: torch.dtype | None = None):
        self.model = model
        self.saes = [sae_or_saes] if isinstance(sae_or_saes, SAE) else list(sae_or_saes)
        self.error_term, self.edit, self.compute_dtype = error_term, edit, compute_dtype
        splice_fns(model, self.saes)  # check now: a bad SAE fails at construction, not at the first call

    def _fns(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return splice_fns(self.model, self.saes, error_term=self.error_term, edit=self.edit,
                          compute_dtype=self.compute_dtype)

    def __call__(self, *args, **kwargs) -> Tensor:
        with self.model.hooked(self._fns()):
            return self.model(*args, **kwargs)

    def capture(self, tokens: Tensor, names: list[str] | tuple[str, ...], **kw) -> dict[str, Tensor]:
        """Hook point activations of the spliced model (a hook point with an SAE shows what runs downstream)."""
        with self.model.hooked(self._fns()):
            return self.model.capture(tokens, names, **kw)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __repr__(self) -> str:
        hooks = ", ".join(sae.cfg.hook_name or "?" for sae in self.saes)
        return f"SplicedModel({type(self.model).__name__}, saes at [{hooks}], error_term={self.error_term})"
