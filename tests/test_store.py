"""The store: statistics against float64 references, the split rule, the shard format's exact bytes, the
loader (coverage, determinism, exact resume), verify and the errors of a damaged store."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_sae.errors import UserError
from llama_sae.fileio import atomic_write_json
from llama_sae.store import (
    FORMAT,
    VERSION,
    ActivationStore,
    ActStats,
    StoreWriter,
    append_rows,
    finalize_store,
    is_val,
    new_shard,
    read_progress,
    serialize_shard,
    store_info,
    verify_store,
)

HOOK = "resid_post.0"


def _splitmix64(x: int) -> int:
    """The reference: Vigna's splitmix64 output for state x, in Python integers."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def make_store(path: Path, *, sentences: int = 300, shard_rows: int = 97, d: int = 6, val_percent: int = 20,
               hooks: tuple[str, ...] = (HOOK,), dtype: torch.dtype = torch.float32, seed: int = 0,
               workers: int = 1) -> Path:
    """A store written through StoreWriter without a model: acts[:, 0] is the row's index (exact in fp32)."""
    path.mkdir(parents=True)
    name = str(dtype).removeprefix("torch.")
    atomic_write_json(path / "manifest.json", {
        "format": FORMAT, "version": VERSION, "status": "capturing", "hooks": list(hooks), "d": d, "dtype": name,
        "model": {"path": "synthetic", "fingerprint": "0" * 64},
        "corpus": {"source": "synthetic", "fingerprint": "0" * 64},
        "capture": {"world_size": 1, "tokens": 0}, "split": {"val_percent": val_percent, "rule": "splitmix64"}})
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (sentences,), generator=g)
    sid = torch.repeat_interleave(torch.arange(sentences), lengths)
    pos = torch.cat([torch.arange(1, n + 1) for n in lengths.tolist()])
    n = sid.shape[0]
    acts = {h: torch.randn(n, d, generator=g) * 3 + 1 for h in hooks}
    for h in hooks:
        acts[h][:, 0] = torch.arange(n, dtype=torch.float32)
    writer = StoreWriter(path, list(hooks), d, shard_rows=shard_rows, dtype=dtype, val_percent=val_percent,
                         workers=workers)
    try:
        for lo in range(0, n, 50):  # pieces that do not line up with shards
            hi = min(n, lo + 50)
            writer.add({h: a[lo:hi] for h, a in acts.items()}, sid[lo:hi], pos[lo:hi], sid[lo:hi] % 7,
                       {"batch": lo, "skip": 0})
        writer.finish({"batch": n, "skip": 0})
    except BaseException:
        writer.abort()  # as capture does: the writer's threads are done before the error goes up
        raise
    finalize_store(path, tokens=n)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return ActivationStore(make_store(tmp_path_factory.mktemp("store") / "acts"))


def _ids(batches) -> list[int]:
    return torch.cat([b[:, 0] for b in batches]).long().tolist()


def _all_rows(store: ActivationStore) -> dict[str, torch.Tensor]:
    parts = [store.read(i) for i in range(len(store.shards))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------------------------- stats
def test_chan_merge_equals_float64_reference():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 0.01 + 1e4 for n in (0, 1, 7, 300, 33, 2)]
    total = ActStats.empty(5)
    for c in chunks:
        total = total.merged(ActStats.of(c))
    x = torch.cat(chunks).numpy()
    assert total.count == x.shape[0]
    np.testing.assert_allclose(total.mean.numpy(), x.mean(0), rtol=1e-14)
    np.testing.assert_allclose((total.m2 / total.count).numpy(), x.var(0), rtol=1e-9)  # mean 1e4, std 1e-2
    norms = np.linalg.norm(x, axis=1)
    s = total.summary()["norm"]
    assert s["mean"] == pytest.approx(norms.mean(), rel=1e-14)
    assert s["std"] == pytest.approx(norms.std(), rel=1e-6)
    assert (s["min"], s["max"]) == (norms.min(), norms.max())


def test_store_statistics_equal_a_float64_pass_over_its_rows(store):
    x = _all_rows(store)["acts"].double()
    stats = store.stats()
    assert stats.count == len(store) == x.shape[0]
    torch.testing.assert_close(store.mean, x.mean(0).float())
    torch.testing.assert_close(store.std, x.std(0, unbiased=False).float())
    assert store.norm_stats.sq_mean == pytest.approx(x.norm(dim=1).square().mean().item(), rel=1e-12)


# --------------------------------------------------------------------------------------------- split
def test_split_rule_is_splitmix64_and_keeps_sentences_whole(store):
    ids = np.arange(1000)
    want = np.array([_splitmix64(i) % 100 < 20 for i in ids.tolist()])
    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output for seed 0
    assert (is_val(ids, 20) == want).all()
    assert 0.15 < want.mean() < 0.25
    rows = _all_rows(store)
    val = torch.from_numpy(is_val(rows["sentence_id"].numpy(), 20))
    assert store.rows("val") == int(val.sum()) and store.rows("train") == int((~val).sum())
    train_sentences = set(rows["sentence_id"][~val].tolist())
    assert train_sentences.isdisjoint(rows["sentence_id"][val].tolist())


# --------------------------------------------------------------------------------------------- format
def test_shard_bytes_are_pinned():
    shard = new_shard(3, [HOOK], 4)
    acts = {HOOK: torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8}
    sid, pos = torch.tensor([5, 5, 5, 9, 9, 12]), torch.tensor([1, 2, 3, 1, 2, 1])
    append_rows(shard, acts, sid, pos, sid + 100, {"batch": 0, "skip": 0}, 0, 6, torch.bfloat16)
    data, entry = serialize_shard(shard, [HOOK], rank=1, val_percent=50)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"] == {"format": FORMAT}
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"} == {
        f"acts.{HOOK}": ("BF16", [6, 4]), "sentence_id": ("I64", [6]), "position": ("I32", [6]),
        "token_id": ("I32", [6]), f"stats.{HOOK}.mean": ("F64", [4]), f"stats.{HOOK}.m2": ("F64", [4]),
        f"stats.{HOOK}.norm": ("F64", [4])}
    assert entry["name"] == "rank01-000003.safetensors" and entry["rows"] == 6 and entry["sentences"] == [5, 12]
    assert entry["val_rows"] == int(is_val(sid.numpy(), 50).sum())
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # Any change to the layout, dtypes, names or statistics changes these bytes: bump VERSION if intended.
    assert entry["sha256"] == "766fe6c561d1a9a41c28134d3865335fc042f82cc08a929e8d2a5fa8cb00f82c"


# --------------------------------------------------------------------------------------------- loader
def test_one_epoch_visits_every_row_of_the_split_once(store):
    rows = _all_rows(store)
    val = is_val(rows["sentence_id"].numpy(), 20)
    for split, want in (("train", ~val), ("val", val), ("all", np.ones_like(val))):
        batches = list(store.loader(32, split=split, epochs=1, drop_last=False, buffer_rows=150))
        assert all(b.shape == (32, 6) and b.dtype == torch.float32 for b in batches[:-1])
        assert sorted(_ids(batches)) == np.flatnonzero(want).tolist()
    assert store.loader(32, split="validation").rows == store.rows("val")
    full = list(store.loader(32, epochs=1, buffer_rows=150))
    assert len(full) == store.rows("train") // 32 and all(b.shape[0] == 32 for b in full)


def test_shuffle_is_deterministic_mixes_shards_and_changes_every_epoch(store):
    a = list(store.loader(40, seed=3, epochs=2, buffer_rows=300))
    b = list(store.loader(40, seed=3, epochs=2, buffer_rows=300))
    c = list(store.loader(40, seed=4, epochs=2, buffer_rows=300))
    assert _ids(a) == _ids(b) and _ids(a) != _ids(c)
    per = len(a) // 2
    assert _ids(a[:per]) != _ids(a[per:])  # reshuffled
    shard_of = np.searchsorted(np.cumsum([e["rows"] for e in store.shards]), _ids(a[:1]), side="right")
    assert len(set(shard_of.tolist())) >= 2  # one batch draws on several shards
    ordered = list(store.loader(40, shuffle=False, split="all", epochs=1))
    assert _ids(ordered) == list(range(len(ordered) * 40))


def test_start_batch_continues_exactly_across_buffers_and_epochs(store):
    per = store.loader(25, buffer_rows=120).batches_per_epoch
    full = [b for _, b in zip(range(3 * per), store.loader(25, seed=1, buffer_rows=120))]
    for start in (0, 1, 7, per - 1, per, per + 1, 2 * per + 3):
        resumed = [b for _, b in zip(range(6), store.loader(25, seed=1, buffer_rows=120, start_batch=start))]
        assert all(torch.equal(got, want) for got, want in zip(resumed, full[start:start + 6])), start


def test_loader_converts_bf16_and_respects_epochs(tmp_path):
    s = ActivationStore(make_store(tmp_path / "bf16", dtype=torch.bfloat16, hooks=(HOOK, "mlp_out.1")))
    assert s.dtype == torch.bfloat16 and s.hooks == [HOOK, "mlp_out.1"]
    loader = s.loader(16, hook="mlp_out.1", epochs=2, split="all")
    batches = list(loader)
    assert len(batches) == loader.total_batches == 2 * (len(s) // 16)
    assert batches[0].dtype == torch.float32
    assert list(s.loader(16, hook=HOOK, epochs=2, start_batch=loader.total_batches)) == []
    with pytest.raises(UserError, match="holds 2 hook points"):
        _ = s.mean
    with pytest.raises(UserError, match="not attn_in.0: capture attn_in.0"):
        s.loader(16, hook="attn_in.0")


# --------------------------------------------------------------------------------------------- verify, errors
def test_verify_names_the_shard_with_a_flipped_byte(tmp_path):
    path = make_store(tmp_path / "acts")
    store = ActivationStore(path)
    seen = []
    report = verify_store(path, on_shard=lambda n, total: seen.append((n, total)))
    assert report.ok and report.shards == len(store.shards) == len(seen)
    assert sum(n for n, _ in seen) == seen[0][1] == store.manifest["bytes"]
    victim = path / store.shards[1]["name"]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 1
    victim.write_bytes(bytes(data))
    (path / ".rank00-000009.safetensors.tmp123").write_bytes(b"half")
    report = verify_store(path)
    assert not report.ok and report.bad == [victim.name]
    assert report.problems[0].startswith(f"{victim.name}: checksum mismatch")
    assert report.leftovers == [".rank00-000009.safetensors.tmp123"]


def test_the_loader_refuses_a_shard_changed_at_the_same_size(tmp_path):
    path = make_store(tmp_path / "acts")
    store = ActivationStore(path)
    victim = store.shards[2]["name"]
    clean = [b.clone() for b in store.loader(16, shuffle=False, split="all", epochs=1)]
    data = bytearray((path / victim).read_bytes())
    data[-5] ^= 1  # one bit of an activation: the size and the header still match the manifest
    (path / victim).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {victim} of store .* does not match its checksum.*"
                                        "llama-sae store verify.*--repair"):
        list(ActivationStore(path).loader(16, shuffle=False, split="all", epochs=1))
    with pytest.raises(UserError, match="does not match its checksum"):
        ActivationStore(path).read(2)
    assert ActivationStore(path).read(2, verify=False)["acts"].shape[0] == store.shards[2]["rows"]
    assert len(list(store.loader(16, shuffle=False, split="all", epochs=1))) == len(clean)  # checked once per object


def test_damaged_or_unfinished_stores_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="is not an activation store"):
        ActivationStore(tmp_path)
    path = make_store(tmp_path / "acts")
    name = ActivationStore(path).shards[0]["name"]
    with open(path / name, "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=f"shard {name} .* has 100 bytes, the manifest says"):
        ActivationStore(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["status"] = "capturing"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has not finished: re-run the same llama-sae capture"):
        ActivationStore(path)
    (path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        ActivationStore(path)


@pytest.mark.parametrize("field", ["d", "rows"])
def test_a_manifest_that_disagrees_with_its_shards_is_named_where_they_are_read(tmp_path, field):
    """A manifest edited to another width or row count: one line at the first read (training on it crashed in
    index_copy_ or, with inflated rows, trained silently on unfilled buffer rows)."""
    path = make_store(tmp_path / "acts")
    manifest = json.loads((path / "manifest.json").read_text())
    if field == "d":
        manifest["d"] *= 2
    else:
        manifest["rows"] += 9 * manifest["shards"][0]["rows"]  # the total edited to match: only the read can tell
        manifest["shards"][0]["rows"] *= 10
    (path / "manifest.json").write_text(json.dumps(manifest))
    store = ActivationStore(path)
    with pytest.raises(UserError, match=rf"shard {store.shards[0]['name']} .* where the manifest says .*store verify"):
        store.read(0)


def _edited(path: Path, change) -> Path:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda m: m["shards"].append(dict(m["shards"][0])), "shards is"),  # listed twice: trained on twice
    (lambda m: m["shards"][0].pop("sha256"), "shards is"),
    (lambda m: m["shards"][0].pop("val_rows"), "shards is"),
    (lambda m: m.update(rows=99999), "rows is '99999' but its shards hold"),
    (lambda m: m.update(val_rows=m["val_rows"] + 1), "val_rows is .* but its shards hold"),
])
def test_manifest_fields_that_contradict_each_other_are_refused_on_open(tmp_path, change, message):
    path = _edited(make_store(tmp_path / "acts"), change)
    with pytest.raises(UserError, match=message):
        ActivationStore(path)


def test_edited_split_dtype_or_hook_is_caught_by_reads_and_by_verify(tmp_path):
    """Each edit leaves the checksums right: reads refuse the shard, and verify says the manifest was edited
    (a val_rows edit used to yield unfilled buffer rows, all zeros, as training data)."""
    base = make_store(tmp_path / "acts")

    def copy(name, change):
        return _edited(Path(shutil.copytree(base, tmp_path / name)), change)

    def more_val(m):
        m["shards"][0]["val_rows"] += 5
        m["val_rows"] += 5

    split = ActivationStore(copy("split", more_val))
    with pytest.raises(UserError, match="rows of the train split where the manifest says"):
        next(iter(split.loader(8, split="train")))
    dtype = ActivationStore(copy("dtype", lambda m: m.update(dtype="float16")))
    with pytest.raises(UserError, match="holds torch.float32 activations where the manifest says torch.float16"):
        dtype.read(0)
    hook = ActivationStore(copy("hook", lambda m: m.update(hooks=["resid_post.3"])))
    with pytest.raises(UserError, match="holds no tensor acts.resid_post.3 where the manifest says"):
        hook.read(0, "resid_post.3")
    for name, message in [("split", "validation rows where the manifest says"), ("dtype", "is F32 where the "
                          "manifest says float16"), ("hook", "tensor acts.resid_post.3 is missing where")]:
        report = verify_store(tmp_path / name)
        assert not report.ok and report.mismatched == report.bad and len(report.bad) >= 1
        assert message in report.problems[0] and "manifest.json was edited or damaged" in report.problems[0]
    assert verify_store(base).ok


def test_a_hook_the_store_lacks_is_told_apart_from_a_name_no_model_has(store):
    with pytest.raises(UserError, match="holds resid_post.0, not resid_post.4: capture resid_post.4 with"):
        store.hook("resid_post.4")
    with pytest.raises(UserError, match="unknown hook point .foo.3.: use KIND.LAYER .*holds resid_post.0"):
        store.hook("foo.3")
    with pytest.raises(UserError, match="hook point 'resid_post.00': write the layer as a plain number, resid_post.0"):
        store.hook("resid_post.00")  # used to say "capture resid_post.00", which capture refuses


def test_loader_refuses_a_split_smaller_than_a_batch(store):
    with pytest.raises(UserError, match="fewer than one batch"):
        store.loader(10**6)
    with pytest.raises(UserError, match="split 'test' is unknown"):
        store.loader(8, split="test")


def test_info_reports_rows_and_bytes_per_token(store):
    info = store_info(store.path)
    assert info["rows"] == f"{len(store):,}" and info["status"] == "complete"
    per_token = store.manifest["bytes"] / len(store)
    assert info["bytes per token"].startswith(f"{per_token:,.1f}")


def test_progress_journal_survives_a_torn_line_and_reads_an_old_progress_file(tmp_path):
    from llama_sae.store import progress_path, read_progress

    path = tmp_path / "s"
    path.mkdir()
    writer = StoreWriter(path, [HOOK], 4, shard_rows=10, dtype=torch.float32)
    n = 25
    writer.add({HOOK: torch.randn(n, 4)}, torch.arange(n), torch.ones(n, dtype=torch.long),
               torch.zeros(n, dtype=torch.long), {"batch": 0, "skip": 0})
    writer.finish({"batch": 1, "skip": 0})
    journal = progress_path(path, 0)
    done = read_progress(path, 0)
    assert [e["rows"] for e in done["shards"]] == [10, 10, 5] and done["finished"]
    assert done["cursor"] == {"batch": 1, "skip": 0} and len(journal.read_text().splitlines()) == 4
    with open(journal, "a") as f:
        f.write('{"shard": {"name": "rank00-0000')  # killed mid-append
    assert read_progress(path, 0) == done  # a reader skips the torn line (and leaves the file alone)
    StoreWriter(path, [HOOK], 4, shard_rows=10).finish({"batch": 2, "skip": 0})  # the owner cuts it, then appends
    lines = journal.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1]) == {"finished": True, "cursor": {"batch": 2, "skip": 0}}
    journal.unlink()  # an earlier version's whole-file progress, left by an unfinished capture
    (path / "progress" / "rank00.json").write_text(json.dumps({**done, "finished": False}))
    assert read_progress(path, 0)["shards"] == done["shards"]
    StoreWriter(path, [HOOK], 4, shard_rows=10).abort()  # carried over into the journal
    assert not (path / "progress" / "rank00.json").exists()
    assert read_progress(path, 0) == {**done, "finished": False}
    (path / "progress" / "rank00.json").write_text(json.dumps({**done, "finished": False}))  # a kill before unlink
    StoreWriter(path, [HOOK], 4, shard_rows=10).abort()
    assert read_progress(path, 0) == {**done, "finished": False}  # not carried over twice
    assert not (path / "progress" / "rank00.json").exists()



def test_parallel_writers_write_the_same_store_and_commit_in_order(tmp_path):
    one = make_store(tmp_path / "one", shard_rows=31, dtype=torch.bfloat16)
    three = make_store(tmp_path / "three", shard_rows=31, dtype=torch.bfloat16, workers=3)
    entries = [json.loads((p / "manifest.json").read_text())["shards"] for p in (one, three)]
    assert len(entries[0]) > 30 and entries[0] == entries[1]  # same files, hashes, journal order
    assert [e["index"] for e in entries[1]] == list(range(len(entries[1])))
    for e in entries[0]:
        assert (one / e["name"]).read_bytes() == (three / e["name"]).read_bytes()


def test_parallel_writers_on_a_full_disk_keep_the_shards_before_the_failure(tmp_path, monkeypatch):
    import errno

    import llama_sae.store as store_mod

    real = store_mod._write_shard_file

    def full_at_five(path, data):
        if path.name.endswith("000005.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_mod, "_write_shard_file", full_at_five)
    with pytest.raises(UserError, match="disk full") as e:
        make_store(tmp_path / "s", shard_rows=31, workers=3)
    assert "\n" not in str(e.value)
    kept = read_progress(tmp_path / "s", 0)["shards"]
    assert [x["index"] for x in kept] == [0, 1, 2, 3, 4]  # in order, none after the failed one
    monkeypatch.setattr(store_mod, "_write_shard_file", real)
    StoreWriter(tmp_path / "s", [HOOK], 6, shard_rows=31).abort()  # the next run deletes uncommitted files
    on_disk = sorted(p.name for p in (tmp_path / "s").glob("rank00-*.safetensors"))
    assert on_disk == [x["name"] for x in kept]


def test_a_journal_line_without_its_newline_does_not_count_for_readers_either(tmp_path):
    """A full disk or a power loss can cut an append after the JSON but before its newline: the writer cuts such a
    line off on the next start, so the resume point must not count it (else that shard's rows are never captured)."""
    from llama_sae.fileio import read_jsonl
    from llama_sae.store import progress_path

    path = make_store(tmp_path / "s", shard_rows=31)
    journal = progress_path(path, 0)
    journal.parent.mkdir(exist_ok=True)
    lines = [json.dumps({"shard": {"name": f"rank00-{i:06d}.safetensors", "index": i}, "cursor": {"batch": i}})
             for i in range(3)]
    journal.write_text("\n".join(lines))  # the last line parses, but its newline never made it to disk
    assert [r["cursor"]["batch"] for r in read_jsonl(journal, journal=True)] == [0, 1]
    assert len(read_jsonl(journal)) == 3  # a whole-file JSON-lines file keeps a last line without newline
    assert [e["index"] for e in read_progress(path, 0)["shards"]] == [0, 1]


def test_the_verify_command_says_a_capture_is_unfinished_and_what_to_do_with_leftovers(tmp_path):
    from typer.testing import CliRunner

    from llama_sae.cli import app

    path = make_store(tmp_path / "acts")
    (path / "rank00-000099.safetensors").write_bytes(b"stray")  # a finished store's capture sweeps nothing
    result = CliRunner().invoke(app, ["store", "verify", str(path)])
    assert result.exit_code == 0 and "rank00-000099.safetensors is not part of the store" in result.output
    assert "delete it" in result.output and "unfinished" not in result.output
    _edited(path, lambda m: m.update(status="capturing"))
    said = " ".join(CliRunner().invoke(app, ["store", "verify", str(path)]).output.split())
    assert "the capture is unfinished: run the same capture command again" in said
    assert "the next capture run removes it" in said
