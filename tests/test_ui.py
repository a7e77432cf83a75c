"""The UI's plain-Python side (no browser): steering slots, session, token view, port check; the dashboard's HTML."""

from __future__ import annotations

import html
import re
import socket

import pytest
import torch

from llama_sae import tinyworld
from llama_sae.errors import UserError
from llama_sae.steer import parse_steer
from llama_sae.ui.app import all_specs, check_port, load_session, slot_specs


@pytest.fixture(scope="module")
def session():
    return load_session()  # the shipped tiny model and SAE, as `llama-sae ui` with no arguments


def test_slots_build_the_shared_spec():
    slots = [12, "add", 4.0, "all", None, "add", 3.0, "all", 7, "clamp", 0.0, "generated"]
    assert slot_specs(slots) == ["12:add:4:all", "7:clamp:0:generated"]  # empty slot off; clamp 0 is an edit
    assert slot_specs([5, "add", 0.0, "all"]) == []  # zero strength: off
    assert all_specs("3:bias:2 9:add:-1", [None, "add", 0, "all"]) == ["3:bias:2", "9:add:-1"]
    with pytest.raises(UserError, match="kind 'push'"):
        all_specs("3:push:2", [])
    with pytest.raises(UserError, match="slot 1: latent 'x1'"):
        slot_specs(["x1", "add", 2.0, "all"])
    assert slot_specs([" 12 ", "add", 2.0, "all", "", "add", 5.0, "all"]) == ["12:add:2:all"]


def test_session_defaults_steer_and_search(session):
    assert session.hook == "resid_post.5" and session.saes[session.hook].cfg.d_sae == 1024
    assert session.units[session.hook].shape == (1024,) and (session.units[session.hook] > 0).all()
    with pytest.raises(UserError, match="out of range"):
        session.steering(["5000:add:4"])
    with pytest.raises(UserError, match="none is loaded there"):
        session.steering(["resid_post.4@5:add:4"])
    assert session.steering([]) is None
    assert session.search("17")[0][0] == 17
    hits = session.search("courthouse")  # the shipped artifact's offline explanations
    assert hits and all("courthouse" in row[1].lower() for row in hits)
    with pytest.raises(UserError, match="out of range"):
        session.search("99999")


def test_stream_and_token_view(session):
    sampling = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    plain = list(session.stream("The", None, chat=False, sampling=sampling))
    text, prompt_tokens, new = plain[-1]
    steered = list(session.stream("The", session.steering(["969:add:8"]), chat=False, sampling=sampling))[-1]
    assert text and steered[0] != text  # a strong push on a topic latent changes the greedy text
    view = session.token_view(prompt_tokens, new)
    assert len(view) == len(new) and all(len(v["latents"]) <= 5 for v in view)
    # the view's latents are the SAE's top latents of those tokens, in context
    x = session.model.capture(torch.tensor([prompt_tokens + new]), [session.hook])[session.hook][0, -1:]
    vals, idx = session.saes[session.hook].encode_topk(x)
    assert view[-1]["latents"][0][0] == int(idx[0, vals[0].argmax()])


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            check_port("127.0.0.1", port)


def test_shipped_sae_is_there():
    assert (tinyworld.sae_path() / "cfg.json").exists()


def test_dashboard_pages_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from llama_sae.cli import app
    from llama_sae.features import load_features

    out = tmp_path / "site"
    result = CliRunner().invoke(app, ["dashboard", "--out", str(out), "--latents", "3,10-12"])
    assert result.exit_code == 0, result.output
    pages = sorted(p.name for p in (out / "latents").iterdir())
    assert pages == ["10.html", "11.html", "12.html", "3.html"]
    index = (out / "index.html").read_text()
    assert index.count("<tr data-id=") == 4 and "id='search'" in index
    f = load_features(tinyworld.features_path())
    page = (out / "latents" / "11.html").read_text()
    assert html.escape(f.explanation(11).text) in page
    assert "aria-label='activation histogram'" in page and page.count("class='pos num'") == 10
    assert "?steer=resid_post.5@11:add:8:prompt" in page and "href='12.html'" in page and "href='10.html'" in page
    assert "<code>llama-sae ui</code>" in page  # the shipped SAE: what `llama-sae ui` loads by itself


    for name in pages:  # every link between latent pages leads to a page that was written (3's next is 10)
        linked = set(re.findall(r"href='(\d+)\.html'", (out / "latents" / name).read_text()))
        assert {f"{n}.html" for n in linked} <= set(pages), name
    assert "href='10.html'>10 →" in (out / "latents" / "3.html").read_text()
    bad = CliRunner().invoke(app, ["dashboard", "--out", str(out), "--latents", "5000"])
    assert bad.exit_code != 0 and "out of range" in str(bad.exception)
    (tmp_path / "an_sae").mkdir()
    (tmp_path / "an_sae" / "cfg.json").write_text("{}")
    bad = CliRunner().invoke(app, ["dashboard", "--out", str(tmp_path / "an_sae"), "--latents", "3"])
    assert "not empty: it holds cfg.json, which is not part of a dashboard" in str(bad.exception)
    assert sorted(p.name for p in (tmp_path / "an_sae").iterdir()) == ["cfg.json"]
    from llama_sae.llama.checkpoint import save_hf
    from llama_sae.llama.model import ModelArgs, Transformer

    other = save_hf(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=4096,
                                          multiple_of=32)), tmp_path / "other", tokenizer_dir=tinyworld.model_path())
    bad = CliRunner().invoke(app, ["dashboard", "--out", str(tmp_path / "d2"), "--model", str(other), "--sae",
                                   str(tinyworld.sae_path()), "--features", str(tinyworld.features_path())])
    assert "layer 5 is out of range, this model has layers 0..1: a wrong layer, or the SAE of another model" in \
        str(bad.exception) and not (tmp_path / "d2").exists()  # (it crashed in the decoder's logit table)
    again = CliRunner().invoke(app, ["dashboard", "--out", str(out), "--latents", "10-11"])  # fewer latents
    assert again.exit_code == 0 and sorted(p.name for p in (out / "latents").iterdir()) == ["10.html", "11.html"]
    import shutil

    own = tmp_path / "own_sae"  # another SAE: the page names the `llama-sae ui` command that loads it
    own.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(tinyworld.sae_path() / name, own / name)
    result = CliRunner().invoke(app, ["dashboard", "--out", str(tmp_path / "own"), "--sae", str(own), "--features",
                                      str(tinyworld.features_path()), "--latents", "11"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "own" / "latents" / "11.html").read_text()
    assert f"<code>llama-sae ui --sae {own.resolve()} --features {tinyworld.features_path().resolve()}</code>" in page
    feats = tmp_path / "feats"  # the shipped SAE with another artifact (other units): the command names it
    shutil.copytree(tinyworld.features_path(), feats)
    result = CliRunner().invoke(app, ["dashboard", "--out", str(tmp_path / "own2"), "--features", str(feats),
                                      "--latents", "11"])
    assert result.exit_code == 0, result.output
    assert f"--features {feats.resolve()}</code>" in (tmp_path / "own2" / "latents" / "11.html").read_text()
    bad = CliRunner().invoke(app, ["dashboard", "--out", str(tmp_path / "new"), "--sae", str(tinyworld.sae_path()),
                                   "--corpus", "bogus"])  # building features from a bad SOURCE: nothing made
    assert "unknown corpus source 'bogus'" in str(bad.exception) and not (tmp_path / "new").exists()


def _handlers(session) -> dict:
    """The Blocks app's event handlers by name (what the browser calls), for driving them without a browser."""
    pytest.importorskip("gradio", reason="the ui extra")
    from llama_sae.ui.app import build_app

    return {f.name: f.fn for f in build_app(session).fns.values()}


def test_handlers_turn_every_failure_into_its_message(session):
    """A prompt past the context, an absurd seed, API-only junk: a message the page shows, not a bare 'Error'."""
    import gradio as gr

    fns, off = _handlers(session), [None, "add", 0.0, "prompt"] * 3
    with pytest.raises(gr.Error, match="exceeds the model's context of 2048"):
        list(fns["complete_fn"]("The cat sat. " * 800, False, "", 16, 0.0, 0.9, 0, *off))
    with pytest.raises(gr.Error, match="seed 1180591620717411303424 is out of range"):
        list(fns["complete_fn"]("The", False, "", 4, 1.0, 0.9, 2**70, *off))
    with pytest.raises(gr.Error, match="must be numbers") as refused:
        list(fns["complete_fn"]("The", False, "", 4, None, 0.9, 0, *off))
    assert refused.value.print_exception is False  # a user's mistake prints no traceback in the server's log
    with pytest.raises(UserError, match="slot 1: strength 'abc' is not a number"):
        slot_specs(["11", "add", "abc", "all"])
    with pytest.raises(UserError, match="is beyond float32's range"):
        session.steering(["969:add:1e308"])  # finite, but times the unit it is not
    assert len(fns["search_fn"](None)) == 20  # an empty query lists the first latents


def test_chat_without_compare_leaves_the_unsteered_column_alone(session):
    fns, off = _handlers(session), [None, "add", 0.0, "prompt"] * 3
    *_, last = fns["chat_fn"]("Hi!", [], [], False, "", 4, 0.0, 0.9, 0, *off)
    assert last[2] == [] and [m["role"] for m in last[1]] == ["user", "assistant"]


def test_regenerate_after_a_turn_the_unsteered_column_skipped(session):
    """Turn 1 with compare on, turn 2 with it off: Regenerate leaves the unsteered column as it is (compare off),
    or adds turn 2 after turn 1, generated with it as context (compare on), as a new message would."""
    fns, off = _handlers(session), [None, "add", 0.0, "prompt"] * 3
    *_, one = fns["chat_fn"]("What does the chef cook?", [], [], True, "", 4, 0.0, 0.9, 0, *off)
    steered, plain = one[-2:]
    *_, two = fns["chat_fn"]("And the baker?", steered, plain, False, "", 4, 0.0, 0.9, 0, *off)
    steered, plain = two[-2:]
    assert [m["content"] for m in plain] == [m["content"] for m in one[-1]]  # turn 2 skipped it
    *_, kept = fns["regenerate_fn"](steered, plain, False, "", 4, 0.0, 0.9, 0, *off)
    assert kept[-1] == plain and kept[-2] == steered  # greedy and unsteered: the same reply again
    *_, both = fns["regenerate_fn"](steered, plain, True, "", 4, 0.0, 0.9, 0, *off)
    assert [m["content"] for m in both[-1]][:2] == [m["content"] for m in plain]  # turn 1 kept
    assert [m["role"] for m in both[-1]] == ["user", "assistant"] * 2 and both[-1][2]["content"] == "And the baker?"
    assert both[-1][3]["content"] == both[-2][3]["content"]  # no steer: the same reply as the steered column's
    assert all(set(m) == {"role", "content"} for m in both[2])  # the Chatbot shows role and content only
    *_, again = fns["regenerate_fn"](both[-2], both[-1], True, "", 4, 0.0, 0.9, 0, *off)
    assert [m["content"] for m in again[-1]] == [m["content"] for m in both[-1]]  # replaced, not appended


def test_a_steer_link_the_slot_cannot_hold_goes_to_the_specs_box(session):
    class Request:
        def __init__(self, spec):
            self.query_params = {"steer": spec}

    on_load = _handlers(session)["on_load"]
    assert on_load(Request("11:add:8:prompt"))[:4] == ("11", "add", 8.0, "prompt")
    assert on_load(Request("resid_post.5@11:add:8:prompt"))[:4] == ("11", "add", 8.0, "prompt")  # the dashboard's
    for spec in ("11:add:8:last+2", "11:add:100"):  # positions or strength outside the slot's widgets
        box = on_load(Request(spec))[4]
        assert box == f"resid_post.5@{parse_steer(spec).spec}"
    assert on_load(Request("11:add:8:last 2"))[4] == "resid_post.5@11:add:8:last+2"  # a typed "+", URL-decoded
    assert on_load(Request(" 11:add:8:prompt "))[:4] == ("11", "add", 8.0, "prompt")  # spaces around it: trimmed


def test_token_view_rows_join_up_to_the_text(session):
    tok = session.tokenizer
    new = tok.encode(" 🦙 café 中", bos=False)
    view = session.token_view(tok.encode("The"), new)
    assert "".join(v["token"] for v in view) == tok.decode(new) and "\ufffd" not in "".join(v["token"] for v in view)


def test_chat_reads_its_history_from_state_not_from_the_chatbot(session):
    """A Chatbot's value comes back from the browser with a reply's leading space stripped, so the next turn
    would be prompted with text the model never wrote: the chat handlers read the conversations from State."""
    gr = pytest.importorskip("gradio", reason="the ui extra")
    from llama_sae.ui.app import build_app

    app = build_app(session)
    wired = {f.name: f for f in app.fns.values() if f.name in ("chat_fn", "regenerate_fn")}
    assert set(wired) == {"chat_fn", "regenerate_fn"}
    for name, f in wired.items():
        histories = f.inputs[1:3] if name == "chat_fn" else f.inputs[0:2]
        assert all(isinstance(c, gr.State) for c in histories), name
        assert [type(c) for c in f.outputs[-2:]] == [gr.State, gr.State]  # and write them back


def test_decoder_tables_stream_the_unembedding_and_match_float64(session):
    from llama_sae.ui.dashboard import decoder_tables

    sae, model, tok = session.saes[session.hook], session.model, session.tokenizer
    latents = [0, 5, 17, 969, 1023, 300, 766]
    # blocks that do not divide the vocabulary (4,096) or the latents; the last has fewer rows (4) than `top`
    logits, near = decoder_tables(model, tok, sae, latents, top=6, chunk=3, vocab_block=1364)
    ref = (sae.W_dec.double()[latents] * model.norm.weight.double()) @ model.output.weight.double().T
    special = [i for i in tok.special_tokens.values() if i < ref.shape[1]]
    ref[:, special] = float("nan")
    for row, i in enumerate(latents):
        pv, pi, nv, ni = logits[i]
        want_top = ref[row].nan_to_num(float("-inf")).topk(6)
        want_bot = (-ref[row]).nan_to_num(float("-inf")).topk(6)
        assert torch.allclose(pv.double(), want_top.values, rtol=0, atol=1e-4)  # float32 against float64
        assert torch.allclose(nv.double(), -want_bot.values, rtol=0, atol=1e-4)
        assert torch.allclose(ref[row][pi], pv.double(), atol=1e-4) and not set(pi.tolist()) & set(special)
        assert torch.allclose(ref[row][ni], nv.double(), atol=1e-4) and not set(ni.tolist()) & set(special)
        cv, ci = near[i]
        Wn = sae.W_dec.double() / sae.W_dec.double().norm(dim=-1, keepdim=True)
        cos = Wn @ Wn[i]
        cos[i] = -2.0
        assert torch.allclose(cv.double(), cos.topk(6).values, atol=1e-5) and i not in ci.tolist()
    assert decoder_tables(model, tok, sae, latents, top=6, vocab_block=1 << 20)[0][969][1].tolist() == \
        logits[969][1].tolist()  # one block gives the same tokens
