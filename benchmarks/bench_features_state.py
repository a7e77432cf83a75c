"""Cost of the features pass's running tables (``_State.update``) at the seed's SAE width, per batch.

At 65,536 latents the per-batch bookkeeping of pass 1 (firing counts, histogram, per-(sentence, latent)
aggregates, and five top-N merges: max, mean, last, reservoir, pool) runs on the host while the model and
encoder may run on a GPU, so it bounds the features pass there. This times one ``update`` of a batch of
``--batch`` sentences of ``--tokens`` tokens with k active latents each (synthetic codes: latent popularity
skewed like a power law, as in trained SAEs), in CPU time, interleaved over ``--repeats`` rounds:

* merge_top_   the shipped merge: sorts the P candidates only, and places each row's old entries by counting
* sort-all     the previous merge, kept here as the baseline: one stable sort of the candidates together with
               every touched row's N old entries

Both start from the same tables (filled by ``--fill`` earlier batches, so that candidates compete with full
rows) and must leave identical tables.

    python benchmarks/bench_features_state.py
    python benchmarks/bench_features_state.py --d-sae 131072 --batch 128
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import interleaved, machine_info, print_json, print_machine, print_table

import llama_sae.features as features


def sort_all_merge_(score, payload, rows, new_score, new_payload) -> None:
    """The baseline: merge_top_'s semantics by sorting candidates and touched rows' old entries together."""
    keep = new_score.to(score.dtype) > score[rows, -1]
    rows, new_score, new_payload = rows[keep], new_score[keep], [q[keep] for q in new_payload]
    if rows.numel() == 0:
        return
    N = score.shape[1]
    touched = rows.unique()
    all_rows = torch.cat([touched.repeat_interleave(N), rows])
    all_score = torch.cat([score[touched].flatten(), new_score.to(score.dtype)])
    all_pay = [torch.cat([p[touched].flatten(), q.to(p.dtype)]) for p, q in zip(payload, new_payload)]
    order = torch.argsort(all_score, descending=True, stable=True)
    order = order[torch.argsort(all_rows[order], stable=True)]
    sorted_rows = all_rows[order]
    _, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    keep = rank < N
    r, k, o = sorted_rows[keep], rank[keep], order[keep]
    score[r, k] = all_score[o]
    for p, q in zip(payload, all_pay):
        p[r, k] = q[o]


def synthetic_batch(g: torch.Generator, d_sae: int, k: int, batch: int, tokens: int):
    """(vals, idx, owner, last_row, n_tok) of one batch, as ``_State.update`` takes them."""
    M = batch * tokens
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(M)]) if d_sae <= 4096 else \
        (torch.rand(M, k, generator=g) ** 3 * d_sae).long().clamp_max_(d_sae - 1)  # popular latents: low ids
    vals = torch.rand(M, k, generator=g) * 4
    owner = torch.arange(batch).repeat_interleave(tokens)
    last_row = torch.zeros(M, dtype=torch.bool)
    last_row[tokens - 1::tokens] = True
    return vals, idx, owner, last_row, torch.full((batch,), tokens)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="sentences per batch (build_features' default)")
    ap.add_argument("--tokens", type=int, default=30, help="tokens per sentence")
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--fill", type=int, default=8, help="batches folded in before timing")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info(1)
    g = torch.Generator().manual_seed(0)
    state = features._State(args.d_sae, args.top_n, reservoir=8, pool=512)
    for b in range(args.fill):
        state.update(*synthetic_batch(g, args.d_sae, args.k, args.batch, args.tokens), b * args.batch, 0)
    batch = synthetic_batch(g, args.d_sae, args.k, args.batch, args.tokens)
    first = args.fill * args.batch

    def run(merge):
        def go():
            s = copy.deepcopy(state)
            features.merge_top_ = merge
            try:
                s.update(*batch, first, 0)
            finally:
                features.merge_top_ = shipped
            return s
        return go

    shipped = features.merge_top_
    clock = time.process_time
    medians, _, last = interleaved({"merge_top_": run(shipped), "sort-all": run(sort_all_merge_)}, args.repeats,
                                   clock=clock)
    copy_s, _, _ = interleaved({"copy": lambda: copy.deepcopy(state)}, args.repeats, clock=clock)
    same = all(torch.equal(last["merge_top_"].t[n], last["sort-all"].t[n]) for n in state.t)
    cost = {n: m - copy_s["copy"] for n, m in medians.items()}  # the deep copy of the tables is not the update's
    print_machine(info)
    print(f"d_sae {args.d_sae}, k {args.k}, {args.batch} sentences x {args.tokens} tokens, top {args.top_n}; "
          f"tables equal: {same}")
    print_table(["merge", "update s", "vs sort-all"],
                [[n, f"{c:.3f}", f"{cost['sort-all'] / c:.2f}x"] for n, c in cost.items()])
    print_json({"benchmark": "features_state", **info, **vars(args), "update_s": cost, "tables_equal": same,
                "speedup": cost["sort-all"] / cost["merge_top_"]})


if __name__ == "__main__":
    main()
