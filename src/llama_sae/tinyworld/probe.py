"""Is each planted concept linearly readable from the tiny model? Probes, baselines and a topic check.

For every concept and every layer, a logistic-regression probe is trained on train-split sentences and
scored (AUROC) on held-out sentences, on two readouts: the mean over a sentence's tokens and the
last token. A mean-pooled probe can separate word-list topics even on the embeddings, so the
embedding layer and a bag-of-words probe are reported beside the layers as baselines.
"""

from __future__ import annotations

import torch

from llama_sae.llama.model import Transformer


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of scores [N] for binary labels [N] (ties get the average rank)."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.double().argsort()
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    sorted_scores = scores.double()[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # average rank of each tie group
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_probes(x_train: torch.Tensor, y_train: torch.Tensor, l2: float = 1e-3, steps: int = 60) -> tuple:
    """One logistic regression per concept, all at once: x [N, d] float, y [N, C] {0,1} -> (W, b, mu, sd)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x = ((x_train - mu) / sd).double()
    y = y_train.double()
    W = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ W + b, y) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach(), mu, sd


def probe_scores(probe: tuple, x: torch.Tensor) -> torch.Tensor:
    """Probe logits [N, C] for features x [N, d]."""
    W, b, mu, sd = probe
    return ((x - mu) / sd).double() @ W + b


@torch.no_grad()
def sentence_features(model: Transformer, tokenizer, texts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """{"L{i} mean" / "L{i} last": [N, d]} for the embeddings (L0 = resid_pre.0) and every block output."""
    from llama_sae.sae.evaluate import token_batches

    n = model.args.n_layers
    names = ["resid_pre.0"] + [f"resid_post.{i}" for i in range(n)]
    feats: dict[str, list[torch.Tensor]] = {}
    for tokens, mask in token_batches(tokenizer, texts, batch_size=batch, max_tokens=model.args.max_seq_len):
        valid = mask.clone()
        valid[:, 0] = False  # BOS is not part of the sentence
        last = mask.sum(1) - 1  # [B]
        acts = model.capture(tokens.to(model.device), names)  # right padding: causal attention never sees it
        for layer, name in enumerate(names):
            a = acts[name].float().cpu()  # [B, T, d], on the CPU with the masks and the probes' labels
            mean = (a * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
            feats.setdefault(f"L{layer} mean", []).append(mean)
            feats.setdefault(f"L{layer} last", []).append(a[torch.arange(len(tokens)), last])
    return {k: torch.cat(v) for k, v in feats.items()}


def bag_of_words(tokenizer, texts: list[str], vocab_size: int) -> torch.Tensor:
    """Token-count features [N, vocab_size] (the trivial baseline)."""
    x = torch.zeros(len(texts), vocab_size)
    for i, t in enumerate(texts):
        ids = torch.tensor(tokenizer.encode(t, bos=False), dtype=torch.long)
        x[i].index_add_(0, ids, torch.ones(len(ids)))
    return x


def probe_table(model: Transformer, tokenizer, *, n_train: int = 3000, n_test: int = 1500, seed: int = 0
                ) -> dict:
    """AUROC per concept for every readout and the bag-of-words baseline.

    Returns:
        {"concepts": [names], "readouts": {readout: [auroc per concept]}, "n_train", "n_test"}
    """
    from llama_sae import tinyworld

    names = [c.name for c in tinyworld.concepts()]
    train = tinyworld.sentences(n_train, seed=seed, split="train")
    test = tinyworld.sentences(n_test, seed=seed, split="heldout")

    def labels(records):
        return torch.tensor([[c in r.concepts for c in names] for r in records], dtype=torch.float32)

    y_train, y_test = labels(train), labels(test)
    f_train = sentence_features(model, tokenizer, [r.text for r in train])
    f_test = sentence_features(model, tokenizer, [r.text for r in test])
    f_train["bag of words"] = bag_of_words(tokenizer, [r.text for r in train], model.args.vocab_size)
    f_test["bag of words"] = bag_of_words(tokenizer, [r.text for r in test], model.args.vocab_size)
    readouts = {}
    for key in f_train:
        scores = probe_scores(fit_probes(f_train[key], y_train), f_test[key])
        readouts[key] = [auroc(scores[:, c], y_test[:, c]) for c in range(len(names))]
    return {"concepts": names, "readouts": readouts, "n_train": n_train, "n_test": n_test}


def on_topic_rate(model: Transformer, tokenizer, *, max_new_tokens: int = 24) -> dict:
    """Greedy continuations of topic prompts, labelled by the generator's own labeller.

    Only the continuation is labelled (the prompt names its topic already). ``on_topic``: the
    continuation mentions the prompt's topic and no other; ``mentions_topic``: it mentions the topic.
    """
    from llama_sae import tinyworld
    from llama_sae.llama import generate

    prompts = tinyworld.topic_prompts()
    outs = generate(model, tokenizer, [p for p, _ in prompts], max_new_tokens=max_new_tokens)
    found = [tinyworld.label_text(o.text) for o in outs]
    mentions = [topic in f for (_, topic), f in zip(prompts, found)]
    only = [f == {topic} for (_, topic), f in zip(prompts, found)]
    return {"prompts": len(prompts), "on_topic": sum(only) / len(only), "mentions_topic": sum(mentions) / len(mentions),
            "examples": [p + o.text for (p, _), o in list(zip(prompts, outs))[:8]]}
