"""Llama 3 tokenizers: Meta's tiktoken BPE and Hugging Face ``tokenizer.json``, behind one interface.

Both backends offer ``encode`` / ``decode``, the Llama 3 chat prompt (``encode_chat``), the special
token ids, and a UTF-8-safe streaming decoder. ``load_tokenizer`` picks the backend from a path.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llama_sae.errors import UserError, first_line
from llama_sae.fileio import atomic_write, atomic_write_json

# Meta's Llama 3 pre-tokenizer split regex.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tiktoken can panic on inputs longer than this, so Meta encodes text in slices of at most this many chars.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000

# tiktoken is very slow on long runs of whitespace or non-whitespace (openai/tiktoken#195), so Meta cuts
# such runs into pieces of at most this many chars before encoding.
MAX_RUN_CHARS = 25_000

NUM_SPECIAL_TOKENS = 256

# encode_prefix encodes a long text's first max(PREFIX_MIN_CHARS, PREFIX_CHARS_PER_TOKEN * max_tokens) chars
# (English averages ~4 chars per token), then prefixes twice as long until the first tokens stop changing.
PREFIX_MIN_CHARS = 4096
PREFIX_CHARS_PER_TOKEN = 16

# Llama 3 special tokens, in id order after the base vocabulary (ids 128000.. for the 128,000-token BPE).
# The rest of the 256 slots are <|reserved_special_token_3|> onwards (see _llama3_special_token_names).
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",  # 128000: BOS, starts every sequence
    "<|end_of_text|>",  # 128001: EOS of base-model text
    "<|reserved_special_token_0|>",  # 128002
    "<|reserved_special_token_1|>",  # 128003
    "<|finetune_right_pad_id|>",  # 128004: padding
    "<|reserved_special_token_2|>",  # 128005
    "<|start_header_id|>",  # 128006: opens a chat role header
    "<|end_header_id|>",  # 128007: closes a chat role header
    "<|eom_id|>",  # 128008: end of message (the model expects a tool result next)
    "<|eot_id|>",  # 128009: end of turn
    "<|python_tag|>",  # 128010: starts a code-interpreter tool call
)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"

# Chat roles whose header text differs from the role name (as in Meta's ChatFormat).
_HEADER_ROLE = {"tool": "ipython"}

_RUN_RE = re.compile(r"\s+|\S+")


def _llama3_special_token_names() -> list[str]:
    """Return the 256 Llama 3 special token names in id order."""
    named = list(LLAMA3_NAMED_SPECIAL_TOKENS)
    first_reserved = 3
    reserved = [
        f"<|reserved_special_token_{first_reserved + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(named))
    ]
    return named + reserved


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> list[str]:
    """Cut ``text`` so no piece holds more than ``max_run`` consecutive whitespace or non-whitespace chars.

    Cuts fall every ``max_run`` chars inside each over-long run, exactly where Meta's
    ``Tokenizer._split_whitespaces_or_nonwhitespaces`` puts them (``\\s`` and ``str.isspace`` agree).
    """
    pieces = []
    start = 0
    for run in _RUN_RE.finditer(text):
        for cut in range(run.start() + max_run, run.end(), max_run):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


def _validate_message(message: object) -> tuple[str, str]:
    """Return ``(role, content)`` of a chat message, or raise UserError if it is malformed."""
    if not isinstance(message, Mapping):
        raise UserError(f"chat message {message!r} is not a dict: pass {{'role': ..., 'content': ...}} dicts")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role or not isinstance(content, str):
        raise UserError(
            f"chat message {dict(message)!r} needs a non-empty string 'role' and a string 'content': "
            "fix the message"
        )
    return role, content


def without_lone_surrogates(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate (valid in a Python str, e.g. from JSON's "\\ud800", but not
    UTF-8) replaced by U+FFFD, as tiktoken does before encoding; Hugging Face tokenizers would raise."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class StreamDecoder(ABC):
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    ``feed`` returns only text that is complete; ``flush`` returns whatever is held back. The joined
    pieces from all ``feed`` calls plus ``flush()`` equal ``tokenizer.decode(all_ids)``.
    """

    @abstractmethod
    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one token id or several, and return the newly completed text (possibly empty)."""

    @abstractmethod
    def flush(self) -> str:
        """Return the held-back tail (undecodable bytes become U+FFFD, as in ``decode``) and reset."""


def _as_id_list(ids: int | Iterable[int]) -> list[int]:
    """Return ``ids`` as a list, wrapping a single id."""
    return [ids] if isinstance(ids, int) else list(ids)


class ByteStreamDecoder(StreamDecoder):
    """Stream decoder for tokenizers that know each token's bytes (the tiktoken backend)."""

    def __init__(self, token_bytes: Callable[[int], bytes]):
        """Wrap ``token_bytes``, which maps a token id to its raw UTF-8 bytes."""
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add token ids and return the text of every UTF-8 character now complete."""
        data = b"".join(self._token_bytes(i) for i in _as_id_list(ids))
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Return the held-back incomplete bytes as U+FFFD (what ``decode`` shows) and reset."""
        return self._utf8.decode(b"", final=True)


class TextStreamDecoder(StreamDecoder):
    """Stream decoder that diffs decoded text (for Hugging Face tokenizers).

    Decodes a short window of recent ids, and emits the new text once it does not end in U+FFFD
    (a character whose bytes have not all arrived yet).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        """Wrap ``decode``, which maps a list of ids to text."""
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_start = 0  # window start: text before it has been emitted
        self._read_start = 0  # ids before this have been emitted

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add token ids and return newly completed text, holding back a trailing U+FFFD."""
        self._ids.extend(_as_id_list(ids))
        new = self._pending_text()
        if not new or new.endswith("\ufffd"):
            return ""
        self._prefix_start, self._read_start = self._read_start, len(self._ids)
        return new

    def flush(self) -> str:
        """Return all text not yet emitted and reset."""
        rest = self._pending_text()
        self._ids, self._prefix_start, self._read_start = [], 0, 0
        return rest

    def _pending_text(self) -> str:
        """Return the text of ids after the last emission, decoded with a little left context."""
        done = self._decode(self._ids[self._prefix_start : self._read_start])
        window = self._decode(self._ids[self._prefix_start :])
        return window[len(done) :]


class LlamaTokenizer(ABC):
    """The interface shared by both backends; also builds Llama 3 chat prompts."""

    @property
    @abstractmethod
    def bos_id(self) -> int:
        """Id of ``<|begin_of_text|>``."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """Id of ``<|end_of_text|>``."""

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """Id of ``<|eot_id|>`` (the end-of-turn token; ``eos_id`` if the vocabulary has none)."""

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """Id of ``<|finetune_right_pad_id|>`` if present, else ``eos_id``."""

    @property
    @abstractmethod
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: end_of_text, eom and eot, where the vocabulary has them."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token text to id."""

    @abstractmethod
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text``; special-token text in it is encoded as ordinary text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode a whole sequence of ids (special tokens shown as their text)."""

    @abstractmethod
    def stream_decoder(self) -> StreamDecoder:
        """Return a fresh UTF-8-safe streaming decoder for this tokenizer."""

    def encode_prefix(self, text: str, max_tokens: int, bos: bool = True) -> list[int]:
        """``encode(text, bos)[:max_tokens]`` without encoding the whole of a very long text.

        A text of up to a few thousand chars is encoded whole. A longer one is encoded by prefixes, each
        twice as long as the last, until two in a row agree on the first ``max_tokens`` tokens: only the
        pieces near a cut can change with it, so a single 10 MB line costs milliseconds instead of seconds
        and gigabytes.
        """
        window = max(PREFIX_MIN_CHARS, PREFIX_CHARS_PER_TOKEN * max_tokens)
        ids = self.encode(text[:window], bos)[:max_tokens]
        while window < len(text):
            window *= 2
            longer = self.encode(text[:window], bos)[:max_tokens]
            if longer == ids and len(ids) == max_tokens:
                break
            ids = longer
        return ids

    def encode_chat(self, messages: Iterable[Mapping[str, str]]) -> list[int]:
        """Encode a dialogue as a Llama 3 chat prompt ending in an open assistant header.

        Matches Meta's ``ChatFormat.encode_dialog_prompt`` token for token for plain-text messages:
        ``<|begin_of_text|>``, then per message the role header, the content (not stripped) and
        ``<|eot_id|>``, then ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
        The role ``tool`` is written as ``ipython``, as Meta does.
        """
        ids = [self.bos_id]
        for message in messages:
            role, content = _validate_message(message)
            ids += self._encode_header(role)
            ids += self.encode(content, bos=False)
            ids.append(self.eot_id)
        ids += self._encode_header("assistant")
        return ids

    def _encode_header(self, role: str) -> list[int]:
        """Encode ``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` as Meta does (three encodes)."""
        start, end = self._special_id(START_HEADER), self._special_id(END_HEADER)
        role_ids = self.encode(_HEADER_ROLE.get(role, role), bos=False)
        return [start, *role_ids, end, *self.encode("\n\n", bos=False)]

    def _special_id(self, name: str) -> int:
        """Return the id of special token ``name``, or raise UserError if the vocabulary lacks it."""
        token_id = self.special_tokens.get(name)
        if token_id is None:
            raise UserError(f"tokenizer has no {name} token: use a Llama 3 tokenizer for chat prompts")
        return token_id

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """Add BOS in front and/or EOS at the end of ``ids``."""
        return [self.bos_id] * bos + ids + [self.eos_id] * eos


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Load a base64 tiktoken BPE ranks file, or raise UserError if ``path`` is not one."""
    not_tiktoken = UserError(
        f"{path} is not a Llama 3 tiktoken file (Llama 2 sentencepiece tokenizers are not supported): "
        "pass the tokenizer.model of a Llama 3 checkpoint"
    )
    try:
        data = path.read_bytes()
        data.decode("ascii")
    except UnicodeDecodeError:
        raise not_tiktoken from None
    except OSError as e:
        reason = e.strerror or e
        raise UserError(f"cannot read {path} ({reason}): check the path and its permissions") from None
    # tiktoken caches files by path; pinning the hash makes a changed file at the same path reload.
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
    except ValueError:
        raise not_tiktoken from None
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise not_tiktoken
    return ranks


class TiktokenLlama3Tokenizer(LlamaTokenizer):
    """Meta's Llama 3 tokenizer: a tiktoken BPE read from ``tokenizer.model`` plus 256 special tokens."""

    def __init__(self, model_path: str | Path):
        """Load the BPE ranks from ``model_path`` (a Llama 3 ``tokenizer.model``)."""
        path = Path(model_path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist: pass a Llama 3 tokenizer.model")
        ranks = _read_tiktoken_ranks(path)
        num_base = len(ranks)
        self._special = {name: num_base + i for i, name in enumerate(_llama3_special_token_names())}
        self._model = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self._special
        )
        self._vocab_size = num_base + len(self._special)

    @property
    def bos_id(self) -> int:
        """Id of ``<|begin_of_text|>`` (128000)."""
        return self._special[BOS]

    @property
    def eos_id(self) -> int:
        """Id of ``<|end_of_text|>`` (128001)."""
        return self._special[EOS]

    @property
    def eot_id(self) -> int:
        """Id of ``<|eot_id|>`` (128009)."""
        return self._special[EOT]

    @property
    def pad_id(self) -> int:
        """Id of ``<|finetune_right_pad_id|>`` (128004)."""
        return self._special[PAD]

    @property
    def stop_ids(self) -> frozenset[int]:
        """``{<|end_of_text|>, <|eom_id|>, <|eot_id|>}`` = {128001, 128008, 128009}."""
        return frozenset(self._special[name] for name in (EOS, EOM, EOT))

    @property
    def vocab_size(self) -> int:
        """Base BPE tokens plus 256 special tokens (128,256 for Llama 3)."""
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """All 256 special tokens, text to id."""
        return dict(self._special)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` exactly as Meta's ``Tokenizer.encode`` with its default special-token handling."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]):
                ids += self._model.encode_ordinary(piece)
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids; invalid UTF-8 becomes U+FFFD."""
        return self._model.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Return the raw bytes of ``ids``."""
        return self._model.decode_bytes(list(ids))

    def stream_decoder(self) -> StreamDecoder:
        """Return a byte-exact streaming decoder."""
        return ByteStreamDecoder(self._model.decode_single_token_bytes)


# Fallback names for tokenizers that are not Llama 3 (looked up after the Llama 3 name).
_BOS_NAMES = (BOS, "<s>", "<bos>")
_EOS_NAMES = (EOS, "</s>", "<eos>", "<|endoftext|>")


class HFTokenizer(LlamaTokenizer):
    """Any Hugging Face ``tokenizer.json``, with Llama 3 special tokens looked up by name."""

    def __init__(self, tokenizer_json_path: str | Path):
        """Load ``tokenizer_json_path`` with the ``tokenizers`` library."""
        from tokenizers import Tokenizer

        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist: pass a Hugging Face tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise UserError(
                f"{path} is not a valid Hugging Face tokenizer.json ({first_line(e)}): "
                "pass a checkpoint's tokenizer.json"
            ) from None
        # Treat special-token text inside input as ordinary text, like the tiktoken backend.
        self._tok.encode_special_tokens = True
        self._special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._bos = self._first_id(_BOS_NAMES, "BOS")
        self._eos = self._first_id(_EOS_NAMES, "EOS")

    def _first_id(self, names: Sequence[str], what: str) -> int:
        """Return the id of the first of ``names`` in the vocabulary, or raise UserError."""
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise UserError(
            f"tokenizer.json has no {what} token (looked for {', '.join(names)}): use a Llama 3 tokenizer"
        )

    def _optional_id(self, name: str) -> int | None:
        """Return the id of token ``name``, or None if absent."""
        return self._tok.token_to_id(name)

    @property
    def bos_id(self) -> int:
        """Id of ``<|begin_of_text|>`` (or ``<s>`` / ``<bos>`` for non-Llama-3 vocabularies)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """Id of ``<|end_of_text|>`` (or a common EOS name for non-Llama-3 vocabularies)."""
        return self._eos

    @property
    def eot_id(self) -> int:
        """Id of ``<|eot_id|>``, or ``eos_id`` if absent."""
        eot = self._optional_id(EOT)
        return self._eos if eot is None else eot

    @property
    def pad_id(self) -> int:
        """Id of ``<|finetune_right_pad_id|>``, or ``eos_id`` if absent."""
        pad = self._optional_id(PAD)
        return self._eos if pad is None else pad

    @property
    def stop_ids(self) -> frozenset[int]:
        """The EOS id plus ``<|eom_id|>`` and ``<|eot_id|>`` where present."""
        ids = {self._eos, self._optional_id(EOM), self._optional_id(EOT)}
        return frozenset(i for i in ids if i is not None)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Added tokens marked special, text to id."""
        return dict(self._special)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` without the post-processor's tokens; BOS/EOS are added here only."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._tok.encode(without_lone_surrogates(text), add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids, keeping special tokens as text."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def stream_decoder(self) -> StreamDecoder:
        """Return a streaming decoder that diffs decoded text."""
        return TextStreamDecoder(self.decode)


def _tokenizer_from_dir(directory: Path) -> LlamaTokenizer:
    """Pick ``tokenizer.json``, else ``tokenizer.model`` (also under ``original/``) in ``directory``."""
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory / "tokenizer.json")
    for candidate in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
        if candidate.is_file():
            return TiktokenLlama3Tokenizer(candidate)
    raise UserError(
        f"no tokenizer.json or tokenizer.model in {directory}: pass a Llama 3 checkpoint directory"
    )


def _check_fits_checkpoint(tok: LlamaTokenizer, directory: Path) -> None:
    """A checkpoint directory's tokenizer must not make ids past its model's vocabulary (they would fail deep
    in the embedding lookup of whichever stage runs first)."""
    if not ((directory / "config.json").is_file() or (directory / "params.json").is_file()):
        return  # a tokenizer directory alone: nothing to check against
    from llama_sae.llama.checkpoint import read_args

    vocab = read_args(directory)[1].vocab_size
    if tok.vocab_size > vocab:
        raise UserError(f"the tokenizer in {directory} has {tok.vocab_size:,} tokens but the model's vocabulary is "
                        f"{vocab:,}: the tokenizer belongs to another model; put the model's own tokenizer "
                        "(tokenizer.json or tokenizer.model) in the checkpoint directory")


def load_tokenizer(path: str | Path) -> LlamaTokenizer:
    """Load a tokenizer from a checkpoint directory, a ``tokenizer.json`` or a ``tokenizer.model``.

    A directory uses ``tokenizer.json`` (Hugging Face) if present, else ``tokenizer.model`` (tiktoken).
    A file ending in ``.json`` is read as Hugging Face, any other file as a Llama 3 tiktoken file.
    Raises UserError naming the problem and the fix.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        tok = _tokenizer_from_dir(p)
        _check_fits_checkpoint(tok, p)
        return tok
    if not p.exists():
        raise UserError(
            f"tokenizer path {p} does not exist: pass a Llama 3 checkpoint directory, tokenizer.json "
            "or tokenizer.model"
        )
    if p.suffix.lower() == ".json":
        return HFTokenizer(p)
    return TiktokenLlama3Tokenizer(p)


__all__ = [
    "LLAMA3_PAT_STR",
    "ByteStreamDecoder",
    "HFTokenizer",
    "LlamaTokenizer",
    "StreamDecoder",
    "TextStreamDecoder",
    "TiktokenLlama3Tokenizer",
    "load_tokenizer",
    "split_long_runs",
]


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def write_hf_tokenizer_json(model_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a Llama 3 ``tokenizer.model`` to ``tokenizer.json`` + ``tokenizer_config.json`` in out_dir.

    Uses transformers' TikTokenConverter (the ``hf`` extra); the result encodes exactly as the
    tiktoken file does, with BOS added by its post-processor as in Meta's published HF checkpoints.
    """
    try:
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise UserError("writing tokenizer.json needs transformers: pip install 'llama-sae[hf]'") from None
    specials = list(TiktokenLlama3Tokenizer(model_path).special_tokens)
    tok = TikTokenConverter(vocab_file=str(model_path), extra_special_tokens=specials).converted()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 128000)]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT,
              "model_max_length": 131072, "chat_template": LLAMA3_CHAT_TEMPLATE}
    atomic_write(out / "tokenizer.json", tok.to_str())
    atomic_write_json(out / "tokenizer_config.json", config)
    return out / "tokenizer.json"

