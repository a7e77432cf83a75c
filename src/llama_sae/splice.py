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
tokens it names. ``rows`` names the tokens an edit may change: with the error term the SAE then runs on
those tokens alone, and every other token passes through untouched (a steer on the last prompt token
costs one token's encode, and a decoding step it does not reach costs nothing).

    with spliced(model, sae, edit=boost, rows=lambda x: x.norm(dim=-1) > 10):   # edit only these tokens
        logits = model(tokens)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
# The tokens an edit may change: given the hook input x [..., d_in], a bool mask [...], or None for all tokens.
Rows = Callable[[Tensor], "Tensor | None"]


def reconstruct(sae: SAE, x: Tensor, edit: LatentEdit | None = None, pre_bias: PreBias | None = None,
                compute_dtype: torch.dtype | None = None, *, need_clean: bool = True
                ) -> tuple[Tensor | None, Tensor | None]:
    """The SAE's reconstruction of x [..., d_in], and what an edit changes in it.

    ``edit`` receives the dense latents [..., d_sae] (zero outside each token's top k; it may change them in
    place) and returns the latents to decode; ``pre_bias`` re-encodes the chosen tokens with a bias on the
    pre-activation (TopK then picks among the biased values), and ``edit`` sees those latents. Returns
    (x̂ [..., d_in], x̂_edited − x̂ [..., d_in]), float32; x̂ is None when ``need_clean`` is False (the error-term
    splice needs only the difference: no decode of x̂), and the difference is None when no edit or bias
    changed a latent. It is decoded from the changed latents alone, so an edit that changes nothing is no
    change at all. ``compute_dtype``: see :meth:`SAE.select`.
    """
    shape = x.shape
    flat = x.reshape(-1, sae.cfg.d_in)
    x_norm, mu, std = normalize(flat, sae.cfg.normalize_activations)
    xc = x_norm - sae.b_dec
    vals, idx = sae.select(xc, compute_dtype)
    clean = None
    if need_clean:
        recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
        clean = denormalize(recon, mu, std).view(shape)
    bias = None if pre_bias is None else pre_bias(x)
    if bias is not None and not bias[1].any():
        bias = None
    if edit is None and bias is None:
        return clean, None
    N, n = flat.shape[0], sae.cfg.d_sae
    dense = torch.zeros(N, n, device=flat.device).scatter_(1, idx, vals)  # [N, d_sae]
    if bias is not None:
        b, where = bias
        biased = where.reshape(-1).nonzero()  # [m, 1] the biased tokens
        b_vals, b_idx, _, _ = encode_select(xc[biased[:, 0]], sae.W_enc, sae.b_enc + b, sae.cfg.k,
                                            compute_dtype=compute_dtype)
        dense[biased[:, 0]] = 0
        dense[biased, b_idx] = b_vals
    given = dense.view(*shape[:-1], n)
    latents = given if edit is None else edit(given)
    if not isinstance(latents, Tensor):
        raise TypeError(f"the latent edit returned {type(latents).__name__}: it must return the latents "
                        "(edit(h) -> h, even when it changes h in place)")
    if latents.shape != given.shape:  # (a transposed [T, B, n] would land on the wrong tokens)
        raise ValueError(f"the latent edit returned shape {tuple(latents.shape)} for latents of shape "
                         f"{tuple(given.shape)}: return them in the shape they came in")
    latents = latents.reshape(-1, n)
    if not (latents.data_ptr() == dense.data_ptr() and latents.shape == dense.shape
            and latents.stride() == dense.stride() and latents.dtype == dense.dtype):
        latents = latents.to(torch.float32, copy=True)  # the edit's own tensor: not ours to change
    change = latents.scatter_add_(1, idx, -vals)  # edited minus unedited latents, in place: [N, d_sae]
    cols = ((change.amax(0) != 0) | (change.amin(0) != 0)).nonzero().flatten()  # the latents some token changed
    # (as change.any(0), NaN included: two contiguous reductions are twice as fast as any over dim 0)
    if not len(cols):
        return clean, None
    return clean, decode_change(sae, change[:, cols], cols, std).view(shape)


def decode_change(sae: SAE, change: Tensor, cols: Tensor, std: Tensor | None) -> Tensor:
    """x̂_edited − x̂ [N, d_in] for a change [N, m] of the latents ``cols`` [m], given each token's ``std`` [N, 1]
    from :func:`normalize` (None: no normalization). b_dec cancels, and so does the mean: a difference is
    denormalized by the std alone."""
    delta = change @ sae.W_dec[cols]
    return delta if std is None else delta * std


def pick_rows(x: Tensor, mask: Tensor) -> tuple[Tensor | None, Tensor]:
    """The tokens of x [..., d] where ``mask`` [...] is True: (their indices [m] among x's tokens, flattened,
    or None when every token is; the tokens [m, d])."""
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"a token mask of shape {tuple(mask.shape)} for tokens {tuple(x.shape[:-1])}")
    flat = x.reshape(-1, x.shape[-1])
    if mask.all():
        return None, flat
    sel = mask.reshape(-1).nonzero().flatten()
    return sel, flat[sel]


def add_at_rows(x: Tensor, sel: Tensor | None, delta: Tensor) -> Tensor:
    """x [..., d] plus ``delta`` [m, d] at the tokens ``sel`` [m] (from :func:`pick_rows`; None: every token),
    each ``x + delta`` in x's dtype as in the splice over all tokens; every other token is x's, bit for bit."""
    if sel is None:
        return x + delta.view(x.shape).to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    out = flat.clone()
    out[sel] = flat[sel] + delta.to(x.dtype)
    return out.view(x.shape)


def splice_fn(sae: SAE, *, error_term: bool = True, edit: LatentEdit | None = None,
              pre_bias: PreBias | None = None, rows: Rows | None = None,
              compute_dtype: torch.dtype | None = None) -> Callable[[Tensor], Tensor]:
    """The replacement function for the SAE's hook point (see the module docstring and :func:`spliced`).

    With ``rows`` and the error term, the SAE runs on the chosen tokens only: ``edit`` receives their
    latents [m, d_sae] (in token order, as ``x[mask]`` lists them), ``pre_bias`` still sees the whole x (its
    bias reaches the chosen tokens only), and every other token leaves the hook as x, bit for bit; no chosen
    token, no SAE at all.
    """

    @torch.no_grad()
    def replace(x: Tensor) -> Tensor:
        if error_term and edit is None and pre_bias is None:
            return x  # x̂ + (x − x̂) with nothing edited: the SAE need not run at all
        if not error_term:
            clean, delta = reconstruct(sae, x, edit, pre_bias, compute_dtype)
            return (clean if delta is None else clean + delta).to(x.dtype)
        mask = None if rows is None else rows(x)
        if mask is None:
            _, delta = reconstruct(sae, x, edit, pre_bias, compute_dtype, need_clean=False)
            return x if delta is None else x + delta.to(x.dtype)
        sel, xs = pick_rows(x, mask)  # the tokens to run the SAE on
        if not len(xs):
            return x

        def bias_of_rows(_):  # pre_bias reads the whole x; its mask is cut down to the chosen tokens
            bias = pre_bias(x)
            return bias if bias is None or sel is None else (bias[0], bias[1].reshape(-1)[sel])

        _, delta = reconstruct(sae, xs, edit, None if pre_bias is None else bias_of_rows, compute_dtype,
                               need_clean=False)
        return x if delta is None else add_at_rows(x, sel, delta)

    return replace


def check_fits(model: Transformer, sae: SAE) -> str:
    """The SAE's hook point, after checking the model has it and its width matches d_in."""
    hook = sae.cfg.hook_name
    if hook is None:
        raise UserError("the SAE does not name a hook point of ours (`llama-sae sae info` shows what it says): "
                        "pass --hook KIND.LAYER (e.g. resid_post.3; in Python sae.load(path, hook_name=...)), or "
                        "write it into the files once with `llama-sae sae convert PATH --hook KIND.LAYER --out DIR`")
    name = sae.cfg.model_name
    named = "" if not name else f" (its files name {name}: load that checkpoint)" if Path(name).is_dir() else \
        f" (its files name {name})"
    try:
        parse_hook_name(hook, model.args.n_layers)
    except UserError as e:  # a layer this model lacks: most often the SAE of another model
        raise UserError(f"{e}: a wrong layer, or the SAE of another model{named}" if "out of range" in str(e)
                        else str(e)) from None
    sae.check_float32()
    if sae.cfg.d_in != model.args.dim:
        raise UserError(f"the SAE reads {sae.cfg.d_in}-wide activations but {hook} of this model is "
                        f"{model.args.dim} wide: the SAE belongs to another model{named}")
    if sae.W_enc.device != model.device:
        raise UserError(f"the SAE is on {sae.W_enc.device} but the model on {model.device}: load it with "
                        f"sae.load(path, device=model.device), or move it with sae.to(model.device)")
    return hook


def splice_fns(model: Transformer, sae_or_saes: SAE | Sequence[SAE], *, error_term: bool = True,
               edit: LatentEdit | dict[str, LatentEdit] | None = None,
               pre_bias: PreBias | dict[str, PreBias] | None = None, rows: Rows | dict[str, Rows] | None = None,
               compute_dtype: torch.dtype | None = None) -> dict[str, Callable[[Tensor], Tensor]]:
    """{hook name: replacement function} for the SAE(s), each checked to fit ``model`` (see :func:`spliced`)."""
    saes = [sae_or_saes] if isinstance(sae_or_saes, SAE) else list(sae_or_saes)
    hooks = {sae.cfg.hook_name for sae in saes}
    for what, value in (("edit", edit), ("pre_bias", pre_bias), ("rows", rows)):
        stray = sorted(set(value) - hooks) if isinstance(value, dict) else []
        if stray:  # a typo would otherwise look like an edit that changes nothing
            raise UserError(f"{what} names {', '.join(stray)}, where no SAE is spliced: the SAEs read "
                            f"{', '.join(sorted(h or '?' for h in hooks))}")
    fns = {}
    for sae in saes:
        hook = check_fits(model, sae)
        if hook in fns:
            raise UserError(f"two SAEs read {hook}: splice one SAE per hook point")
        sae_edit = edit.get(hook) if isinstance(edit, dict) else edit
        sae_bias = pre_bias.get(hook) if isinstance(pre_bias, dict) else pre_bias
        sae_rows = rows.get(hook) if isinstance(rows, dict) else rows
        fns[hook] = splice_fn(sae, error_term=error_term, edit=sae_edit, pre_bias=sae_bias, rows=sae_rows,
                              compute_dtype=compute_dtype)
    return fns


@contextmanager
def spliced(model: Transformer, sae_or_saes: SAE | Sequence[SAE], *, error_term: bool = True,
            edit: LatentEdit | dict[str, LatentEdit] | None = None,
            pre_bias: PreBias | dict[str, PreBias] | None = None, rows: Rows | dict[str, Rows] | None = None,
            compute_dtype: torch.dtype | None = None) -> Iterator[Transformer]:
    """Within the block, ``model`` runs with the SAE(s) at their hook points (one SAE per hook point).

    Args:
        error_term: add back x − x̂ of the unedited input (the default: an unedited splice is exact).
        edit: a function of the dense latents [..., d_sae] applied between encode and decode, or a
            dict {hook name: function} when several SAEs are spliced.
        pre_bias: a bias on the encoder pre-activation before TopK (see :data:`PreBias`), or such a dict.
        rows: the tokens the edit and pre_bias may change (see :data:`Rows`), or such a dict: a function of
            the hook input x [..., d_in] giving a bool mask [...] (None: all tokens). With the error term the
            SAE runs on those tokens alone (the edit sees their latents [m, d_sae], in the order ``x[mask]``
            lists them) and every other token passes through as x, bit for bit; a pass with no such token
            runs no SAE. The chosen tokens match the splice over all tokens up to float rounding (the
            encoder GEMM over fewer rows). Ignored without the error term: every token is reconstructed.
        compute_dtype: the encoder GEMM's dtype (default the SAE's, exact); ``torch.bfloat16`` is several
            times faster on AMX CPUs and GPUs; on a GPU it may swap near-tied latents at the k-th place
            (:meth:`SAE.select`).
    """
    fns = splice_fns(model, sae_or_saes, error_term=error_term, edit=edit, pre_bias=pre_bias, rows=rows,
                     compute_dtype=compute_dtype)
    with model.hooked(fns):
        yield model


class SplicedModel:
    """The model with SAE(s) spliced in on every call: a wrapper that behaves like the model.

        sm = SplicedModel(model, sae)                         # exact: logits equal the model's
        logits = sm(tokens); acts = sm.capture(tokens, ["resid_post.3"])
        generate(sm, tok, ["Once upon"])                      # generation (KV cache) runs spliced too
        sm.edit = lambda h: h * 0                             # change the edit (or error_term) at any time
        sm.rows = lambda x: x.norm(dim=-1) > 10               # edit only these tokens (see :func:`spliced`)

    Calls (forward, capture) run inside ``model.hooked``; every other attribute (args, device, new_cache,
    ...) is the model's. The model itself is left unspliced outside the wrapper's calls.
    """

    def __init__(self, model: Transformer, sae_or_saes: SAE | Sequence[SAE], *, error_term: bool = True,
                 edit: LatentEdit | dict[str, LatentEdit] | None = None,
                 pre_bias: PreBias | dict[str, PreBias] | None = None, rows: Rows | dict[str, Rows] | None = None,
                 compute_dtype: torch.dtype | None = None):
        self.model = model
        self.saes = [sae_or_saes] if isinstance(sae_or_saes, SAE) else list(sae_or_saes)
        self.error_term, self.edit, self.pre_bias, self.rows = error_term, edit, pre_bias, rows
        self.compute_dtype = compute_dtype
        self._fns()  # check now: a bad SAE or edit fails at construction, not at the first call

    def _fns(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return splice_fns(self.model, self.saes, error_term=self.error_term, edit=self.edit, pre_bias=self.pre_bias,
                          rows=self.rows, compute_dtype=self.compute_dtype)

    def __call__(self, *args, **kwargs) -> Tensor:
        with self.model.hooked(self._fns()):
            return self.model(*args, **kwargs)

    def forward(self, *args, **kwargs) -> Tensor:
        """The spliced forward, as calling the wrapper (the model's own ``forward`` would run unspliced)."""
        return self(*args, **kwargs)

    def capture(self, tokens: Tensor, names: list[str] | tuple[str, ...], **kw) -> dict[str, Tensor]:
        """Hook point activations of the spliced model (a hook point with an SAE shows what runs downstream)."""
        with self.model.hooked(self._fns()):
            return self.model.capture(tokens, names, **kw)

    def __getattr__(self, name: str):
        if name == "model" or name.startswith("__"):  # not yet set (copy, pickle) or a protocol the class lacks
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        hooks = ", ".join(sae.cfg.hook_name or "?" for sae in self.saes)
        return f"SplicedModel({type(self.model).__name__}, saes at [{hooks}], error_term={self.error_term})"
