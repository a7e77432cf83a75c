"""Corpus sources, sentence splitting, fingerprints and errors, on tiny files made in tmp_path (offline)."""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass
from itertools import islice

import pytest

from llama_sae import corpus as C
from llama_sae.corpus import Corpus, Sentence, SourceSpec, iter_sentences, parse_source
from llama_sae.errors import UserError

DOC_A = "Dr. Smith paid 3.5 dollars for it. Then he left.\nHe came back at 5 p.m. on Monday."
DOC_B = "The U.S. economy grew 2.5% last year. Analysts were surprised!"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Hub access off, whether or not datasets / huggingface_hub were imported before the env was set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    patches = [
        ("huggingface_hub.constants", "HF_HUB_OFFLINE", True),
        ("datasets.config", "HF_HUB_OFFLINE", True),
        ("datasets.config", "HF_DATASETS_CACHE", tmp_path / "hf-cache"),
    ]
    for module, attr, value in patches:
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], attr, value)


def texts(source, **settings) -> list[str]:
    return [s.text for s in iter_sentences(source, **settings)]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_parquet(path, columns: dict, row_group_size: int = 2) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, expected",
    [
        ("tinyworld", SourceSpec("tinyworld", n=C.TINYWORLD_DEFAULT_N, split_sentences=False)),
        ("tinyworld:500", SourceSpec("tinyworld", n=500, split_sentences=False)),
        ("tinyworld:5k:heldout", SourceSpec("tinyworld", n=5000, split="heldout", split_sentences=False)),
        ("tinyworld:1_000", SourceSpec("tinyworld", n=1000, split_sentences=False)),
        ("txt:/d/a b.txt", SourceSpec("txt", path="/d/a b.txt")),
        ("jsonl:/d/x.jsonl", SourceSpec("jsonl", path="/d/x.jsonl")),
        ("jsonl:/d/x.jsonl:body", SourceSpec("jsonl", path="/d/x.jsonl", field="body")),
        ("parquet:/d/*.parquet:sentence", SourceSpec("parquet", path="/d/*.parquet", field="sentence")),
        ("hfdisk:/d/saved", SourceSpec("hfdisk", path="/d/saved")),
        ("hf:org/name", SourceSpec("hf", path="org/name")),
        ("hf:org/name:test", SourceSpec("hf", path="org/name", split="test")),
        (
            "hf:wikitext:wikitext-2-raw-v1:train",
            SourceSpec("hf", path="wikitext", config="wikitext-2-raw-v1"),
        ),
        ("hf:org/name:validation:body", SourceSpec("hf", path="org/name", split="validation", field="body")),
        ("hf:org/name:cfg:train:body", SourceSpec("hf", path="org/name", config="cfg", field="body")),
        ("hf:/data/dir::train", SourceSpec("hf", path="/data/dir")),
    ],
)
def test_parse_source(source, expected):
    assert parse_source(source) == expected


def test_canonical_form_round_trips():
    for source in ["tinyworld:7:heldout", "jsonl:/x.jsonl:body", "hf:a/b:c:train:t", "hf:/d::test:text"]:
        spec = parse_source(source)
        assert parse_source(str(spec)) == spec
    assert str(parse_source("jsonl:/x.jsonl")) == str(parse_source("jsonl:/x.jsonl:text"))


def test_path_with_colon_is_kept_when_it_exists(tmp_path):
    path = tmp_path / "a:b.jsonl"
    write_jsonl(path, [{"text": "One sentence here."}])
    assert parse_source(f"jsonl:{path}") == SourceSpec("jsonl", path=str(path))
    assert texts(f"jsonl:{path}") == ["One sentence here."]


def test_preset_is_a_source():
    spec = parse_source("openwebtext-sentences")
    assert spec is C.PRESETS["openwebtext-sentences"]
    assert (spec.kind, spec.path, spec.split, spec.field) == ("hf", "Skylion007/openwebtext", "train", "text")
    assert spec.split_sentences is True and spec.max_tokens == 192


# --- sentence splitting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Dr. Smith paid 3.5 dollars. Then he left.", ["Dr. Smith paid 3.5 dollars.", "Then he left."]),
        (
            "Mr. and Mrs. Jones came at 5 p.m. today. They ate.",
            ["Mr. and Mrs. Jones came at 5 p.m. today.", "They ate."],
        ),
        (
            "It rose 2.5% in the U.S. last year. Really?  Yes!",
            ["It rose 2.5% in the U.S. last year.", "Really?", "Yes!"],
        ),
        ("Pi is 3.14159. e is 2.71828.", ["Pi is 3.14159.", "e is 2.71828."]),
        ('She said "Go home." He went.', ['She said "Go home."', "He went."]),
        ("Wrapped\nline here. Next one", ["Wrapped line here.", "Next one"]),
        ("no final stop", ["no final stop"]),
        ("   \n ", []),
    ],
)
def test_segment(text, expected):
    assert C.segment(text) == expected


# --- file sources -------------------------------------------------------------------------------


def test_txt_paragraphs_are_split_into_sentences(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(f"{DOC_A}\n\n\n{DOC_B}\n")
    sentences = list(iter_sentences(f"txt:{path}"))
    assert [s.text for s in sentences] == [
        "Dr. Smith paid 3.5 dollars for it.",
        "Then he left.",
        "He came back at 5 p.m. on Monday.",
        "The U.S. economy grew 2.5% last year.",
        "Analysts were surprised!",
    ]
    assert [s.id for s in sentences] == list(range(5))
    assert all(s.concepts == () for s in sentences)
    assert texts(f"txt:{path}", split_sentences=False) == [DOC_A.replace("\n", " "), DOC_B]


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": DOC_B, "body": "First one. Second one."}, {"text": None, "body": "Third."}])
    assert texts(f"jsonl:{path}") == ["The U.S. economy grew 2.5% last year.", "Analysts were surprised!"]
    assert texts(f"jsonl:{path}:body") == ["First one.", "Second one.", "Third."]


def test_sentence_records_are_not_resplit_unless_asked(tmp_path):
    # sentencex splits after "approx." -- a sentence-per-record source must keep its records whole
    records = ["It costs approx. 3 dollars."] + [f"Sentence number {i} is here." for i in range(20)]
    path = tmp_path / "sentences.jsonl"
    write_jsonl(path, [{"text": r} for r in records])
    assert texts(f"jsonl:{path}") == records
    assert texts(f"jsonl:{path}", split_sentences=True)[:2] == ["It costs approx.", "3 dollars."]


def test_parquet_default_and_custom_column_streams_row_groups(tmp_path):
    path = tmp_path / "data.parquet"
    write_parquet(path, {"text": ["A one.", "B two.", None, "C three."], "s": ["x.", "y.", "z.", "w."]})
    assert texts(f"parquet:{path}") == ["A one.", "B two.", "C three."]
    assert texts(f"parquet:{path}:s") == ["x.", "y.", "z.", "w."]


def test_folder_and_glob_read_matching_files_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", [{"text": "From b."}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "From a."}])
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "From sub c."}])
    (tmp_path / "notes.txt").write_text("Not jsonl.")
    assert texts(f"jsonl:{tmp_path}") == ["From a.", "From b.", "From sub c."]
    assert texts(f"jsonl:{tmp_path}/*.jsonl") == ["From a.", "From b."]
    assert texts(f"txt:{tmp_path}") == ["Not jsonl."]


def test_gzip_text(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "Zipped."}) + "\n")
    assert texts(f"jsonl:{tmp_path}") == ["Zipped."]


# --- datasets sources ---------------------------------------------------------------------------


def test_hfdisk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["Alpha one.", "Beta two. Gamma three."], "other": ["o1.", "o2."]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    assert texts(f"hfdisk:{tmp_path / 'ds'}") == ["Alpha one.", "Beta two.", "Gamma three."]
    assert texts(f"hfdisk:{tmp_path / 'ds'}:other") == ["o1.", "o2."]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)})
    dd.save_to_disk(tmp_path / "dd")
    assert texts(f"hfdisk:{tmp_path / 'dd'}:other") == ["o1.", "o2."]


def test_hf_load_dataset_streams_a_local_folder(tmp_path):
    """The real hf: path (load_dataset(..., streaming=True)) on a local folder, which needs no network."""
    pytest.importorskip("datasets")
    folder = tmp_path / "hub"
    folder.mkdir()
    write_parquet(folder / "train.parquet", {"text": [DOC_A, DOC_B], "body": ["B1.", "B2."]})
    assert texts(f"hf:{folder}::train") == texts(f"parquet:{folder}")
    assert texts(f"hf:{folder}:train:body") == ["B1.", "B2."]
    with pytest.raises(UserError, match=r"no column 'nope' \(columns: text, body\)"):
        texts(f"hf:{folder}:train:nope")
    with pytest.raises(UserError, match=r"Bad split: validation.*fix the split"):
        texts(f"hf:{folder}:validation")
    with pytest.raises(UserError, match=r"BuilderConfig 'cfg' not found.*fix the split/config"):
        texts(f"hf:{folder}:cfg:train")
    with pytest.raises(UserError, match=r"no hub dataset or local data folder .*check the name or path"):
        texts(f"hf:{tmp_path / 'missing'}::train")
    (tmp_path / "bad").mkdir()  # a data file the loader cannot parse: named as such, not as a split/config problem
    (tmp_path / "bad" / "train.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"file .*bad/train.jsonl could not be parsed \(JSON parse error.*fix or"):
        texts(f"hf:{tmp_path / 'bad'}::train")


def test_hf_hub_dataset_offline_is_a_clear_error():
    pytest.importorskip("datasets")
    fix = r"could not reach the Hugging Face hub for Skylion007/openwebtext \(offline\?\).*hfdisk:PATH"
    with pytest.raises(UserError, match=fix) as info:
        list(iter_sentences("hf:Skylion007/openwebtext:train"))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=fix):
        Corpus("openwebtext-sentences").take(1)


def test_without_network_hf_sources_go_offline_instead_of_retrying(monkeypatch):
    """A host that cannot resolve (RFC 2606's .invalid) means no network: datasets is imported in offline mode, so
    the hub client fails at once (it would retry each request for ~25 s) and a cached dataset still loads."""
    import subprocess

    from llama_sae.corpus import hub_resolves

    pytest.importorskip("datasets")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "https://hub.invalid"
    code = ("import os\nfrom llama_sae.corpus import iter_sentences\ntry:\n"
            "    list(iter_sentences('hf:org/name:train'))\n"
            "except Exception as e:\n    print(type(e).__name__, os.environ.get('HF_HUB_OFFLINE'), e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("UserError 1 could not reach the Hugging Face hub for org/name (offline?)"), out
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    assert not hub_resolves()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")  # a proxy resolves names itself: assume reachable
    assert hub_resolves()


def test_missing_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    for source in ["hf:org/name:train", f"hfdisk:{tmp_path}"]:
        with pytest.raises(UserError, match=r"pip install 'llama-sae\[hf\]'"):
            list(iter_sentences(source))


# --- tinyworld ----------------------------------------------------------------------------------


@dataclass
class _FakeRecord:
    text: str
    concepts: tuple[str, ...]
    spans: tuple = ()


@pytest.fixture
def tinyworld(monkeypatch):
    """The real generator if it is there yet, else a stand-in with the same interface."""
    try:
        from llama_sae import tinyworld as real
    except ImportError:
        real = None
    if real is not None and hasattr(real, "iter_sentences"):
        return real
    fake = types.ModuleType("llama_sae.tinyworld")

    def iter_sentences(*, seed=0, split="train"):
        i = 0
        while True:
            yield _FakeRecord(f"The {split} chef cooks dish {i}. Dr. Who eats.", ("cooking",))
            i += 1

    def sentences(n, *, seed=0, split="train"):
        return list(islice(iter_sentences(seed=seed, split=split), n))

    fake.iter_sentences = iter_sentences
    fake.sentences = sentences
    monkeypatch.setitem(sys.modules, "llama_sae.tinyworld", fake)
    import llama_sae

    monkeypatch.setattr(llama_sae, "tinyworld", fake, raising=False)
    return fake


def test_tinyworld_records_keep_concepts_and_are_not_split(tinyworld):
    expected = tinyworld.sentences(12, seed=0, split="heldout")
    got = list(iter_sentences("tinyworld:12:heldout"))
    assert [s.text for s in got] == [r.text.strip() for r in expected]
    assert [s.concepts for s in got] == [tuple(r.concepts) for r in expected]
    assert [s.id for s in got] == list(range(12))
    assert texts("tinyworld:12") != texts("tinyworld:12:heldout")


def test_tinyworld_preview_shows_concepts(tinyworld):
    from rich.console import Console

    data = C.preview("tinyworld:50", n=3, scan=50)
    assert data["scanned"] == 50 and data["exhausted"]  # the corpus ends right there: "50 scanned", not "50+"
    assert not C.preview("tinyworld:51", n=3, scan=50)["exhausted"]
    assert all(sample["concepts"] for sample in data["samples"])
    console = Console(record=True, width=200)
    console.print(C.preview_table(data))
    assert "concepts" in console.export_text()


def test_tinyworld_without_generator(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_sae.tinyworld", types.ModuleType("llama_sae.tinyworld"))
    import llama_sae

    monkeypatch.setattr(llama_sae, "tinyworld", sys.modules["llama_sae.tinyworld"], raising=False)
    one_line_error("tinyworld:5", "no sentence generator: reinstall llama-sae")


# --- settings, determinism, fingerprints --------------------------------------------------------


@pytest.fixture
def news(tmp_path):
    path = tmp_path / "news.jsonl"
    write_jsonl(path, [{"text": DOC_A}, {"text": DOC_B}, {"text": "Then he left. OK."}, {"text": DOC_B}])
    return f"jsonl:{path}"


def test_deterministic_order_and_ids(news):
    first, second = list(iter_sentences(news)), list(iter_sentences(news))
    assert first == second
    corpus = Corpus(news)
    assert list(corpus) == list(corpus) == first
    assert corpus.take(3) == first[:3]
    assert corpus.take(100) == first


def test_dedupe_and_min_chars(news):
    all_texts = texts(news)
    assert all_texts.count("Then he left.") == 2 and all_texts.count("Analysts were surprised!") == 2
    deduped = list(iter_sentences(news, dedupe=True))
    assert [s.text for s in deduped] == list(dict.fromkeys(all_texts))
    assert [s.id for s in deduped] == list(range(len(deduped)))
    assert "OK." not in texts(news, min_chars=4)


class WordTokenizer:
    """One token per whitespace-separated word."""

    def encode_prefix(self, text: str, max_tokens: int, bos: bool = True) -> list[int]:
        return ([0] * bos + [1] * len(text.split()))[:max_tokens]


def test_filter_by_tokens_keeps_ids():
    sentences = [Sentence(0, "one two three"), Sentence(1, "one"), Sentence(2, "a b c d e f")]
    kept = list(C.filter_by_tokens(sentences, WordTokenizer(), min_tokens=2, max_tokens=5))
    assert kept == [sentences[0]]
    assert list(C.filter_by_tokens(sentences, WordTokenizer())) == sentences


def test_corpus_token_limits(news):
    short = Corpus(news, tokenizer=WordTokenizer(), max_tokens=3).take(100)
    assert [s.id for s in short] == [1, 4, 5, 6, 8]
    assert [s.text for s in short] == [t for t in texts(news) if len(t.split()) <= 3]
    with pytest.raises(ValueError, match="need a tokenizer"):
        Corpus(news, max_tokens=3)


def test_fingerprint_is_stable_and_sensitive(news, tmp_path):
    fp = C.fingerprint(news, 3)
    assert len(fp) == 64 and fp == C.fingerprint(news, 3) == Corpus(news).fingerprint(3)
    assert fp == C.fingerprint(news.replace(".jsonl", ".jsonl:text"), 3)  # same canonical source
    folder, name = news.split(":", 1)[1].rsplit("/", 1)
    assert fp == C.fingerprint(f"jsonl:{folder}//./{name}", 3)  # the same path spelled another way
    different = {
        C.fingerprint(news, 2),
        C.fingerprint(news, 3, split_sentences=False),
        C.fingerprint(news, 3, min_chars=4),
        C.fingerprint(news, 3, dedupe=True),
        C.fingerprint(news, 3, tokenizer=WordTokenizer(), max_tokens=100),
    }
    assert fp not in different and len(different) == 5
    # same settings, one changed character in the third sentence
    path = tmp_path / "news.jsonl"
    path.write_text(path.read_text().replace("Monday", "Sunday"))
    assert C.fingerprint(news, 2) == C.fingerprint(news, 2) and C.fingerprint(news, 3) != fp
    # sentences past n do not count
    path.write_text(path.read_text().replace("Sunday", "Monday").replace("OK.", "Fine."))
    assert C.fingerprint(news, 3) == fp


def test_preview_and_table(news):
    from rich.console import Console

    data = C.preview(news, n=2, scan=4)
    assert data["scanned"] == 4 and not data["exhausted"]
    assert [s["text"] for s in data["samples"]] == texts(news)[:2]
    assert data["chars"] == sum(len(t) for t in texts(news)[:4])
    assert data["mean_chars"] == pytest.approx(data["chars"] / 4)
    assert data["fingerprint"] == C.fingerprint(news, 4)
    everything = C.preview(news, scan=1000)
    assert everything["exhausted"] and everything["scanned"] == len(texts(news))
    console = Console(record=True, width=200)
    console.print(C.preview_table(data))
    out = console.export_text()
    assert "Dr. Smith paid 3.5 dollars for it." in out and "4+ sentences scanned" in out


def test_describe(news):
    assert "jsonl" in Corpus(news).describe() and "split into sentences (auto)" in Corpus(news).describe()
    line = Corpus(news, split_sentences=False, dedupe=True, min_chars=3).describe()
    assert "one sentence per record" in line and "deduplicated" in line and "min 3 chars" in line


# --- bad input ----------------------------------------------------------------------------------


def one_line_error(source, match, **settings) -> None:
    with pytest.raises(UserError, match=match) as info:
        list(iter_sentences(source, **settings))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source", ["csv:/x.csv", "/data/x.jsonl", "", "jsonl:", "hf:", "openwebtext"])
def test_unknown_source_lists_valid_forms(source):
    one_line_error(source, r"unknown corpus source .*tinyworld\[:N\[:heldout\]\], txt:PATH.*openwebtext-sentences")


@pytest.mark.parametrize(
    "source, match",
    [
        ("tinyworld:abc", "bad sentence count 'abc'.*positive number"),
        ("tinyworld:0", "bad sentence count '0'"),
        ("tinyworld:5:test", "unknown tinyworld split 'test'.*train or heldout"),
        ("tinyworld:5:train:x", "bad tinyworld source"),
        ("hf:a:b:c:d:e", r"bad hf source .*hf:NAME\[:CONFIG\]:SPLIT\[:COLUMN\]"),
        ("hf::train", "NAME is empty"),
        (
            "hf:org/name::train[:1000]:body",
            r"split slices such as 'train\[:1000\]' do not work with streaming",
        ),
        ("hf:org/name:train[10%:]", "split slices"),
    ],
)
def test_bad_source_fields(source, match):
    one_line_error(source, match)


def test_missing_paths(tmp_path):
    one_line_error(f"txt:{tmp_path}/nope.txt", "no such file or folder: .*nope.txt .*check the path")
    one_line_error(f"jsonl:{tmp_path}/*.jsonl", r"no files match .*\*\.jsonl.*check the pattern")
    one_line_error(f"parquet:{tmp_path}", r"no \.parquet files in folder")
    one_line_error(f"hfdisk:{tmp_path}/nope", "nope does not exist .*save_to_disk")
    one_line_error(f"hfdisk:{tmp_path}", "is not a dataset folder written by save_to_disk")


def test_missing_field_or_column_names_the_ones_that_exist(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "x", "title": "y"}])
    one_line_error(f"jsonl:{tmp_path / 'a.jsonl'}", r"a.jsonl:1 has no field 'text' \(fields: body, title\)")
    # once the field has been seen, a record without it is skipped (as a null text is), and a folder's
    # pretty-printed metadata .json is not read as lines of records
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "data.jsonl", [{"text": "One."}, {"title": "no text here"}, {"text": "Two."}])
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": "string"}}, indent=2))
    assert [s.text for s in Corpus(f"jsonl:{folder}", split_sentences=False)] == ["One.", "Two."]
    arrays = tmp_path / "arrays"  # pretty-printed JSON arrays of records are records too
    arrays.mkdir()
    (arrays / "a.json").write_text(json.dumps([{"text": "Three."}, {"text": "Four."}], indent=2))
    (arrays / "b.json").write_text(json.dumps([{"text": "Five."}]))  # json.dump's default: one line
    assert [s.text for s in Corpus(f"jsonl:{arrays}", split_sentences=False)] == ["Three.", "Four.", "Five."]
    one_line_error(f"jsonl:{folder / 'dataset_info.json'}", "is one JSON dict, not JSON Lines: write one object")
    write_parquet(tmp_path / "a.parquet", {"body": ["x"], "n": [1]})
    one_line_error(f"parquet:{tmp_path / 'a.parquet'}:sentence", r"no column 'sentence' \(columns: body, n\)")
    one_line_error(f"parquet:{tmp_path / 'a.parquet'}:n", "column 'n' .* holds int64, not text")


def test_hfdisk_missing_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["x."]}).save_to_disk(tmp_path / "ds")
    one_line_error(f"hfdisk:{tmp_path / 'ds'}", r"has no column 'text' \(columns: body\).*hfdisk:PATH:COLUMN")


def test_bad_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok."}\n{broken\n')
    one_line_error(f"jsonl:{tmp_path / 'a.jsonl'}", "a.jsonl:2 is not valid JSON")
    (tmp_path / "b.jsonl").write_text('["text"]\n')
    one_line_error(f"jsonl:{tmp_path / 'b.jsonl'}", "b.jsonl:1 is not a JSON object")
    write_jsonl(tmp_path / "c.jsonl", [{"text": 3}])
    one_line_error(f"jsonl:{tmp_path / 'c.jsonl'}", "field 'text' is int, not text")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    one_line_error(f"txt:{tmp_path / 'empty.txt'}", "gave no sentences")
    write_jsonl(tmp_path / "short.jsonl", [{"text": "Hi."}])
    one_line_error(f"jsonl:{tmp_path / 'short.jsonl'}", r"gave no sentences \(min_chars=10\)", min_chars=10)


def test_text_files_in_other_encodings_damaged_gzip_and_binary(tmp_path):
    """UTF-16 and UTF-8 with a byte-order mark are read as text (the mark dropped); a binary file, or a truncated
    or fake .gz file, is a one-line error instead of mojibake sentences or an "aborted"."""
    import gzip

    (tmp_path / "utf16.txt").write_text("Hello there.\n\nSecond one.\n", encoding="utf-16")
    (tmp_path / "bom.txt").write_bytes("\ufeffFirst with a mark.\n".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "A record."}\n'.encode())
    assert texts(f"txt:{tmp_path / 'utf16.txt'}", split_sentences=False) == ["Hello there.", "Second one."]
    assert texts(f"txt:{tmp_path / 'bom.txt'}") == ["First with a mark."]
    assert texts(f"jsonl:{tmp_path / 'bom.jsonl'}") == ["A record."]
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(UserError, match="bin.txt holds NUL bytes: it is not a text file"):
        texts(f"txt:{tmp_path / 'bin.txt'}")
    whole = gzip.compress(("A sentence here.\n\n" * 20000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fake.txt.gz").write_text("not gzip at all\n")
    for name in ("cut.txt.gz", "fake.txt.gz"):
        with pytest.raises(UserError, match=f"{name} is a truncated or corrupt gzip file"):
            texts(f"txt:{tmp_path / name}", split_sentences=False)


def test_folder_scans_skip_hidden_folders_and_match_extensions_in_any_case(tmp_path):
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("Hidden text.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "B.TXT").write_text("Upper case name.\n")
    (tmp_path / "a.txt").write_text("Plain one.\n")
    assert texts(f"txt:{tmp_path}") == ["Plain one.", "Upper case name."]


def test_parquet_text_stored_as_dictionary_or_view(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(["One.", "Two.", "One."]).dictionary_encode()})  # a pandas category column
    pq.write_table(table, tmp_path / "dict.parquet")
    assert texts(f"parquet:{tmp_path / 'dict.parquet'}") == ["One.", "Two.", "One."]
    if hasattr(pa, "string_view"):
        pq.write_table(pa.table({"text": pa.array(["Three."], type=pa.string_view())}), tmp_path / "view.parquet")
        assert texts(f"parquet:{tmp_path / 'view.parquet'}") == ["Three."]


def test_the_cli_can_force_sentence_splitting_either_way(tmp_path):
    """A file of one-sentence lines with one multi-sentence record: the automatic rule keeps records whole;
    --split-sentences splits it (preview, and capture records the choice in the corpus fingerprint)."""
    from typer.testing import CliRunner

    from llama_sae.cli import app

    lines = [f"Sentence number {i} stands alone." for i in range(30)] + ["First of two. Second of two, glued. A third!"]
    (tmp_path / "c.txt").write_text("\n\n".join(lines) + "\n")
    source = f"txt:{tmp_path / 'c.txt'}"
    assert texts(source)[-1] == lines[-1]  # auto: whole records
    runner = CliRunner()
    whole = runner.invoke(app, ["corpus", "preview", source, "--scan", "100", "-n", "0"])
    split = runner.invoke(app, ["corpus", "preview", source, "--scan", "100", "-n", "0", "--split-sentences"])
    assert whole.exit_code == split.exit_code == 0, (whole.output, split.output)
    assert "one sentence per record (auto)" in " ".join(whole.output.split())
    assert "split into sentences" in " ".join(split.output.split())
    assert texts(source, split_sentences=True)[-3:] == ["First of two.", "Second of two, glued.", "A third!"]
    stores = {}
    for flag in ([], ["--split-sentences"]):
        out = tmp_path / f"store{len(flag)}"
        result = runner.invoke(app, ["capture", "--corpus", source, "--hook", "resid_post.0", "--tokens", "300",
                                     "--out", str(out), "--no-progress", *flag])
        assert result.exit_code == 0, result.output
        stores[len(flag)] = json.loads((out / "manifest.json").read_text())["corpus"]["fingerprint"]
    assert stores[0] != stores[1]


def test_untrusted_text_is_shown_as_written_in_the_terminal(tmp_path):
    """Corpus text with rich markup, a stray "[/]" and escape sequences: `corpus preview` prints it literally
    (no crash, no bold, no hyperlink, no raw ESC); a lone surrogate a JSON line can spell is replaced by U+FFFD."""
    from typer.testing import CliRunner

    from llama_sae.cli import app
    from llama_sae.terminal import printable

    assert printable("a\x1b[31mred\x07 b\tc\nd") == "a\\x1b[31mred\\x07 b\tc\nd"
    rows = ["[bold]x[/bold] and [link=file:///etc/passwd]y[/link] here.", "A closer [/] alone.",
            "Clear \x1b[2J\x1b[H the screen."]
    write_jsonl(tmp_path / "evil.jsonl", [{"text": t} for t in rows])
    result = CliRunner().invoke(app, ["corpus", "preview", f"jsonl:{tmp_path / 'evil.jsonl'}", "--no-split-sentences"],
                                env={"COLUMNS": "200", "FORCE_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "[bold]x[/bold]" in result.output and "[/]" in result.output and "\\x1b[2J" in result.output
    assert "\x1b[2J" not in result.output and "\x1b]8;" not in result.output  # no clear-screen, no hyperlink
    (tmp_path / "surr.jsonl").write_text('{"text": "half \\ud800 a pair."}\n')
    assert texts(f"jsonl:{tmp_path / 'surr.jsonl'}") == ["half \ufffd a pair."]
