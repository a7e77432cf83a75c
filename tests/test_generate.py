"""Generation: greedy equals transformers', cache equals no cache, batched equals one by one."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from test_tokenizer import meta_tokenizer_model_path

from llama_sae.errors import UserError
from llama_sae.llama import generate, load_model, load_tokenizer
from llama_sae.llama.generate import generate_tokens, sample


def _run(model, prompts, n=24, **kw):
    rows = [[] for _ in prompts]
    for token, running in generate_tokens(model, prompts, max_new_tokens=n, stop_ids=kw.pop("stop_ids", set()),
                                          **kw):
        for i in running.nonzero().flatten().tolist():
            rows[i].append(int(token[i]))
    return rows


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 8)]


def test_greedy_equals_transformers_generate(hf_checkpoints):
    ref, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    prompt = _prompts()[1]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert _run(ours, [prompt])[0] == expected
    assert len(set(expected)) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("shape", ["gqa-tied-f32", "mha-untied-f8"])
def test_cache_equals_no_cache_and_batched_equals_single(hf_checkpoints, shape):
    _, path = hf_checkpoints[shape]
    ours = load_model(path)
    prompts = _prompts()
    cached = _run(ours, prompts)
    assert cached == _run(ours, prompts, use_cache=False)
    assert cached == [_run(ours, [p])[0] for p in prompts]


def test_sampling_is_repeatable_with_a_seed(hf_checkpoints):
    _, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    prompts = _prompts()
    a = _run(ours, prompts, temperature=1.0, top_p=0.9, seed=7)
    assert a == _run(ours, prompts, temperature=1.0, top_p=0.9, seed=7)
    assert a != _run(ours, prompts, temperature=1.0, top_p=0.9, seed=8)
    assert _run(ours, prompts, temperature=1.0, top_p=0.9, seed=7, use_cache=False) == a
    twice = _run(ours, [prompts[0]] * 2, temperature=1.0, top_p=0.9, seed=7)
    assert twice[0] != twice[1]  # copies of a prompt in one batch are separate samples


@pytest.mark.parametrize("temperature", [1e-30, 1e-39, 1e-45])
def test_a_tiny_temperature_is_greedy(temperature):
    logits = torch.tensor([[2.0, 7.5, -1.0, 7.25], [0.0, 0.0, 3.0, 0.0]]).bfloat16()
    g = torch.Generator().manual_seed(0)
    assert sample(logits, temperature, 1.0, g).tolist() == [1, 2]
    assert sample(logits, temperature, 0.9, g).tolist() == [1, 2]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are outside
    assert int(sample(logits, 0.0, 1.0, None)) == 0


def test_stops_at_stop_token(hf_checkpoints):
    _, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    prompt = _prompts()[0]
    free = _run(ours, [prompt])[0]
    stop = free[5]
    first = free.index(stop)
    got = _run(ours, [prompt], stop_ids={stop})[0]
    assert got == free[: first + 1]  # the stop token is the last yielded token


@pytest.fixture(scope="module")
def llama_vocab_model(tmp_path_factory):
    """A random tiny model with the real Llama 3 vocabulary and tokenizer (for text-level tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      initializer_range=0.5)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-vocab")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return load_model(path), load_tokenizer(meta_tokenizer_model_path())


def test_text_generation_streams_the_same_text(llama_vocab_model):
    model, tok = llama_vocab_model
    prompts = ["Hello, world", "Ünïcödé and emoji 🦙 make"]
    full = generate(model, tok, prompts, max_new_tokens=12, temperature=0.9, seed=1)
    pieces = ["", ""]
    for chunk in generate(model, tok, prompts, max_new_tokens=12, temperature=0.9, seed=1, stream=True):
        pieces[chunk.index] += chunk.text
    for c, streamed in zip(full, pieces):
        assert streamed == c.text == tok.decode(c.tokens)
        assert len(c.tokens) >= 1


def test_chat_prompt_is_llama3_format(llama_vocab_model):
    model, tok = llama_vocab_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = generate(model, tok, messages, chat=True, max_new_tokens=3)[0]
    assert out.prompt_tokens[:2] == [128000, 128006]
    header = [128006, *tok.encode("assistant", bos=False), 128007, *tok.encode("\n\n", bos=False)]
    assert out.prompt_tokens[-len(header):] == header


def test_bad_generation_inputs(llama_vocab_model):
    model, tok = llama_vocab_model
    with pytest.raises(UserError, match="exceeds the model's context"):
        generate(model, tok, "hi", max_new_tokens=10**6)
    n = model.args.max_seq_len  # the last new token is never fed back: a full context still gives one more
    assert len(_run(model, [[5] * n], n=1)[0]) == 1
    with pytest.raises(UserError, match=f"exceeds the model's context of {n} by 1:"):
        _run(model, [[5] * n], n=2)
    with pytest.raises(UserError, match="at least one token"):
        generate(model, tok, [[]], max_new_tokens=2)
    with pytest.raises(UserError, match="max_new_tokens is -1: ask for 0 or more"):
        generate(model, tok, "hi", max_new_tokens=-1)
    with pytest.raises(UserError, match="token id 128256 is outside this model's vocabulary 0..128255"):
        generate(model, tok, [[1, 128256]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"tokens of shape \(3,\): the model takes \[batch, seq\]"):
        model(torch.tensor([1, 2, 3]))
    assert generate(model, tok, "hi", max_new_tokens=0)[0].tokens == []


def test_empty_stop_ids_means_no_stop(hf_checkpoints):
    """stop_ids=set() runs to max_new_tokens even through the tokenizer's stop tokens; None uses them."""
    _, path = hf_checkpoints["gqa-tied-f32"]
    model = load_model(path)
    free = _run(model, [_prompts()[0]])[0]

    class Tok:
        bos_id, pad_id, stop_ids = 1, 0, frozenset({free[2]})

        def decode(self, ids):
            return " ".join(map(str, ids))

    assert generate(model, Tok(), [_prompts()[0]], max_new_tokens=24, stop_ids=set())[0].tokens == free
    stopped = generate(model, Tok(), [_prompts()[0]], max_new_tokens=24)[0]
    assert stopped.stop_reason == "stop" and stopped.tokens == free[:free.index(free[2])]


def test_the_model_is_free_between_the_chunks_of_a_stream(hf_checkpoints):
    """The KV cache is the generation's own: plain forwards between two chunks, in or out of inference mode,
    neither fail nor change the stream."""
    _, path = hf_checkpoints["gqa-tied-f32"]
    model, prompt = load_model(path), _prompts()[1]
    want = _run(model, [prompt])[0]
    other = torch.tensor([_prompts()[0]])
    clean = model(other)
    got = []
    for i, (token, _) in enumerate(generate_tokens(model, [prompt], max_new_tokens=24, stop_ids=set())):
        got.append(int(token[0]))
        if i % 2:
            assert torch.equal(model(other), clean)
        else:
            with torch.inference_mode():
                assert torch.equal(model(other), clean)
    assert got == want
