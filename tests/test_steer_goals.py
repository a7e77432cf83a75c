"""Choosing a steer against issue 9's goals: the goal margin, and pick_steer on the shipped tiny model and SAE."""

from __future__ import annotations

import itertools

import pytest

from llama_sae.steer import parse_steer
from llama_sae.tinyworld.steering import choose_run, goal_margin, meets_goals, pick_steer


def test_goal_margin_is_positive_exactly_when_all_goals_are_met():
    grid = itertools.product((0.7, 0.8, 0.81, 1.0), (0.0, 0.1, 0.12, 0.5), (0.9, 1.5, 1.51, 3.0))
    for on, off, ppl in grid:
        r = {"on_topic": on, "off_target": off, "ppl_ratio": ppl}
        assert (goal_margin(r) >= 0) == meets_goals(r), r
    # the tightest goal decides: 100% on-topic does not make up for 9% off-target
    tight = {"on_topic": 1.0, "off_target": 0.09, "ppl_ratio": 1.0}
    roomy = {"on_topic": 0.9, "off_target": 0.0, "ppl_ratio": 1.2}
    assert goal_margin(tight) == pytest.approx(0.1) and goal_margin(roomy) == pytest.approx(0.5)


def test_the_weakest_steer_that_meets_every_goal_is_chosen_over_the_roomiest():
    def run(strength, on, off, ppl):
        return {"strength": strength, "on_topic": on, "off_target": off, "ppl_ratio": ppl}

    weak, roomy, weak_tight = run(3, 1.0, 0.01, 1.32), run(8, 1.0, 0.02, 1.29), run(3, 0.9, 0.05, 1.45)
    assert goal_margin(roomy) > goal_margin(weak) > goal_margin(weak_tight) > 0
    assert choose_run([roomy, weak_tight, weak]) is weak  # weakest first, then the margin between equals
    missed = [run(3, 0.5, 0.4, 1.1), run(8, 0.95, 0.05, 1.6)]  # none meets every goal: the most room
    assert choose_run(missed + [run(5, 0.85, 0.2, 1.4)]) is missed[1]


def test_pick_steer_screens_then_sweeps_the_finalists(one_thread):
    import math

    import torch

    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.sae import load
    from llama_sae.steer import estimate_units
    from llama_sae.tinyworld.steering import continuation_nll, sample_continuations

    path = tinyworld.model_path()
    model, tok = load_model(path), load_tokenizer(path)
    sae = load(tinyworld.sae_path())
    hook = sae.cfg.hook_name
    units = {hook: estimate_units(model, tok, sae, n_sentences=32)}
    nll, n = continuation_nll(model, sample_continuations(model, tok, tinyworld.neutral_prompts(), None, samples=1))
    candidates = [628, 5, 77]
    best, runs = pick_steer(model, tok, {hook: sae}, units, "astronomy", candidates, math.exp(nll / n),
                            strengths=(4.0, 12.0), screen_strength=12.0, finalists=2, samples=1)
    screen = [r for r in runs if r["stage"] == "screen"]
    assert [r["latent"] for r in screen] == candidates
    finalists = sorted(screen, key=goal_margin, reverse=True)[:2]
    sweep = [r for r in runs if r["stage"] == "sweep"]
    assert sorted(r["latent"] for r in sweep) == sorted(r["latent"] for r in finalists)  # one more strength each
    assert all(r["strength"] == 4.0 for r in sweep)
    finalist_runs = [r for r in runs if r["latent"] in {f["latent"] for f in finalists}]
    assert best == choose_run(finalist_runs)
    steer = parse_steer(best["spec"])
    assert steer.positions == "last" and steer.kind == "add" and steer.latent == best["latent"]
    assert len({r["ppl_ratio"] for r in runs}) > 1 and all(torch.isfinite(torch.tensor(r["ppl_ratio"])) for r in runs)
