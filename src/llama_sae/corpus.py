"""Sentence sources for every stage: one SOURCE string names where the text comes from.

Source forms (``parse_source``):

    tinyworld[:N[:SPLIT]]            the embedded generator: N sentences (default 100,000); train|heldout
    txt:PATH                         plain text; a blank-line-separated paragraph is one document
    jsonl:PATH[:FIELD]               one JSON object per line; FIELD defaults to "text"
    parquet:PATH[:COLUMN]            read in row-group batches (streaming); COLUMN defaults to "text"
    hf:NAME[:CONFIG]:SPLIT[:COLUMN]  datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)
    hfdisk:PATH[:COLUMN]             datasets.load_from_disk(PATH)
    openwebtext-sentences            a preset (see PRESETS): the seed project's corpus

PATH is a file, a folder (its matching files, recursively, in sorted order) or a glob. NAME may also be a
local folder of data files, which ``load_dataset`` reads offline (``hf:/data/dir::train``). With three
fields, ``hf:NAME:X:Y`` reads X as the split when it looks like one (train, test, validation, ...) and as
the config otherwise; write ``hf:NAME::SPLIT:COLUMN`` to be explicit.

Records are split into sentences with sentencex (rule-based, offline, fast). By default (``split_sentences
=None``) tinyworld is never split, and other sources are split unless their first records already look
like one sentence each. Order is deterministic, so a sentence's ``id`` is stable for the same settings.

Example:
    >>> corpus = Corpus("jsonl:data/news.jsonl:body", dedupe=True)
    >>> first = corpus.take(3)
    >>> corpus.fingerprint(1000)  # recorded by capture, so a store names the corpus it came from
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any, Protocol

from llama_sae.errors import UserError, first_line

__all__ = [
    "PRESETS",
    "Corpus",
    "Sentence",
    "SourceSpec",
    "filter_by_tokens",
    "fingerprint",
    "iter_sentences",
    "parse_source",
    "preview",
    "preview_table",
    "segment",
]

TINYWORLD_DEFAULT_N = 100_000
_KINDS = ("tinyworld", "txt", "jsonl", "parquet", "hf", "hfdisk")
_FORMS = (
    "tinyworld[:N[:heldout]], txt:PATH, jsonl:PATH[:FIELD], parquet:PATH[:COLUMN], "
    "hf:NAME[:CONFIG]:SPLIT[:COLUMN], hfdisk:PATH[:COLUMN]"
)
_EXTENSIONS = {
    "txt": (".txt", ".txt.gz", ".text", ".md"),
    "jsonl": (".jsonl", ".jsonl.gz", ".ndjson", ".json"),
    "parquet": (".parquet",),
}
_SPLIT_NAMES = {"train", "test", "validation", "valid", "val", "dev", "eval", "heldout"}
_SNIFF_RECORDS = 256  # records looked at to decide whether a source is already one sentence per record
_SNIFF_MAX_MULTI = 0.1  # ...it is, when at most this fraction of them holds several sentences
_HF_INSTALL = "pip install 'llama-sae[hf]'"


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence: ``id`` is its index in the corpus's deterministic order (stable for fixed settings);
    ``concepts`` names the planted concepts of the record it came from (tinyworld only, else empty)."""

    id: int
    text: str
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceSpec:
    """A parsed SOURCE string. ``str(spec)`` is its canonical form, which the fingerprint hashes.

    Attributes:
        kind: one of tinyworld, txt, jsonl, parquet, hf, hfdisk.
        path: file, folder or glob; for hf the hub name (or a local folder of data files).
        field: JSON field or column holding the text.
        config: hf dataset config, or None.
        split: hf split, or tinyworld train|heldout.
        n: tinyworld sentence count.
        split_sentences: the source's own splitting default (presets); None = decide automatically.
        max_tokens: the source's own token limit (presets), applied when a tokenizer is given.
        preset: the preset name this spec came from, if any.
    """

    kind: str
    path: str = ""
    field: str = "text"
    config: str | None = None
    split: str = "train"
    n: int | None = None
    split_sentences: bool | None = None
    max_tokens: int | None = None
    preset: str | None = None

    def __str__(self) -> str:
        if self.kind == "tinyworld":
            return f"tinyworld:{self.n}:{self.split}"
        if self.kind == "txt":
            return f"txt:{self.path}"
        if self.kind == "hf":
            return f"hf:{self.path}:{self.config or ''}:{self.split}:{self.field}"
        return f"{self.kind}:{self.path}:{self.field}"


PRESETS: dict[str, SourceSpec] = {
    # The seed's capture corpus: OpenWebText split into sentences of at most 192 tokens. (The seed split
    # with NLTK Punkt; sentencex gives nearly the same boundaries with no data download.)
    "openwebtext-sentences": SourceSpec(
        kind="hf",
        path="Skylion007/openwebtext",
        split="train",
        field="text",
        split_sentences=True,
        max_tokens=192,
        preset="openwebtext-sentences",
    ),
}


class Tokenizer(Protocol):
    """What ``filter_by_tokens`` needs from a tokenizer (``llama_sae.llama.tokenizer.LlamaTokenizer`` has it)."""

    def encode_prefix(self, text: str, max_tokens: int, bos: bool = True) -> list[int]:
        """``encode(text, bos)[:max_tokens]``."""


# ---------------------------------------------------------------------------------------------------
# Parsing


def parse_source(spec: str | SourceSpec) -> SourceSpec:
    """Parse a SOURCE string (see the module docstring) into a ``SourceSpec``.

    Raises:
        UserError: the string is not one of the valid forms.
    """
    if isinstance(spec, SourceSpec):
        return spec
    text = spec.strip()
    if text in PRESETS:
        return PRESETS[text]
    kind, sep, rest = text.partition(":")
    if kind == "tinyworld":
        return _parse_tinyworld(text, rest)
    if kind not in _KINDS or not sep or not rest:
        hint = f" or a preset ({', '.join(PRESETS)})"
        raise UserError(f"unknown corpus source {spec!r}: use one of {_FORMS}{hint}")
    if kind == "txt":
        return SourceSpec(kind="txt", path=os.path.normpath(rest))  # ./a/ and a: one source, one fingerprint
    if kind == "hf":
        return _parse_hf(text, rest)
    path, field = _path_and_field(rest)
    return SourceSpec(kind=kind, path=os.path.normpath(path), field=field or "text")


def _parse_tinyworld(text: str, rest: str) -> SourceSpec:
    fields = rest.split(":") if rest else []
    if len(fields) > 2:
        raise UserError(f"bad tinyworld source {text!r}: use tinyworld, tinyworld:N or tinyworld:N:heldout")
    n_text = fields[0] if fields else ""
    split = fields[1] if len(fields) > 1 and fields[1] else "train"
    if split not in ("train", "heldout"):
        raise UserError(f"unknown tinyworld split {split!r} in {text!r}: use train or heldout")
    n = _parse_count(n_text, text) if n_text else TINYWORLD_DEFAULT_N
    return SourceSpec(kind="tinyworld", n=n, split=split, split_sentences=False)


def _parse_count(n_text: str, text: str) -> int:
    scale = {"k": 1_000, "m": 1_000_000}.get(n_text[-1].lower(), 1)
    digits = n_text[:-1] if scale > 1 else n_text
    try:
        n = int(float(digits) * scale) if scale > 1 else int(digits)
    except (ValueError, OverflowError):  # (infk, nank)
        n = -1
    if not 0 < n < 2**63:
        raise UserError(f"bad sentence count {n_text!r} in {text!r}: use a positive number such as 5000 or 5k")
    return n


def _parse_hf(text: str, rest: str) -> SourceSpec:
    fields = _split_outside_brackets(rest)
    name, config, split, column = fields[0], "", "train", "text"
    if len(fields) == 2:
        split = fields[1]
    elif len(fields) == 3:
        if fields[1] and _looks_like_split(fields[1]):
            split, column = fields[1], fields[2]
        else:
            config, split = fields[1], fields[2]
    elif len(fields) == 4:
        config, split, column = fields[1:]
    elif len(fields) > 4:
        raise UserError(f"bad hf source {text!r}: use hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    if not name:
        raise UserError(f"bad hf source {text!r}: NAME is empty; use hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    if "[" in split:
        raise UserError(
            f"split slices such as {split!r} do not work with streaming datasets: give the whole split "
            "and limit the number of sentences instead"
        )
    return SourceSpec(kind="hf", path=name, config=config or None, split=split or "train", field=column or "text")


def _split_outside_brackets(text: str) -> list[str]:
    """Split on ':' except inside [...] (split slices such as ``train[:1000]``)."""
    fields, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == ":" and depth == 0:
            fields.append(text[start:i])
            start = i + 1
    fields.append(text[start:])
    return fields


def _looks_like_split(field: str) -> bool:
    return "[" in field or field.split("+")[0].strip().lower() in _SPLIT_NAMES


def _path_and_field(rest: str) -> tuple[str, str]:
    """``PATH[:FIELD]``: the whole string is the path when it exists (so a path may hold ':')."""
    if ":" not in rest or os.path.exists(os.path.expanduser(rest)):
        return rest, ""
    path, _, field = rest.rpartition(":")
    return path, field


# ---------------------------------------------------------------------------------------------------
# Reading records: each source yields (text, concepts) in a deterministic order.

Record = tuple[str, tuple[str, ...]]


def _files(spec: SourceSpec) -> list[Path]:
    """The files a PATH names: a file, a folder's matching files (recursive, sorted) or a glob."""
    raw = os.path.expanduser(spec.path)
    exts = _EXTENSIONS[spec.kind]
    if any(ch in raw for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(raw, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"no files match {spec.path!r} in source '{spec}': check the pattern")
        return files
    path = Path(raw)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(exts)
             and not any(part.startswith(".") for part in p.relative_to(path).parts)),  # hidden files and folders
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise UserError(f"no {'/'.join(exts)} files in folder {spec.path}: add files or point at one")
        return files
    raise UserError(f"no such file or folder: {spec.path} (source '{spec}'): check the path")


_SNIFF_BYTES = 8192


def _open_text(path: Path) -> IO[str]:
    """A text file (``.gz``: decompressed) as UTF-8, or UTF-16 / UTF-8 with a byte-order mark (the mark dropped).
    Web text often has stray bad bytes: they are replaced rather than stop a long run on one byte. A file whose
    first 8 KiB hold a NUL byte is not text (a binary file, or UTF-16 without a mark): a UserError."""
    def raw() -> IO[bytes]:
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")

    with raw() as fh:
        head = _gzip_errors(path, lambda: fh.read(_SNIFF_BYTES))
    encoding = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    if encoding != "utf-16" and b"\0" in head:
        raise UserError(f"{path} holds NUL bytes: it is not a text file (binary, or UTF-16 without a byte-order "
                        "mark): convert it to UTF-8 text")
    return io.TextIOWrapper(raw(), encoding=encoding, errors="replace")


def _gzip_errors(path: Path, read):
    """``read()``, with a damaged gzip stream turned into a one-line UserError."""
    try:
        return read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{path} is a truncated or corrupt gzip file ({type(e).__name__}): copy or compress it "
                        "again") from None


def _lines(path: Path) -> Iterator[str]:
    """The lines of a text file (see :func:`_open_text`), a damaged gzip stream a UserError wherever it breaks."""
    with _open_text(path) as fh:
        while True:
            line = _gzip_errors(path, fh.readline)
            if not line:
                return
            yield line


def _txt_records(files: list[Path]) -> Iterator[Record]:
    for path in files:
        lines: list[str] = []
        for line in chain(_lines(path), [""]):
            if line.strip():
                lines.append(line.strip())
            elif lines:
                yield " ".join(lines), ()
                lines = []


def _jsonl_records(files: list[Path], field: str) -> Iterator[Record]:
    seen = False  # a record has had the field: later ones without it are skipped, as a null text is
    for path in files:
        doc = _json_document(path) if path.name.lower().endswith(".json") else None
        if isinstance(doc, dict) and len(files) > 1:
            continue  # a folder's metadata file (dataset_info.json, pretty-printed): not records
        if doc is not None and not isinstance(doc, list):
            raise UserError(f"{path} is one JSON {type(doc).__name__}, not JSON Lines: write one object per line, "
                            "or a JSON array of objects")
        rows = enumerate(doc, 1) if doc is not None else ((n, line) for n, line in enumerate(_lines(path), 1))
        for lineno, line in rows:
            where = f"{path}:{lineno}" if doc is None else f"{path} item {lineno}"
            if doc is None:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where} is not valid JSON ({e.msg}): fix or remove the line") from e
            else:
                obj = line
            if not isinstance(obj, dict):
                raise UserError(f"{where} is not a JSON object: write one object per line")
            if field not in obj:
                if seen:
                    continue
                have = ", ".join(map(str, obj)) or "none"
                raise UserError(f"{where} has no field {field!r} (fields: {have}): name one as jsonl:PATH:FIELD")
            seen = True
            yield from _text_value(obj[field], f"{where} field {field!r}")


JSON_DOCUMENT_BYTES = 256 << 20  # a .json file up to this size may be one document (an array of records)


def _json_document(path: Path) -> Any:
    """The parsed content of a .json file that is one JSON document over several lines (an array of records, or a
    pretty-printed object), or None when it is JSON Lines (its first line parses alone), too big to be read
    whole, or not JSON at all (then read as lines, which names the bad line)."""
    with _open_text(path) as f:
        first = f.readline()
    try:
        if not isinstance(json.loads(first), list):
            return None  # a JSON Lines record
    except json.JSONDecodeError:
        pass  # (a one-line array, json.dump's default, is a document too)
    if path.stat().st_size > JSON_DOCUMENT_BYTES:
        return None
    try:
        with _open_text(path) as f:
            return json.loads(f.read())
    except json.JSONDecodeError:
        return None


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON can spell a lone surrogate ("\ud800"), which no encoder takes


def _text_value(value: Any, where: str) -> Iterator[Record]:
    if value is None:
        return
    if not isinstance(value, str):
        raise UserError(f"{where} is {type(value).__name__}, not text: name a text field or column")
    yield _SURROGATE.sub("\ufffd", value), ()  # replaced, as a text file's stray bad bytes are


def _parquet_records(files: list[Path], column: str) -> Iterator[Record]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"reading parquet needs pyarrow: {_HF_INSTALL}") from e
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{path} is not a readable parquet file ({e}): check the file") from e
        names = pf.schema_arrow.names
        if column not in names:
            fix = "name one as parquet:PATH:COLUMN"
            raise UserError(f"{path} has no column {column!r} (columns: {', '.join(names)}): {fix}")
        kind = pf.schema_arrow.field(column).type
        value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas' category columns
        text_kinds = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None))
        if not any(is_text is not None and is_text(value_kind) for is_text in text_kinds):
            raise UserError(f"column {column!r} in {path} holds {kind}, not text: name a text column")
        for batch in pf.iter_batches(batch_size=4096, columns=[column]):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield value, ()


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_resolves() -> bool:
    """Whether the Hugging Face endpoint's host name resolves (``HF_ENDPOINT``, default huggingface.co). A machine
    without network answers at once; behind a proxy (which resolves names itself) the answer is always yes."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _import_datasets() -> Any:
    import sys

    if "datasets" not in sys.modules and not os.environ.get("HF_HUB_OFFLINE") and not hub_resolves():
        # no network: the hub client would retry each request for ~25 s before failing; in offline mode it reads
        # the local cache at once (a dataset downloaded before still loads)
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"hf: and hfdisk: sources need the datasets package: {_HF_INSTALL}") from e
    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    if not any(isinstance(h, _ParseFailures) for h in json_log.handlers):
        json_log.addHandler(_ParseFailures())
        json_log.propagate = False  # its one error line names the file the raise after it does not: ours will
    return datasets


class _ParseFailures(logging.Handler):
    """Keeps the file named by the datasets JSON reader's last "Failed to load JSON from file" line."""

    file: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"from file '(.+?)' with error", record.getMessage())
        _ParseFailures.file = found.group(1) if found else None


def _hub_errors(name: str, what: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``what``, turning hub and network failures into one-line UserErrors."""
    try:
        yield from what
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- classified below; anything unknown is re-raised
        error = _hub_user_error(name, e)
        if error is None:
            raise
        raise error from e


def _hub_user_error(name: str, e: Exception) -> UserError | None:
    """A one-line UserError for a hub or network failure, or None when ``e`` is something else."""
    kind = type(e).__name__
    reason = first_line(e)
    if kind == "RepositoryNotFoundError" or (
        isinstance(e, FileNotFoundError) and kind != "LocalEntryNotFoundError"  # that one means offline
    ):
        return UserError(
            f"no hub dataset or local data folder {name!r} ({reason}): check the name or path, "
            "or log in if the dataset is gated"
        )
    offline = isinstance(e, (OSError, TimeoutError)) or type(e).__module__.split(".")[0] in (
        "httpx",
        "httpx2",
        "requests",
        "urllib3",
        "aiohttp",
        "fsspec",
    )
    if offline:
        return UserError(
            f"could not reach the Hugging Face hub for {name} (offline?): download it once with network, "
            f"or save it with save_to_disk and use hfdisk:PATH ({reason})"
        )
    if type(e).__name__ == "ArrowInvalid" or "parse error" in reason.lower():  # a data file it could not read
        file, _ParseFailures.file = _ParseFailures.file, None
        which = f"data file {file}" if file else "a data file"
        return UserError(f"hf source {name!r}: {which} could not be parsed ({reason}): fix or remove that file")
    if isinstance(e, ValueError):  # bad split or config: the message lists the valid ones
        return UserError(f"hf source {name!r}: {reason}: fix the split/config in hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    return None


def _hf_records(spec: SourceSpec) -> Iterator[Record]:
    datasets = _import_datasets()
    ds = _load_hub(datasets, spec)
    columns = getattr(ds, "column_names", None)
    if columns is not None and spec.field not in columns:
        raise UserError(_missing_column(spec, columns))
    for row in _hub_errors(spec.path, ds):
        if spec.field not in row:
            raise UserError(_missing_column(spec, list(row)))
        yield from _text_value(row[spec.field], f"{spec.path} column {spec.field!r}")


def _load_hub(datasets: Any, spec: SourceSpec) -> Any:
    try:
        return datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
    except Exception as e:  # noqa: BLE001 -- classified by _hub_user_error; unknown errors re-raised
        error = _hub_user_error(spec.path, e)
        if error is None:
            raise
        raise error from e


def _missing_column(spec: SourceSpec, columns: Iterable[str]) -> str:
    form = "hf:NAME[:CONFIG]:SPLIT:COLUMN" if spec.kind == "hf" else "hfdisk:PATH:COLUMN"
    return f"{spec.path} has no column {spec.field!r} (columns: {', '.join(columns)}): name one as {form}"


def _hfdisk_records(spec: SourceSpec) -> Iterator[Record]:
    datasets = _import_datasets()
    path = os.path.expanduser(spec.path)
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise UserError(f"{spec.path} {what} (source '{spec}'): give a folder written by save_to_disk")
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise UserError(f"{spec.path} is not a dataset folder written by save_to_disk: check the path") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in ds and len(splits) != 1:
            raise UserError(f"{spec.path} holds splits {', '.join(splits)}: save the one you want with save_to_disk")
        ds = ds["train"] if "train" in ds else ds[splits[0]]
    if spec.field not in ds.column_names:
        raise UserError(_missing_column(spec, ds.column_names))
    for batch in ds.select_columns([spec.field]).iter(batch_size=1024):
        for value in batch[spec.field]:
            yield from _text_value(value, f"{spec.path} column {spec.field!r}")


def _tinyworld_records(spec: SourceSpec) -> Iterator[Record]:
    try:
        from llama_sae import tinyworld
    except ImportError as e:
        raise UserError(f"the tinyworld generator could not be imported ({e}): reinstall llama-sae") from e
    if not hasattr(tinyworld, "iter_sentences"):
        raise UserError("llama_sae.tinyworld has no sentence generator: reinstall llama-sae")
    # The first n of the endless stream, i.e. tinyworld.sentences(n), without building the list first.
    for record in islice(tinyworld.iter_sentences(seed=0, split=spec.split), spec.n):
        yield record.text, tuple(record.concepts)


def _records(spec: SourceSpec) -> Iterator[Record]:
    """Records of a source; file sources are resolved now, so a bad path fails at once."""
    if spec.kind == "tinyworld":
        return _tinyworld_records(spec)
    if spec.kind == "hf":
        return _hf_records(spec)
    if spec.kind == "hfdisk":
        return _hfdisk_records(spec)
    files = _files(spec)
    if spec.kind == "txt":
        return _txt_records(files)
    if spec.kind == "jsonl":
        return _jsonl_records(files, spec.field)
    return _parquet_records(files, spec.field)


# ---------------------------------------------------------------------------------------------------
# Sentences


@lru_cache(maxsize=8)
def _segmenter(language: str) -> Any:
    from sentencex import segment as sentencex_segment

    return lambda text: sentencex_segment(language, text)


def segment(text: str, language: str = "en") -> list[str]:
    """Split ``text`` into sentences (sentencex rules), with whitespace runs collapsed to one space.

    Example:
        >>> segment("Dr. Smith paid 3.5 dollars. Then he left.")
        ['Dr. Smith paid 3.5 dollars.', 'Then he left.']
    """
    pieces = (" ".join(piece.split()) for piece in _segmenter(language)(text))
    return [piece for piece in pieces if piece]


def _resolve_split(spec: SourceSpec, split_sentences: bool | None, language: str) -> tuple[bool, Iterator[Record]]:
    """Open the source and decide whether to split it; returns the decision and all its records."""
    records = _records(spec)
    if split_sentences is None:
        split_sentences = spec.split_sentences
    if split_sentences is not None:
        return split_sentences, records
    head = list(islice(records, _SNIFF_RECORDS))
    multi = sum(len(segment(text, language)) > 1 for text, _ in head)
    return multi > _SNIFF_MAX_MULTI * len(head), chain(head, records)


def _hash8(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _sentences(
    spec: SourceSpec, do_split: bool, records: Iterator[Record], min_chars: int, dedupe: bool, language: str
) -> Iterator[Sentence]:
    seen: set[int] = set()  # 8-byte hashes: ~70 bytes per distinct sentence in CPython
    next_id = 0
    for text, concepts in records:
        for piece in segment(text, language) if do_split else [text.strip()]:
            if len(piece) < max(min_chars, 1):
                continue
            if dedupe:
                key = _hash8(piece)
                if key in seen:
                    continue
                seen.add(key)
            yield Sentence(next_id, piece, concepts)
            next_id += 1
    if next_id == 0:
        raise UserError(
            f"source '{spec}' gave no sentences (min_chars={min_chars}): check that it holds text "
            "in the named field or column"
        )


def iter_sentences(
    spec: str | SourceSpec,
    *,
    split_sentences: bool | None = None,
    min_chars: int = 1,
    dedupe: bool = False,
    language: str = "en",
) -> Iterator[Sentence]:
    """Stream the sentences of a source in deterministic order.

    Args:
        spec: a SOURCE string or parsed ``SourceSpec``.
        split_sentences: True splits every record, False keeps records whole; None (default) uses the
            source's default (tinyworld: no) or splits unless the first records already look like
            single sentences.
        min_chars: drop sentences shorter than this (after stripping whitespace).
        dedupe: drop exact repeats (by 8-byte hash, so memory grows ~70 bytes per distinct sentence).
        language: sentencex language code.

    Returns:
        An iterator of ``Sentence``; ids count the sentences it yields, from 0.

    Raises:
        UserError: a bad source string, a missing file, field or column, an unreachable hub dataset, or
            a source with no sentences (raised when iteration reaches its end).
    """
    return _open(parse_source(spec), split_sentences, min_chars, dedupe, language)[1]


def _open(
    spec: SourceSpec, split_sentences: bool | None, min_chars: int, dedupe: bool, language: str
) -> tuple[bool, Iterator[Sentence]]:
    """Open a source now (a bad path or hub name fails here) and return the splitting decision and the
    sentence stream."""
    do_split, records = _resolve_split(spec, split_sentences, language)
    return do_split, _sentences(spec, do_split, records, min_chars, dedupe, language)


def filter_by_tokens(
    sentences: Iterable[Sentence], tokenizer: Tokenizer, min_tokens: int = 1, max_tokens: int | None = None
) -> Iterator[Sentence]:
    """Keep sentences whose token count (``tokenizer.encode(text, bos=False)``) is within the limits.

    Ids are kept, so they still point into the unfiltered order. Only as many tokens as the limits need are
    encoded (a 10 MB line is not tokenized whole).
    """
    enough = max(min_tokens, 0 if max_tokens is None else max_tokens + 1)  # tokens that decide both limits
    for sentence in sentences:
        n = len(tokenizer.encode_prefix(sentence.text, enough, bos=False))
        if n >= min_tokens and (max_tokens is None or n <= max_tokens):
            yield sentence


# ---------------------------------------------------------------------------------------------------
# Corpus


class Corpus:
    """A source plus the settings that turn it into sentences; iterable any number of times.

    Args:
        source: a SOURCE string or ``SourceSpec``.
        split_sentences, min_chars, dedupe, language: as in ``iter_sentences``.
        tokenizer: if given, sentences are filtered to ``min_tokens..max_tokens`` tokens; a preset's own
            limit (openwebtext-sentences: 192) applies when ``max_tokens`` is not given.
        min_tokens, max_tokens: token limits; they need a tokenizer.
    """

    def __init__(
        self,
        source: str | SourceSpec,
        *,
        split_sentences: bool | None = None,
        min_chars: int = 1,
        dedupe: bool = False,
        language: str = "en",
        tokenizer: Tokenizer | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.spec = parse_source(source)
        if tokenizer is None and (min_tokens is not None or max_tokens is not None):
            raise ValueError("min_tokens/max_tokens need a tokenizer: pass tokenizer=...")
        self.split_sentences = split_sentences
        self.min_chars = min_chars
        self.dedupe = dedupe
        self.language = language
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens if min_tokens is not None else 1
        self.max_tokens = max_tokens if max_tokens is not None else self.spec.max_tokens

    def _open(self) -> tuple[bool, Iterator[Sentence]]:
        do_split, sentences = _open(self.spec, self.split_sentences, self.min_chars, self.dedupe, self.language)
        if self.tokenizer is not None:
            sentences = filter_by_tokens(sentences, self.tokenizer, self.min_tokens, self.max_tokens)
        return do_split, sentences

    def __iter__(self) -> Iterator[Sentence]:
        return self._open()[1]

    def splits(self, split_sentences: bool | None = None) -> bool:
        """Whether reading splits records into sentences: ``split_sentences`` if given, else this corpus's setting,
        else the automatic rule (which opens the source and reads its first records)."""
        choice = self.split_sentences if split_sentences is None else split_sentences
        return _resolve_split(self.spec, choice, self.language)[0]

    def take(self, n: int) -> list[Sentence]:
        """The first ``n`` sentences (fewer if the corpus is shorter)."""
        return list(islice(self, n))

    def _settings(self, do_split: bool) -> dict[str, Any]:
        tokens = [self.min_tokens, self.max_tokens] if self.tokenizer is not None else None
        return {
            "split_sentences": do_split,
            "min_chars": self.min_chars,
            "dedupe": self.dedupe,
            "language": self.language,
            "tokens": tokens,
        }

    def fingerprint(self, n: int) -> str:
        """sha256 hex over the canonical source, the settings and the ids and texts of the first ``n``
        sentences; record it with anything made from the corpus to name exactly which text was used."""
        do_split, sentences = self._open()
        return self._digest(do_split, islice(sentences, n), n)

    def _digest(self, do_split: bool, sentences: Iterable[Sentence], n: int) -> str:
        header = {"source": str(self.spec), "settings": self._settings(do_split), "n": n}
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
        count = 0
        for sentence in sentences:
            data = sentence.text.encode("utf-8")
            digest.update(sentence.id.to_bytes(8, "little") + len(data).to_bytes(8, "little") + data)
            count += 1
        digest.update(f"count={count}".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        """One line saying what this corpus reads and how (opens the source to resolve auto-splitting)."""
        return self._describe(_resolve_split(self.spec, self.split_sentences, self.language)[0])

    def _describe(self, do_split: bool) -> str:
        how = "split into sentences" if do_split else "one sentence per record"
        if self.split_sentences is None and self.spec.split_sentences is None:
            how += " (auto)"
        parts = [f"{self.spec.preset or self.spec} ({_describe_source(self.spec)})", how]
        if self.min_chars > 1:
            parts.append(f"min {self.min_chars} chars")
        if self.dedupe:
            parts.append("deduplicated")
        if self.max_tokens is not None or self.min_tokens > 1:
            limits = f"{self.min_tokens}..{self.max_tokens or ''} tokens"
            parts.append(limits if self.tokenizer is not None else f"{limits} (applied with a tokenizer)")
        return "; ".join(parts)


def _describe_source(spec: SourceSpec) -> str:
    if spec.kind == "tinyworld":
        return f"tinyworld generator, {spec.n:,} {spec.split} sentences"
    if spec.kind == "hf":
        config = f", config {spec.config}" if spec.config else ""
        return f"Hugging Face dataset {spec.path}{config}, split {spec.split}, column {spec.field!r}"
    if spec.kind == "hfdisk":
        return f"saved dataset {spec.path}, column {spec.field!r}"
    if spec.kind == "txt":
        return f"plain text {spec.path}, one document per paragraph"
    return f"{spec.kind} {spec.path}, {'field' if spec.kind == 'jsonl' else 'column'} {spec.field!r}"


def fingerprint(spec: str | SourceSpec, n: int, **settings: Any) -> str:
    """``Corpus(spec, **settings).fingerprint(n)``: a stable sha256 hex naming the corpus actually used."""
    return Corpus(spec, **settings).fingerprint(n)


# ---------------------------------------------------------------------------------------------------
# Preview (``llama-sae corpus preview SOURCE``)


def preview(spec: str | SourceSpec | Corpus, n: int = 5, *, scan: int = 1000, **settings: Any) -> dict[str, Any]:
    """Statistics over the first ``scan`` sentences and the first ``n`` as samples.

    Returns:
        dict with source, description, scanned (sentences read), exhausted (the corpus ended before
        ``scan``), chars, mean_chars, mean_words, fingerprint (of the scanned sentences) and samples
        (dicts with id, text, concepts).
    """
    corpus = spec if isinstance(spec, Corpus) else Corpus(spec, **settings)
    do_split, sentences = corpus._open()  # one pass: a hub dataset is opened once
    head = list(islice(sentences, max(scan, n) + 1))  # one more: whether the corpus ends right at the scan
    exhausted = len(head) <= max(scan, n)
    head = head[: max(scan, n)]
    chars = sum(len(s.text) for s in head)
    words = sum(len(s.text.split()) for s in head)
    return {
        "source": str(corpus.spec.preset or corpus.spec),
        "description": corpus._describe(do_split),
        "scanned": len(head),
        "exhausted": exhausted,
        "chars": chars,
        "mean_chars": chars / max(len(head), 1),
        "mean_words": words / max(len(head), 1),
        "fingerprint": corpus._digest(do_split, head, len(head)),
        "samples": [{"id": s.id, "text": s.text, "concepts": list(s.concepts)} for s in head[:n]],
    }


def preview_table(data: dict[str, Any]) -> Any:
    """Render ``preview(...)`` output as a rich Table (samples as rows, statistics in the caption)."""
    from rich.table import Table

    from llama_sae.terminal import literal

    more = "" if data["exhausted"] else "+"
    table = Table(
        expand=True,  # the whole width: a narrow table wrapped its caption inside the fingerprint
        title=literal(data["description"]),
        caption=(
            f"{data['scanned']:,}{more} sentences scanned, {data['chars']:,} chars, "
            f"mean {data['mean_chars']:.1f} chars / {data['mean_words']:.1f} words; "
            f"fingerprint {data['fingerprint'][:16]}"
        ),
    )
    table.add_column("id", justify="right", style="cyan")
    table.add_column("text", overflow="fold", ratio=1)  # (the extra width of expand goes to the text)
    with_concepts = any(sample["concepts"] for sample in data["samples"])
    if with_concepts:
        table.add_column("concepts", style="magenta")
    for sample in data["samples"]:
        row = [str(sample["id"]), literal(sample["text"])]
        if with_concepts:
            row.append(literal(", ".join(sample["concepts"])))
        table.add_row(*row)
    return table
