"""Batched, streaming text generation with a KV cache.

Prompts of different lengths are left-padded: each row gets RoPE positions that start at 0 at its
first real token, and an attention mask that hides its padding. Decoding is split into small steps
(``sample``, ``prefill``, ``decode_one``), as in gpt-fast's generate.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llama_sae.errors import UserError
from llama_sae.llama.model import KVCache, Transformer


@dataclass
class Completion:
    """One generated continuation: its new tokens, their text, and why it stopped."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # "stop" (a stop token) or "length" (max_new_tokens)


@dataclass
class StreamChunk:
    """A piece of streamed output: row ``index`` produced ``token`` and the new complete ``text``."""

    index: int
    token: int
    text: str


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    z = logits.float()  # upcast: bf16 softmax loses mass
    probs = torch.softmax((z - z.amax(-1, keepdim=True)) / temperature, dim=-1)  # max first: a tiny temperature
    order = None  # gives -inf, not inf - inf = NaN
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        outside = probs.cumsum(dim=-1) - probs > top_p  # keep the first token always
        probs = probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
    return (choice if order is None else order.gather(-1, choice)).squeeze(-1)


class _Batch:
    """Left-padded prompts: tokens [B, T], pad counts [B], and the masks and positions they imply."""

    def __init__(self, prompts: Sequence[Sequence[int]], pad_id: int, max_len: int, device):
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        self.pad = torch.tensor([T - n for n in lengths], device=device)  # [B]
        self.tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.tokens[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        self.padded = bool(self.pad.any())
        idx = torch.arange(max_len, device=device)
        self.key_valid = idx[None, :] >= self.pad[:, None]  # [B, max_len]

    def positions(self, start: int, end: int) -> Tensor:
        """RoPE positions [B, end - start] of cache slots start..end."""
        return (torch.arange(start, end, device=self.pad.device)[None, :] - self.pad[:, None]).clamp(min=0)

    def mask(self, start: int, end: int) -> Tensor | None:
        """Attention mask [B, 1, end - start, end] for queries start..end over keys 0..end (None: causal)."""
        if not self.padded:
            return None
        q = torch.arange(start, end, device=self.pad.device)[:, None]  # [T, 1]
        k = torch.arange(end, device=self.pad.device)[None, :]  # [1, S]
        causal = (k <= q)[None]  # [1, T, S]
        m = causal & self.key_valid[:, None, :end]  # [B, T, S]
        m = m | (k == q)[None]  # padding attends to itself, so no row is empty (empty rows give NaN)
        return m[:, None]  # [B, 1, T, S]


def prefill(model: Transformer, batch: _Batch, cache: list[KVCache]) -> Tensor:
    """Run the prompts through the model (filling the cache); logits of each row's last token [B, V]."""
    T = batch.tokens.shape[1]
    logits = model(batch.tokens, start=0, positions=batch.positions(0, T), mask=batch.mask(0, T), last_only=True,
                   cache=cache)
    return logits[:, -1]


def decode_one(model: Transformer, batch: _Batch, token: Tensor, pos: int, cache: list[KVCache]) -> Tensor:
    """Feed one token per row at cache slot ``pos``; logits of the next token [B, V]."""
    logits = model(token[:, None], start=pos, positions=batch.positions(pos, pos + 1),
                   mask=batch.mask(pos, pos + 1), cache=cache)
    return logits[:, -1]


def _forward_all(model: Transformer, batch: _Batch, seq: Tensor) -> Tensor:
    """Without a cache: the whole sequence [B, S] again; logits of the last position [B, V]."""
    S = seq.shape[1]
    return model(seq, positions=batch.positions(0, S), mask=batch.mask(0, S), last_only=True)[:, -1]


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (next tokens [B], still-running mask [B]) once per step until every row stops.

    A row that emitted a stop token keeps yielding ``pad_id`` with running = False.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token (did you encode an empty string without BOS?)")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens is {max_new_tokens}: ask for 0 or more new tokens")
    vocab = model.args.vocab_size
    bad = next((t for p in prompts for t in p if not 0 <= t < vocab), None)
    if bad is not None:
        raise UserError(f"token id {bad} is outside this model's vocabulary 0..{vocab - 1}: the prompt was encoded "
                        "with another tokenizer")
    T = max(len(p) for p in prompts)
    total = max(T, T + max_new_tokens - 1)  # positions the model reads: the last new token is never fed back
    if total > model.args.max_seq_len:
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"context of {model.args.max_seq_len} by {total - model.args.max_seq_len}: shorten the "
                        "prompt or ask for fewer tokens")
    device = model.device
    batch = _Batch(prompts, pad_id, total, device)
    generator = None
    if seed is not None:  # one stream for the batch: copies of a prompt in it sample different texts
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    running = torch.ones(len(prompts), dtype=torch.bool, device=device)
    cache = model.new_cache(len(prompts), total) if use_cache else None  # this generation's own
    seq = batch.tokens
    logits = prefill(model, batch, cache) if use_cache else _forward_all(model, batch, seq)
    for step in range(max_new_tokens):
        if (running & ~torch.isfinite(logits).all(-1)).any():  # one sync, as running.any() below
            raise UserError(f"the model's next-token scores are not finite (NaN or infinity) at new token {step + 1}: "
                            f"a steer too strong for the model's {str(model.dtype).removeprefix('torch.')} (lower "
                            "its strength), or a damaged checkpoint")
        token = sample(logits, temperature, top_p, generator)
        token = torch.where(running, token, torch.full_like(token, pad_id))
        yield token, running.clone()
        running &= ~torch.isin(token, stops)
        if not running.any() or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = decode_one(model, batch, token, T + step, cache)
        else:
            seq = torch.cat([seq, token[:, None]], dim=1)
            logits = _forward_all(model, batch, seq)


def _encode_prompts(tokenizer, prompts, chat: bool, bos: bool) -> list[list[int]]:
    if isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if chat:
            out.append(tokenizer.encode_chat(p))
        elif isinstance(p, str):
            out.append(tokenizer.encode(p, bos=bos))
        else:
            out.append(list(p))
    return out


def generate(
    model: Transformer,
    tokenizer,
    prompts,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: set[int] | None = None,
    chat: bool = False,
    bos: bool = True,
    use_cache: bool = True,
    stream: bool = False,
) -> list[Completion] | Iterator[StreamChunk]:
    """Complete text prompts, or chat dialogues with ``chat=True``.

    Args:
        prompts: a string, a list of strings, a list of token-id lists, or (chat) a list of messages
            ``[{"role", "content"}]`` or a list of such dialogues.
        temperature, top_p, seed: sampling (temperature 0 = greedy; a seed makes a batch's sampling repeatable,
            cached or not: one random stream serves the batch, so copies of a prompt sample different texts
            and a prompt's text depends on the prompts beside it, as in transformers).
        stop_ids: token ids that end a row (default None: the tokenizer's stop tokens; an empty set: none).
        stream: yield StreamChunk pieces as they are produced instead of returning Completions.

    Returns:
        One Completion per prompt (the text excludes the stop token), or an iterator of StreamChunk.
    """
    ids = _encode_prompts(tokenizer, prompts, chat, bos)
    kwargs = dict(max_new_tokens=max_new_tokens, stop_ids=set(tokenizer.stop_ids if stop_ids is None else stop_ids),
                  pad_id=tokenizer.pad_id, temperature=temperature, top_p=top_p, seed=seed,
                  use_cache=use_cache)
    if stream:
        return _stream(model, tokenizer, ids, kwargs)
    completions = [Completion(prompt_tokens=p) for p in ids]
    for token, running in generate_tokens(model, ids, **kwargs):
        tokens = token.tolist()  # one device-to-host copy per step (not one per row: each is a GPU sync)
        for i in running.nonzero().flatten().tolist():
            t = tokens[i]
            if t in kwargs["stop_ids"]:
                completions[i].stop_reason = "stop"
            else:
                completions[i].tokens.append(t)
    for c in completions:
        c.text = tokenizer.decode(c.tokens)
    return completions


def _stream(model, tokenizer, ids, kwargs) -> Iterator[StreamChunk]:
    decoders = [tokenizer.stream_decoder() for _ in ids]
    for token, running in generate_tokens(model, ids, **kwargs):
        tokens = token.tolist()
        for i in running.nonzero().flatten().tolist():
            t = tokens[i]
            if t in kwargs["stop_ids"]:
                yield StreamChunk(i, t, decoders[i].flush())
            else:
                yield StreamChunk(i, t, decoders[i].feed(t))
    for i, d in enumerate(decoders):
        rest = d.flush()
        if rest:
            yield StreamChunk(i, -1, rest)
