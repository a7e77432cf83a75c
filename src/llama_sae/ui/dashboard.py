"""``llama-sae dashboard``: a static HTML feature dashboard that opens from disk (no server, no network).

    out/index.html          every latent in one table: explanation, score, frequency; a search box
    out/latents/<i>.html    one page per latent: explanation and scores, top and quantile sentences with
                            per-token colour, the activation histogram, the top positive and negative logits of
                            its decoder direction, its nearest latents by decoder cosine, a link to steer it

Logits of a decoder direction: the direction times the final RMSNorm's weight, through the unembedding (the
"logit lens" of a unit push along the latent, ignoring the later blocks).
"""

from __future__ import annotations

import bisect
import html
import json
from pathlib import Path
from urllib.parse import quote

import torch
from torch import Tensor

from llama_sae.fileio import atomic_write, lock_output, sweep_temp_files

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:20px} h2{font-size:16px;margin-top:24px;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums} .muted{color:#777}
.sent{margin:3px 0;font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap}
.tok{border-radius:2px} .cols{display:flex;gap:32px;flex-wrap:wrap} a{color:#0b5cad}
#search{font-size:15px;padding:6px;width:420px} .pos{color:#0a7a2f} .neg{color:#b3261e}
"""
SEARCH_JS = """
const box=document.getElementById('search');
box.addEventListener('input',()=>{const q=box.value.toLowerCase().trim();let n=0;
for(const r of document.querySelectorAll('#latents tbody tr')){
const hit=!q||r.dataset.text.includes(q)||r.dataset.id===q; r.style.display=hit?'':'none';n+=hit;}
document.getElementById('count').textContent=n;});
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}{f'<script>{script}</script>' if script else ''}</body></html>")


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def sentence_html(tokens: list[str], acts: list[float], scale: float) -> str:
    """One sentence, each token's background as strong as its activation / scale; the value on hover."""
    spans = []
    for t, a in zip(tokens, acts):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale))
        spans.append(f"<span class='tok' style='background:rgba(255,136,0,{alpha:.2f})' title='{a:.3f}'>"
                     f"{html.escape(t)}</span>")
    return "<div class='sent'>" + "".join(spans) + "</div>"


def histogram_svg(edges, counts, width: int = 460, height: int = 140) -> str:
    """An SVG bar chart of a log-binned histogram, as density (fraction of the latent's activations per bin)."""
    if len(counts) == 0:
        return "<p class='muted'>never fired on the corpus</p>"
    total = float(sum(counts))
    peak = max(counts) / total
    bw = width / len(counts)
    bars = "".join(
        f"<rect x='{i * bw:.1f}' y='{height - 20 - (c / total) / peak * (height - 30):.1f}' width='{bw - 1:.1f}' "
        f"height='{(c / total) / peak * (height - 30):.1f}' fill='#f08a24'><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: "
        f"{c / total:.1%}</title></rect>" for i, c in enumerate(counts))
    labels = (f"<text x='0' y='{height - 4}' font-size='11'>{edges[0]:.3g}</text>"
              f"<text x='{width}' y='{height - 4}' font-size='11' text-anchor='end'>{edges[-1]:.3g}</text>"
              f"<text x='{width / 2}' y='{height - 4}' font-size='11' text-anchor='middle'>activation (log bins)"
              f"</text><text x='2' y='10' font-size='11'>density, peak {peak:.1%}</text>")
    return f"<svg width='{width}' height='{height}' role='img' aria-label='activation histogram'>{bars}{labels}</svg>"


@torch.no_grad()
def decoder_tables(model, tokenizer, sae, latents: list[int], top: int = 10, chunk: int = 256,
                   vocab_block: int = 16384
                   ) -> tuple[dict[int, tuple[Tensor, Tensor, Tensor, Tensor]], dict[int, tuple[Tensor, Tensor]]]:
    """Per latent: (top logit values, token ids, bottom values, ids) of its decoder direction through the final
    norm weight and the unembedding (special tokens left out); and (cosines, latent ids) of its nearest latents
    by decoder direction.

    The unembedding is read in blocks of ``vocab_block`` rows, each cast to float32 once, and every latent's
    running top and bottom ``top`` are merged block by block: no float32 copy of the whole unembedding (1.6 GB
    for Llama 3.2-3B's bf16 one)."""
    W = sae.W_dec.float()  # [n, d]
    unembed = model.output.weight  # [V, d], the model's dtype
    gain = model.norm.weight.float()  # [d]
    n_vocab = unembed.shape[0]
    special = torch.zeros(n_vocab, dtype=torch.bool, device=unembed.device)  # [V] special tokens: not shown
    special[[i for i in tokenizer.special_tokens.values() if i < n_vocab]] = True
    ids = torch.tensor(latents, dtype=torch.long, device=W.device)
    top_v = torch.full((len(latents), top), float("-inf"), device=W.device)  # running best, per latent
    top_i = torch.zeros((len(latents), top), dtype=torch.long, device=W.device)
    bot_v, bot_i = top_v.clone(), top_i.clone()  # of the negated logits
    for v0 in range(0, n_vocab, vocab_block):
        block = unembed[v0:v0 + vocab_block].float()  # [b, d]
        masked = special[v0:v0 + vocab_block]
        for lo in range(0, len(latents), chunk):
            rows = slice(lo, lo + chunk)
            lg = (W[ids[rows]] * gain) @ block.T  # [c, b]
            for best_v, best_i, sign in ((top_v, top_i, 1.0), (bot_v, bot_i, -1.0)):
                v, i = (sign * lg).masked_fill(masked, float("-inf")).topk(min(top, lg.shape[1]), dim=-1)
                merged_v, at = torch.cat([best_v[rows], v], 1).topk(top, dim=-1)
                best_i[rows] = torch.cat([best_i[rows], i + v0], 1).gather(1, at)
                best_v[rows] = merged_v
    Wn = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits, near = {}, {}
    for lo in range(0, len(latents), chunk):
        chunk_ids = ids[lo:lo + chunk]
        cos = Wn[chunk_ids] @ Wn.T  # [c, n]
        cos[torch.arange(len(chunk_ids)), chunk_ids] = -2.0  # not itself
        cv, ci = cos.topk(min(top, W.shape[0] - 1), dim=-1)
        pv, pi, nv, ni, cv, ci = (t.cpu() for t in (top_v[lo:lo + chunk], top_i[lo:lo + chunk],
                                                     bot_v[lo:lo + chunk], bot_i[lo:lo + chunk], cv, ci))
        for j, i in enumerate(chunk_ids.tolist()):  # one copy per chunk, not per latent
            logits[i] = (pv[j], pi[j], -nv[j], ni[j])
            near[i] = (cv[j], ci[j])
    return logits, near


def _link(j: int, has_page: set[int]) -> str:
    """Latent ``j`` as a link to its page, or as plain text when it has none (not among the shown latents)."""
    return f"<a href='{j}.html'>{j}</a>" if j in has_page else str(j)


def _token_list(tokenizer, values: Tensor, ids: Tensor, cls: str) -> str:
    rows = "".join(f"<tr><td class='{cls} num'>{v:+.2f}</td><td><code>{html.escape(repr(tokenizer.decode([t])))}"
                   f"</code></td></tr>" for v, t in zip(values.tolist(), ids.tolist()))
    return f"<table>{rows}</table>"


def latent_page(i: int, features, tokenizer, logits, near, ui_url: str, n_examples: int,
                shown: list[int], has_page: set[int], hook: str | None = None, ui_command: str = "llama-sae ui"
                ) -> str:
    """The HTML page of latent ``i``; ``shown`` the sorted latents that get a page, ``has_page`` the same as a
    set (links go only to those)."""
    e = features.explanation(i)
    top = features.examples(i, "max", n_examples)
    quant = features.examples(i, "quantile")
    scale = max((max(x.acts, default=0.0) for x in top), default=0.0)
    freq, unit = float(features.frequency[i]), float(features.typical_max[i])
    spec = f"{hook + '@' if hook else ''}{i}:add:8:prompt"  # the hook makes a UI with another SAE refuse it
    nav = ["<a href='../index.html'>← all latents</a>"]
    at = bisect.bisect_left(shown, i)
    if at > 0:
        nav.append(f"<a href='{shown[at - 1]}.html'>← {shown[at - 1]}</a>")
    if at + 1 < len(shown):
        nav.append(f"<a href='{shown[at + 1]}.html'>{shown[at + 1]} →</a>")
    head = f"<p>{' · '.join(nav)}</p><h1>latent {i}</h1>"
    expl = (f"<p><b>explanation:</b> <span id='explanation'>{html.escape(e.text)}</span></p>"
            f"<p>detection {_fmt(e.detection)} · fuzzing {_fmt(e.fuzzing)} (balanced accuracy)"
            f"{'' if e.backend is None else ' · by ' + html.escape(e.backend)}</p>") if e else (
        "<p class='muted'>no explanation yet (run <code>llama-sae explain</code> and <code>score</code>)</p>")
    link = f"{html.escape(ui_url)}/?steer={html.escape(quote(spec, safe='@:.'))}"
    stats = (f"<p>fires on {freq:.3%} of tokens · typical max activation {unit:.3g} · "
             f"<a id='steer' href='{link}'>steer it in the UI</a> <span class='muted'>(<code>"
             f"{html.escape(ui_command)}</code>; or <code>--steer {html.escape(spec)}</code> on the CLI)</span></p>")
    top_html = "".join(sentence_html(x.tokens, x.acts, scale) for x in top) or "<p class='muted'>none</p>"
    quant_html = "".join(f"<div class='muted'>quantile {x.quantile}</div>" + sentence_html(x.tokens, x.acts, scale)
                         for x in quant) or "<p class='muted'>none</p>"
    pv, pi, nv, ni = logits[i]
    cv, ci = near[i]
    near_html = "".join(f"<tr><td>{_link(j, has_page)}</td><td class='num'>{c:.3f}</td>"
                        f"<td>{html.escape(_explanation_text(features, j))}</td></tr>"
                        for c, j in zip(cv.tolist(), ci.tolist()))
    body = (head + expl + stats
            + f"<h2>top activating sentences</h2>{top_html}"
            + f"<h2>quantile samples (lowest first)</h2>{quant_html}"
            + "<div class='cols'><div><h2>activation histogram</h2>"
            + histogram_svg(*features.histogram(i)) + "</div>"
            + f"<div><h2>top positive logits</h2>{_token_list(tokenizer, pv, pi, 'pos')}</div>"
            + f"<div><h2>top negative logits</h2>{_token_list(tokenizer, nv, ni, 'neg')}</div></div>"
            + f"<h2>nearest latents (decoder cosine)</h2><table>{near_html}</table>")
    return _page(f"latent {i}", body)


def _explanation_text(features, i: int) -> str:
    e = features.explanation(i)
    return "" if e is None else e.text


def index_page(features, latents: list[int], title: str) -> str:
    """The searchable table of every latent on the dashboard."""
    rows = []
    for i in latents:
        e = features.explanation(i)
        text = "" if e is None else e.text
        rows.append(f"<tr data-id='{i}' data-text='{html.escape(text.lower())}'><td><a href='latents/{i}.html'>{i}"
                    f"</a></td><td>{html.escape(text)}</td><td class='num'>{_fmt(e and e.detection)}</td>"
                    f"<td class='num'>{float(features.frequency[i]):.3%}</td>"
                    f"<td class='num'>{float(features.typical_max[i]):.3g}</td></tr>")
    body = (f"<h1>{html.escape(title)}</h1><p><input id='search' placeholder='search explanations or a latent id'>"
            f" <span id='count'>{len(latents)}</span> latents</p><table id='latents'><thead><tr><th>latent</th>"
            "<th>explanation</th><th>detection</th><th>frequency</th><th>typical max</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")
    return _page(title, body, SEARCH_JS)


def write_dashboard(out: Path, features, sae, model, tokenizer, *, latents: list[int] | None = None,
                    ui_url: str = "http://127.0.0.1:7860", n_examples: int = 10,
                    ui_command: str = "llama-sae ui") -> Path:
    """Write the dashboard for ``latents`` (default: every latent that fired) under ``out``; returns index.html."""
    from llama_sae.splice import check_fits

    features.check_sae(sae)
    check_fits(model, sae)  # its decoder goes through this model's unembedding: another model's is refused
    out = Path(out)
    with lock_output(out, f"the dashboard {out}"):  # two runs: one deletes the other's pages
        (out / "latents").mkdir(parents=True, exist_ok=True)
        for directory in (out, out / "latents"):  # temp files of a killed run's writes
            sweep_temp_files(directory)
        latents = features.live_latents() if latents is None else latents
        logits, near = decoder_tables(model, tokenizer, sae, latents)
        has_page = set(latents)
        shown = sorted(has_page)
        for i in latents:
            atomic_write(out / "latents" / f"{i}.html",
                         latent_page(i, features, tokenizer, logits, near, ui_url, n_examples, shown, has_page,
                                     sae.cfg.hook_name, ui_command))
        meta = features.meta
        title = f"SAE features: {meta.get('hook_name', sae.cfg.hook_name)}, {sae.cfg.d_sae:,} latents, k = {sae.cfg.k}"
        atomic_write(out / "index.html", index_page(features, latents, title))
        for page in (out / "latents").glob("*.html"):  # pages of an earlier run's other latents
            if not page.stem.isdecimal() or int(page.stem) not in has_page:
                page.unlink()
        atomic_write(out / "dashboard.json", json.dumps({"latents": latents, "features": str(features.path),
                                                         "ui_url": ui_url}) + "\n")
        return out / "index.html"
