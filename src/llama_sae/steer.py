"""Steering: edit chosen SAE latents while the model runs. One spec serves the CLI, Python and the UI.

A steer is ``[HOOK@]LATENT:KIND:STRENGTH[:POSITIONS]``:

    123:clamp:8             latent 123 set to 8 units after TopK
    77:add:-3               x + α·W_dec[77] with α = -3 units (the latent's value plus α, decoded)
    5:bias:4:generated      +4 units on latent 5's encoder pre-activation, before TopK (the seed's h_bias),
                            on the generated tokens only
    resid_post.2@123:clamp:8   the SAE at resid_post.2 (needed only when several SAEs are loaded)

A unit is the latent's typical maximum activation (``typical_max`` of the features artifact, or an
estimate over 2,000 corpus sentences), so "+5" is the same push for every latent. POSITIONS is
``all`` (default), ``prompt`` (the prompt's tokens), ``generated`` (the last prompt token and every
generated token: the positions whose predictions are sampled), ``last`` (the last prompt token only: a push
on the first generated word that leaves the rest of the text to the model), or ``last+N`` / ``prompt+N``
(those and the next N positions: a push that stops after N more generated tokens). Every edit is a latent
edit of the splice (:func:`llama_sae.splice.splice_fn`), which keeps the error term of the unedited input: an
edit that changes no latent leaves the model's output exactly as it was. The SAE runs on the steered tokens
alone (the others pass through untouched, and a decoding step no steer reaches runs no SAE), and ``add`` steers
alone need no encode at all: they add v·W_dec[latent] (times the token's std for a normalizing SAE). Clamp and
add steers decode the steered latents' changes only (no dense [tokens, d_sae] latents, which a long prompt at
65,536 latents would make a gigabyte); bias steers re-encode their tokens through the splice's ``pre_bias``.

    >>> steering = Steering({"resid_post.2": sae}, parse_steers(["123:clamp:8"]), units={"resid_post.2": u})
    >>> outs = generate(model, tok, ["The"], steering, max_new_tokens=24)
    >>> record(steering, model_path, ["The"], [o.text for o in outs], sampling)   # replay: generate --replay
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import EllipsisType

import torch
from torch import Tensor

from llama_sae.errors import UserError

KINDS = ("clamp", "add", "bias")
POSITIONS = ("all", "prompt", "generated", "last")  # and last+N, prompt+N (see positions_window)
ESTIMATE_SENTENCES = 2000  # the quick unit estimate reads as many sentences as the shipped features artifact (top 8)
ABSURD_STRENGTH = 50.0  # units: beyond this the edit dwarfs anything the latent does on real text
SPEC_HELP = ("LATENT:KIND:STRENGTH[:POSITIONS] with KIND clamp|add|bias and POSITIONS "
             "all|prompt|generated|last|last+N|prompt+N")
_POSITIONS_RE = re.compile(r"^(?P<base>all|prompt|generated|last)(?:\+(?P<n>\d+))?$")
_SPEC_RE = re.compile(r"^(?:(?P<hook>[a-z_]+\.\d+)@)?(?P<rest>.*)$")


@dataclass(frozen=True)
class Steer:
    """One edit of one latent. ``strength`` is in units of the latent's typical max activation."""

    latent: int
    kind: str
    strength: float
    positions: str = "all"
    hook: str | None = None  # the SAE's hook point; None: the only SAE loaded

    @property
    def spec(self) -> str:
        """The canonical spec string (what :func:`parse_steer` reads back)."""
        short = f"{self.strength:g}"  # "4", "-2.5"; the full repr where :g would round (a replay reads the spec)
        text = f"{self.latent}:{self.kind}:{short if float(short) == self.strength else repr(float(self.strength))}"
        if self.positions != "all":
            text += f":{self.positions}"
        return text if self.hook is None else f"{self.hook}@{text}"


def parse_steer(text: str) -> Steer:
    """Parse one spec (see the module docstring); a malformed one is a UserError saying what to write."""
    m = _SPEC_RE.match(text.strip())
    fields = m["rest"].split(":")
    if len(fields) not in (3, 4):
        raise UserError(f"steering spec {text!r} has {len(fields)} field(s): write {SPEC_HELP}, e.g. 123:clamp:8")
    latent, kind, strength = fields[:3]
    positions = fields[3] if len(fields) == 4 else "all"
    if "@" in latent:  # a prefix the hook pattern did not take
        raise UserError(f"steering spec {text!r}: {latent.split('@')[0]!r} is not a hook point: write KIND.LAYER@ "
                        f"before the latent (e.g. resid_post.5@123:add:4), or leave it out for the only SAE loaded")
    if not latent.strip().isdecimal():
        raise UserError(f"steering spec {text!r}: latent {latent!r} is not a non-negative integer (e.g. 123:add:4)")
    if kind not in KINDS:
        raise UserError(f"steering spec {text!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    try:
        value = float(strength)
    except ValueError:
        raise UserError(f"steering spec {text!r}: strength {strength!r} is not a number (e.g. 8 or -2.5)") from None
    if not math.isfinite(value):
        raise UserError(f"steering spec {text!r}: strength must be a finite number")
    check_positions(positions, f"steering spec {text!r}")
    if m["hook"] is not None:
        from llama_sae.llama.model import HOOK_KINDS

        if m["hook"].partition(".")[0] not in HOOK_KINDS:
            raise UserError(f"steering spec {text!r}: {m['hook']!r} is not a hook point: write KIND.LAYER@ with KIND "
                            f"one of {', '.join(HOOK_KINDS)} (e.g. resid_post.5@123:add:4)")
    return Steer(int(latent), kind, value, positions, m["hook"])


def check_positions(positions: str, where: str = "steer") -> None:
    """UserError unless ``positions`` is one of :data:`POSITIONS`, ``last+N`` or ``prompt+N``."""
    m = _POSITIONS_RE.match(positions)
    if m is None or (m["n"] is not None and m["base"] not in ("last", "prompt")):
        raise UserError(f"{where}: positions {positions!r} is not one of {', '.join(POSITIONS)}, last+N or "
                        "prompt+N (N generated tokens more, e.g. last+2)")
    if m["n"] is not None and int(m["n"]) >= 2**31:
        raise UserError(f"{where}: positions {positions!r} reaches past any context: for every generated token "
                        "write 'generated' (or 'all')")


def positions_window(positions: str, prompt_len: int) -> tuple[int, int | None]:
    """The absolute positions [lo, hi) a steer on ``positions`` edits (hi None: no end). Position
    prompt_len - 1 is the last prompt token, whose output predicts the first generated token; ``+N``
    extends a window over the next N positions (the predictions of N more generated tokens)."""
    m = _POSITIONS_RE.match(positions)
    base, extra = m["base"], int(m["n"] or 0)
    if base == "all":
        return 0, None
    if base == "generated":
        return prompt_len - 1, None
    if base == "last":
        return prompt_len - 1, prompt_len + extra
    return 0, prompt_len + extra  # prompt


def parse_steers(texts: Sequence[str] | str) -> list[Steer]:
    """Parse several specs (a list, or one string of specs separated by commas or spaces)."""
    if isinstance(texts, str):
        texts = [t for t in re.split(r"[,\s]+", texts) if t]
    return [parse_steer(t) for t in texts]


# --------------------------------------------------------------------------- units
def estimate_units(model, tokenizer, sae, *, n_sentences: int = ESTIMATE_SENTENCES, top: int = 8,
                   seed: int = 11) -> Tensor:
    """A quick typical max activation per latent [d_sae]: the statistic of a features artifact's ``typical_max``
    (the mean of a latent's ``top`` largest per-sentence maxima, over the sentences where it fires), over
    ``n_sentences`` held-out tinyworld sentences (plain English; build a features artifact for a real corpus).
    Latents that never fire get the median unit of the others."""
    from llama_sae import tinyworld
    from llama_sae.tinyworld.recovery import iter_sentence_activations

    texts = [r.text for r in tinyworld.sentences(n_sentences, seed=seed, split="heldout")]
    best = torch.zeros(0, sae.cfg.d_sae)  # [<= top, d_sae] the largest per-sentence maxima so far (0: silent)
    for latents, _ in iter_sentence_activations(model, tokenizer, sae, texts):  # [B, d_sae] one batch at a time
        merged = torch.cat([best, latents])
        best = merged.topk(min(top, len(merged)), dim=0).values
    fired = (best > 0).sum(0)
    return fill_dead_units(best.sum(0) / fired.clamp_min(1))


def fill_dead_units(units: Tensor) -> Tensor:
    """Units [d_sae] with dead latents (unit 0) given the median unit of the live ones (1.0 if none live)."""
    units = units.float().clone()
    live = units > 0
    units[~live] = float(units[live].median()) if live.any() else 1.0
    return units


# --------------------------------------------------------------------------- applying steers
@dataclass
class Steering:
    """Steers on one or more SAEs (keyed by hook point), with each SAE's units [d_sae].

    Construction checks every steer against the loaded SAEs (``UserError`` for a latent out of range
    or a hook without an SAE) and fills in its hook; absurd strengths are kept, with a line in ``warnings``.
    """

    saes: dict[str, object]
    steers: list[Steer]
    units: dict[str, Tensor]
    error_term: bool = True
    sources: dict[str, dict] = field(default_factory=dict)  # per hook: sae path, unit source (for records)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        for hook, sae in self.saes.items():
            if self.units.get(hook) is None or self.units[hook].shape != (sae.cfg.d_sae,):
                raise UserError(f"steering units for {hook} must be a [{sae.cfg.d_sae}] tensor (one per latent)")
        self.steers = [self._check(s) for s in self.steers]
        for hook in self.saes:
            kinds = {s.positions for s in self.steers if s.hook == hook and s.kind == "bias"}
            if len(kinds) > 1:
                raise UserError(f"bias steers on the SAE at {hook} use different positions ({', '.join(kinds)}): "
                                "give them all the same positions")

    def _check(self, s: Steer) -> Steer:
        loaded = ", ".join(self.saes) or "none"
        if isinstance(s.latent, bool) or not isinstance(s.latent, int):  # a Steer built in Python, not parsed
            raise UserError(f"{s!r}: latent {s.latent!r} is not a non-negative integer")
        if s.kind not in KINDS:
            raise UserError(f"{s!r}: kind {s.kind!r} is not one of {', '.join(KINDS)}")
        if isinstance(s.strength, bool) or not isinstance(s.strength, int | float) or not math.isfinite(s.strength):
            raise UserError(f"{s!r}: strength {s.strength!r} is not a finite number")
        check_positions(s.positions, f"{s!r}")
        if s.hook is None:
            if len(self.saes) != 1:
                raise UserError(f"steer {s.spec!r} does not say which SAE: prefix it with the hook point, "
                                f"e.g. {next(iter(self.saes), 'resid_post.2')}@{s.spec} (loaded: {loaded})")
            s = replace(s, hook=next(iter(self.saes)))
        if s.hook not in self.saes:
            raise UserError(f"steer {s.spec!r} is for an SAE at {s.hook}, but none is loaded there (loaded: "
                            f"{loaded}): load it with --sae PATH or change the prefix")
        d_sae = self.saes[s.hook].cfg.d_sae
        if not 0 <= s.latent < d_sae:
            raise UserError(f"steer {s.spec!r}: latent {s.latent} is out of range, the SAE at {s.hook} has "
                            f"latents 0..{d_sae - 1}")
        unit = float(self.units[s.hook][s.latent])
        if not abs(s.strength * unit) <= torch.finfo(torch.float32).max:  # the latents are float32
            raise UserError(f"steer {s.spec!r}: strength {s.strength:g} x the latent's unit {unit:g} is beyond "
                            "float32's range: use a strength within a few units")
        if abs(s.strength) > ABSURD_STRENGTH:
            self.warnings.append(f"steer {s.spec!r}: strength {s.strength:g} is more than {ABSURD_STRENGTH:g}x the "
                                 "latent's typical max activation; expect degenerate text (running anyway)")
        return s

    def value(self, s: Steer) -> float:
        """The steer's strength in the latent's own activation scale."""
        return s.strength * float(self.units[s.hook][s.latent])

    @contextmanager
    def apply(self, model, prompt_len: int | None = None, skip_tokens: Sequence[int] = ()) -> Iterator[object]:
        """Within the block, ``model`` runs with the SAEs spliced in and the steers applied.

        ``prompt_len``: cache slots 0..prompt_len-1 hold the (left-padded) prompts; needed for the
        ``prompt`` and ``generated`` positions. The absolute position of each forward's tokens is read
        from its ``start`` argument (KV-cache decoding), so cached and uncached runs steer the same tokens.
        ``skip_tokens``: token ids never steered (:func:`generate` skips BOS, the attention sink: its huge
        norm makes any edit there, scaled by the token's std, a large one).
        """
        from llama_sae.splice import check_fits

        if prompt_len is None and any(s.positions != "all" for s in self.steers):
            raise UserError("steers on prompt or generated positions need the prompt length: generate with "
                            "llama_sae.steer.generate, or pass prompt_len to Steering.apply")
        for sae in self.saes.values():
            check_fits(model, sae)
        where = _PositionTracker(prompt_len, skip_tokens)
        handle = model.register_forward_pre_hook(where.record, with_kwargs=True)
        try:
            with model.hooked({h: self._hook_fn(h, where) for h in self.saes}):
                yield model
        finally:
            handle.remove()

    def _hook_fn(self, hook: str, where: _PositionTracker):
        """The hook point's replacement: the splice (error term of the unedited input) with this SAE's steers
        as its latent edit, a bias as its ``pre_bias`` (the steered tokens re-encoded with b_enc + bias before
        TopK). With the error term the SAE runs on the steered tokens alone (the splice's ``rows``: the union
        of the steers' positions); without a bias, clamp and add steers decode only the steered latents, and
        steers that are all ``add`` need no encode at all (:func:`_sparse_edits`)."""
        from llama_sae.splice import splice_fn

        sae = self.saes[hook]
        steers = [(s, self.value(s)) for s in self.steers if s.hook == hook]
        steers = [(s, v) for s, v in steers if v != 0 or s.kind == "clamp"]  # a zero add or bias changes nothing
        edits = [(s, v) for s, v in steers if s.kind != "bias"]
        biased = [s for s, _ in steers if s.kind == "bias"]
        bias = torch.zeros(sae.cfg.d_sae, device=sae.b_enc.device)
        for s, v in steers:
            if s.kind == "bias":
                bias[s.latent] += v
        if not bias.any():
            biased = []
        positions = sorted({s.positions for s, _ in edits} | {s.positions for s in biased})
        if not positions:
            return _unchanged
        state: dict[str, object] = {}

        def steered(x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
            """Each position set's mask [B, T] and their union for this forward pass."""
            masks = {p: where.mask(p, x.device) for p in positions}
            union = masks[positions[0]]
            for m in list(masks.values())[1:]:
                union = union | m
            return masks, union

        if self.error_term and not biased:
            return _sparse_edits(sae, edits, steered)

        def edit(h: Tensor) -> Tensor:  # h [m, d_sae] the steered tokens' latents, or [B, T, d_sae] all of them
            for s, v in edits:
                mask = state["masks"][s.positions]
                if s.kind == "clamp":
                    h[mask, s.latent] = v
                else:
                    h[mask, s.latent] += v
            return h

        def pre_bias(x: Tensor) -> tuple[Tensor, Tensor]:
            return bias, state["full"][biased[0].positions]

        fn = splice_fn(sae, error_term=self.error_term, edit=edit if edits else None,
                       pre_bias=pre_bias if biased else None, rows=lambda x: state["union"])

        def replace(x: Tensor) -> Tensor:
            masks, union = steered(x)
            # with the error term the edit sees the steered tokens alone, in the order x[union] lists them;
            # a steer on every one of them indexes with ... (a decoding step: no boolean-mask indexing)
            state.update(full=masks, union=union, masks=_rows_among(masks, union if self.error_term else None))
            return fn(x)

        return replace

    def describe(self) -> list[dict]:
        """Each steer with its unit and absolute value (for records and tables)."""
        return [{"spec": s.spec, "latent": s.latent, "kind": s.kind, "strength": s.strength,
                 "positions": s.positions, "hook": s.hook, "unit": float(self.units[s.hook][s.latent]),
                 "value": self.value(s)} for s in self.steers]


@torch.no_grad()
def biased_latents(sae, x: Tensor, bias: Tensor) -> Tensor:
    """Dense latents [N, d_sae] of x [..., d_in] encoded with ``bias`` [d_sae] added to the pre-activation
    before TopK (the seed's h_bias): a biased latent can enter the top k and evict another. Pass only the
    tokens you want biased: every row of x is encoded (a bias steer encodes its steered tokens alone,
    through the splice's ``pre_bias``)."""
    from llama_sae.sae.model import encode_select, normalize

    x_norm, _, _ = normalize(x.reshape(-1, sae.cfg.d_in), sae.cfg.normalize_activations)
    vals, idx, _, _ = encode_select(x_norm - sae.b_dec, sae.W_enc, sae.b_enc + bias, sae.cfg.k)
    return torch.zeros(vals.shape[0], sae.cfg.d_sae, device=vals.device).scatter_(1, idx, vals)


def _rows_among(masks: dict[str, Tensor], union: Tensor | None) -> dict[str, Tensor | EllipsisType]:
    """Each position set's tokens among the steered ones (``x[union]``'s order; every token when ``union`` is None),
    as a bool mask, or ``...`` when it takes them all (a decoding step: no boolean-mask indexing)."""
    cut = masks if union is None else {p: m[union] for p, m in masks.items()}
    return {p: ... if m.all() else m for p, m in cut.items()}


def _unchanged(x: Tensor) -> Tensor:
    return x


def _sparse_edits(sae, edits: list[tuple[Steer, float]], steered):
    """The hook replacement for clamp and add steers (no bias) with the error term: only the steered latents'
    changes are decoded, never dense [tokens, d_sae] latents (256 KiB per token at 65,536 latents).

    Add steers alone need no encode: x + Σ v·W_dec[latent] at each steer's tokens (times the token's std when the
    SAE normalizes its input), what the splice decodes from latents changed by +v up to the rounding of
    (h + v) − h. With a clamp the steered tokens are encoded, and the numbers are the splice's with the same edit
    on dense latents: the same changes (h' − h per steered latent, 0 when a clamp keeps the value) decoded by
    the same product."""
    from llama_sae.sae.model import normalize
    from llama_sae.splice import add_at_rows, decode_change, pick_rows

    latents = sorted({s.latent for s, _ in edits})
    col = {latent: j for j, latent in enumerate(latents)}
    cols = torch.tensor(latents, device=sae.W_dec.device)
    encode = any(s.kind == "clamp" for s, _ in edits)

    @torch.no_grad()
    def replace(x: Tensor) -> Tensor:
        masks, union = steered(x)
        sel, xs = pick_rows(x, union)  # the steered tokens [m, d_in]
        if not len(xs):
            return x
        x_norm, _, std = normalize(xs, sae.cfg.normalize_activations)
        if not encode:
            change = torch.zeros(len(xs), len(latents), device=x.device)  # [m, latents]
            for s, v in edits:
                mask = masks[s.positions].reshape(-1)
                change[:, col[s.latent]] += (mask if sel is None else mask[sel]) * v
            return add_at_rows(x, sel, decode_change(sae, change, cols, std))
        rows = _rows_among(masks, union)
        vals, idx = sae.select(x_norm - sae.b_dec)  # [m, k]
        now = torch.stack([torch.where(idx == latent, vals, 0).sum(1) for latent in latents], 1)  # [m, latents]
        new = now.clone()
        for s, v in edits:
            if s.kind == "clamp":
                new[rows[s.positions], col[s.latent]] = v
            else:
                new[rows[s.positions], col[s.latent]] += v
        change = new - now
        keep = ((change.amax(0) != 0) | (change.amin(0) != 0)).nonzero().flatten()  # latents some token changed
        if not len(keep):
            return x
        return add_at_rows(x, sel, decode_change(sae, change[:, keep], cols[keep], std))

    return replace


class _PositionTracker:
    """Which tokens of the current forward pass to steer: absolute positions from the model's ``start``
    argument, tokens from its input."""

    def __init__(self, prompt_len: int | None, skip_tokens: Sequence[int]):
        self.prompt_len, self.skip, self.start, self.tokens = prompt_len, list(skip_tokens), 0, None

    def record(self, module, args, kwargs) -> None:
        self.start, self.tokens = kwargs.get("start", 0), args[0] if args else kwargs["tokens"]

    def mask(self, positions: str, device) -> Tensor:
        """[B, T] bool: the tokens a steer on ``positions`` edits."""
        B, T = self.tokens.shape
        pos = torch.arange(self.start, self.start + T, device=device)  # [T]
        if positions == "all":
            keep = torch.ones(T, dtype=torch.bool, device=device)
        else:
            lo, hi = positions_window(positions, self.prompt_len)
            keep = (pos >= lo) if hi is None else (pos >= lo) & (pos < hi)
        keep = keep[None, :].expand(B, T)
        if self.skip:
            keep = keep & ~torch.isin(self.tokens.to(device), torch.tensor(self.skip, device=device))
        return keep


# --------------------------------------------------------------------------- generation and records
def generate(model, tokenizer, prompts, steering: Steering | None, *, chat: bool = False, stream: bool = False,
             **kwargs):
    """:func:`llama_sae.llama.generate` with ``steering`` applied (None: plain generation)."""
    from llama_sae.llama import generate as plain_generate
    from llama_sae.llama.generate import _encode_prompts

    ids = _encode_prompts(tokenizer, prompts, chat, kwargs.pop("bos", True))
    if steering is None:
        return plain_generate(model, tokenizer, ids, stream=stream, **kwargs)
    prompt_len = max(len(p) for p in ids)
    if stream:
        return _stream_steered(model, tokenizer, ids, steering, prompt_len, kwargs)
    with steering.apply(model, prompt_len, [tokenizer.bos_id]):
        return plain_generate(model, tokenizer, ids, **kwargs)


def _stream_steered(model, tokenizer, ids, steering, prompt_len, kwargs):
    """The steered stream: the hooks are on the model only while the stream computes its next chunk, so the
    model runs unsteered between chunks (the KV cache is the generation's own, see ``Transformer.new_cache``)."""
    from llama_sae.llama import generate as plain_generate

    chunks = plain_generate(model, tokenizer, ids, stream=True, **kwargs)
    while True:
        with steering.apply(model, prompt_len, [tokenizer.bos_id]):
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def record(steering: Steering | None, model_path: str, prompts, outputs: Sequence[str], sampling: dict,
           *, chat: bool = False, model=None) -> dict:
    """A JSON-able record of one generation: everything needed to run it again (see :func:`replay`); ``model``
    (the loaded one) adds the device and dtype it ran on, which sampled outputs depend on."""
    from llama_sae import __version__
    from llama_sae.features import sae_fingerprint

    outputs = list(outputs)
    other = next((o for o in outputs if not isinstance(o, str)), None)
    if other is not None:
        raise TypeError(f"record takes the generated texts, not {type(other).__name__}: pass [o.text for o in outputs]")
    saes = {}
    if steering is not None:
        for hook, sae in steering.saes.items():
            saes[hook] = {"fingerprint": sae_fingerprint(sae), "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
                          **steering.sources.get(hook, {})}  # path, and where the units came from
    return {"llama_sae": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "model": str(model_path), "chat": chat, "sampling": sampling, "saes": saes,
            "steers": [] if steering is None else steering.describe(),
            "error_term": True if steering is None else steering.error_term,
            "prompts": list(prompts), "outputs": list(outputs),
            **({} if model is None else {"device": str(model.device),
                                         "dtype": str(model.dtype).removeprefix("torch.")})}


# --------------------------------------------------------------------------- loading (CLI and UI)
BUNDLED_FEATURES = "features"  # SAE_DIR/features: a features artifact kept with its SAE (the shipped SAE's is)


def load_saes(model, paths: Sequence[str | Path]) -> tuple[dict[str, object], dict[str, dict]]:
    """SAEs by hook point, checked against the model, and their sources ({hook: {"path": ...}})."""
    from llama_sae.sae import load
    from llama_sae.splice import check_fits

    saes, sources = {}, {}
    for path in paths:
        sae = load(path, device=model.device)  # any format sae.load reads, hf:// included
        hook = check_fits(model, sae)
        if hook in saes:
            raise UserError(f"two SAEs read {hook} ({sources[hook]['path']} and {path}): load one per hook point")
        saes[hook] = sae
        sources[hook] = {"path": str(Path(path).resolve()) if Path(path).exists() else str(path)}
    return saes, sources


def match_features(paths: Sequence[str | Path], saes: dict[str, object],
                   sources: dict[str, dict] | None = None, notes: list[str] | None = None) -> dict[str, object]:
    """Features artifacts by the hook of the loaded SAE each was built from (UserError if one matches none).

    With ``sources`` ({hook: {"path": SAE path}}, from :func:`load_saes`), an SAE that no path matched gets the
    artifact in its own directory's ``features/`` (as the shipped SAE keeps its own), if built from that SAE;
    ``notes`` (a list, if given) gets a line for each such artifact passed over, and why."""
    from llama_sae.features import META_FILE, load_features, sae_fingerprint
    from llama_sae.sae.formats import find

    prints = {sae_fingerprint(sae): hook for hook, sae in saes.items()}
    out = {}
    for path in paths:
        f = load_features(path)
        if f.sae_fingerprint not in prints:
            raise UserError(f"the features artifact {path} was built from an SAE that is not loaded (fingerprint "
                            f"{f.sae_fingerprint}): load that SAE with --sae, or rebuild the artifact")
        out[prints[f.sae_fingerprint]] = f
    for hook, sae in saes.items():
        given = (sources or {}).get(hook, {}).get("path")
        if hook in out or not given:
            continue
        found = find(given)  # the SAE's directory, whether given as it, a file of it, or hf:// (the download)
        bundled = found.path / BUNDLED_FEATURES
        if found.format == "seed" or not (bundled / META_FILE).is_file():
            continue
        try:
            f = load_features(bundled)
        except UserError as e:  # unfinished or damaged: the caller estimates units instead
            if notes is not None:
                notes.append(f"{bundled} is not used for {hook}: {e}")
            continue
        if f.sae_fingerprint == sae_fingerprint(sae):  # not an artifact of an older version of these weights
            out[hook] = f
        elif notes is not None:
            notes.append(f"{bundled} is not used for {hook}: it was built from other weights than the SAE's "
                         "(rebuild it with llama-sae features)")
    return out


def build_steering(model, tokenizer, saes: dict[str, object], steers: Sequence[Steer], *,
                   sources: dict[str, dict] | None = None, features: dict[str, object] | None = None,
                   estimate_sentences: int = ESTIMATE_SENTENCES,
                   on_estimate: Callable[[list[str]], None] | None = None) -> Steering:
    """A :class:`Steering` whose units come from each SAE's features artifact, or a quick estimate.
    ``features`` None: the artifact in each SAE's directory, where there is one (:func:`match_features`).
    ``on_estimate``: called with the hooks to estimate, once the steers have passed their checks (a note that
    the estimate takes a while should not come before an error about a steer)."""
    if features is None:
        features = match_features([], saes, sources)
    sources = {h: dict((sources or {}).get(h, {})) for h in saes}
    Steering(saes, list(steers), {h: torch.ones(sae.cfg.d_sae) for h, sae in saes.items()})  # bad specs fail first
    missing = [h for h in saes if (features or {}).get(h) is None]
    if missing and on_estimate is not None:
        on_estimate(missing)
    units = {}
    for hook, sae in saes.items():
        f = (features or {}).get(hook)
        if f is not None:
            units[hook] = fill_dead_units(torch.as_tensor(f.typical_max))
            sources[hook]["units"] = f"features:{Path(f.path).resolve()}"
        else:
            units[hook] = estimate_units(model, tokenizer, sae, n_sentences=estimate_sentences)
            sources[hook]["units"] = f"estimate:{estimate_sentences} tinyworld sentences"
    return Steering(saes, list(steers), units, sources=sources)


RECORD_KEYS = ("model", "saes", "steers", "error_term", "prompts", "outputs", "chat", "sampling")
SAMPLING_TYPES = {"max_new_tokens": int, "temperature": int | float, "top_p": int | float, "seed": int | None}


def _check_record(rec: dict) -> None:
    """UserError naming the first field of a record that is not what :func:`record` writes (a hand edit)."""
    def strings(x):
        return isinstance(x, list) and all(isinstance(s, str) for s in x)

    sampling = rec["sampling"]
    checks = [("model", isinstance(rec["model"], str)), ("chat", isinstance(rec["chat"], bool)),
              ("error_term", isinstance(rec["error_term"], bool)),
              ("outputs", strings(rec["outputs"])),
              ("prompts", bool(rec["prompts"]) and (strings(rec["prompts"]) or isinstance(rec["prompts"], list)
                                                     and rec["chat"])),
              ("saes", isinstance(rec["saes"], dict) and all(
                  isinstance(v, dict) and isinstance(v.get("path"), str) and isinstance(v.get("fingerprint"), str)
                  for v in rec["saes"].values())),
              ("steers", isinstance(rec["steers"], list) and all(
                  isinstance(d, dict) and isinstance(d.get("spec"), str) and isinstance(d.get("unit"), int | float)
                  for d in rec["steers"])),
              ("sampling", isinstance(sampling, dict) and set(sampling) <= set(SAMPLING_TYPES) and all(
                  isinstance(v, SAMPLING_TYPES[k]) and not isinstance(v, bool) for k, v in sampling.items())
               and math.isfinite(sampling.get("temperature", 0)) and sampling.get("temperature", 0) >= 0
               and 0 <= sampling.get("top_p", 1) <= 1 and sampling.get("max_new_tokens", 0) >= 0  # what the CLI takes
               and -(2**63) <= (sampling.get("seed") or 0) < 2**63)]
    bad = next((name for name, ok in checks if not ok), None)
    if bad is not None:
        raise UserError(f"the record's {bad!r} is not what llama-sae writes there (edited or damaged): make a new "
                        "record")
    if rec["steers"] and not rec["saes"]:
        raise UserError("the record has steers but no SAEs (edited or damaged): make a new record")


def replay(rec: dict, *, device: str = "cpu", dtype: str | None = None) -> list[str]:
    """Run a recorded generation again (same model, SAEs, steers, units and sampling); its outputs. Sampled
    outputs repeat on the device and dtype they were made with (a CUDA generator draws other numbers): the
    dtype defaults to the record's."""
    from llama_sae.features import sae_fingerprint
    from llama_sae.llama import load_model, load_tokenizer

    if not isinstance(rec, dict):
        raise UserError(f"the record is a JSON {type(rec).__name__}, not an object: it was not written by llama-sae "
                        "generate or chat")
    missing = [key for key in RECORD_KEYS if key not in rec]
    if missing:
        raise UserError(f"the record lacks {', '.join(missing)}: it was not written by llama-sae generate or chat "
                        "(or was edited); make a new one")
    _check_record(rec)
    dtype = dtype or rec.get("dtype")
    model, tok = load_model(rec["model"], dtype=dtype, device=device), load_tokenizer(rec["model"])
    steering = None
    if rec["saes"]:
        saes, sources = load_saes(model, [info["path"] for info in rec["saes"].values()])
        for hook, info in rec["saes"].items():
            if sae_fingerprint(saes[hook]) != info["fingerprint"]:
                raise UserError(f"the SAE at {info['path']} changed since the record was made (fingerprint "
                                f"{sae_fingerprint(saes[hook])}, recorded {info['fingerprint']})")
        units = {h: torch.ones(sae.cfg.d_sae) for h, sae in saes.items()}
        steers = [replace(parse_steer(d["spec"]), hook=d.get("hook")) for d in rec["steers"]]
        # the recorded strength, not the spec's text (earlier records wrote it rounded to 6 digits)
        steers = [replace(s, strength=float(d["strength"])) if isinstance(d.get("strength"), int | float) else s
                  for s, d in zip(steers, rec["steers"])]
        steering = Steering(saes, steers, units, rec["error_term"], sources=sources)  # checks hooks and latents
        for s, d in zip(steering.steers, rec["steers"]):
            units[s.hook][s.latent] = d["unit"]
    outs = generate(model, tok, rec["prompts"], steering, chat=rec["chat"], **rec["sampling"])
    return [o.text for o in outs]
