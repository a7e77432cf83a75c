"""TopK sparse autoencoder with sparse kernels, plus the plain dense reference it is tested against.

References: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (OpenAI: TopK, aux-k, init),
EleutherAI sparsify (fused encoder, sparse decoder), SAELens v6 (file format, layer_norm normalization).

Shape key: N tokens, d = d_in (the Llama width), n = d_sae (latents), k selected latents per token,
k_aux dead latents used by the aux-k loss.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

LN_EPS = 1e-5  # SAELens's layer_norm eps; the seed used 1e-6. Matching SAELens keeps the format exact.
PRE_BUFFER_BYTES = 256 << 20  # the encoder works on row blocks whose pre-activations fit in this
SMALL_SELECT = 1 << 16  # select_topk runs a plain topk over at most this many pre-activations
NUMPY_SELECT_THREADS = 2  # select_topk's numpy path beats torch.topk up to this many torch threads
SORT_WIDTH = 512  # top_k_positions sorts rows up to this wide to find the k-th value, and partitions wider ones
AUG_ALIGN = 8  # on a GPU the augmented GEMM's K (d + 1) is padded with zeros to a multiple of this: bf16 rows whose
# length is not a multiple of 8 (16 bytes) miss the tensor-core kernels (K = 3,073 ran 6x slower on an H200). On a
# CPU K stays d + 1 (padding gains nothing measured there, and would change float32 training's rounding).
AUX_DENSE_RATIO = 16  # aux-k runs dense over the dead latents when n_dead <= this x k_aux (>= 1/16 selected)
CANDIDATE_MARGIN = 2.0 ** -5  # low-precision selection on a CPU keeps every latent whose pre-activation lies within
# this fraction of a lower bound on the k-th largest, and ranks them by their exact values. bf16's output rounding
# alone moves a value by up to 2^-9 of itself; with this margin no row of 40,000 demo tokens missed an exact top-k
# latent (with none, 2.3% of rows did).
CANDIDATE_DENSE = 32  # more candidates than 4k and 1/this of the latents: the chunk takes a float32 GEMM (a
# sampled GEMM runs ~20x slower per multiply-add than a dense one)
CANDIDATE_BLOCK = 1 << 18  # that selection works on row chunks of about this many pre-activations (1 MiB of
# float32 temporaries, which stay in cache: 1.1-2x faster than 16 MiB chunks at the demo's shapes)


class SAEConfig(BaseModel):
    """What an SAE needs at inference: shape, k, normalization and where it reads the model.

    Field names follow SAELens v6's cfg.json, so saving and loading need no renaming table.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    d_in: int = Field(gt=0, description="width of the activations (the Llama d_model for residual hooks)")
    d_sae: int = Field(gt=0, description="number of latents")
    k: int = Field(gt=0, description="latents kept per token (TopK)")
    normalize_activations: Literal["none", "layer_norm"] = Field(
        "layer_norm", description="per-token input normalization, undone on output (SAELens semantics)")
    hook_name: str | None = Field(None, description="hook point the activations come from, e.g. resid_post.8")
    model_name: str | None = Field(None, description="model the activations come from")
    context_size: int | None = Field(None, description="tokens per sequence at capture time")
    prepend_bos: bool = Field(True, description="whether captured sequences started with BOS")

    @model_validator(mode="after")
    def _k_below_width(self) -> SAEConfig:
        if self.k >= self.d_sae:
            raise ValueError(f"k={self.k} must be smaller than d_sae={self.d_sae}: lower k or add latents")
        return self


class TrainOutput(NamedTuple):
    """One training forward pass, all in the normalized space the SAE sees."""

    xc: torch.Tensor  # [N, d] input minus b_dec (what the encoder multiplies)
    recon: torch.Tensor  # [N, d] reconstruction x̂, b_dec included
    top_acts: torch.Tensor  # [N, k] ReLU'd values of the selected latents
    top_indices: torch.Tensor  # [N, k]
    aux_acts: torch.Tensor  # [N, k_aux] ReLU'd values of the dead latents chosen for aux-k (k_aux may be 0)
    aux_indices: torch.Tensor  # [N, k_aux]
    auxk_recon: torch.Tensor | None  # [N, d] aux-k reconstruction from dead latents, no b_dec; None if none dead
    dead: torch.Tensor | None = None  # [n_dead] the dead latents
    aux_dense: torch.Tensor | None = None  # [N, n_dead] aux-k activations over the dead latents (dense path)


# --------------------------------------------------------------------------- init
def orthogonal(rows: int, cols: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """torch.nn.init.orthogonal_'s matrix [rows, cols] (the QR of a Gaussian, signs fixed by R's diagonal),
    with the Gaussian drawn on the CPU (the same numbers on every device) and the QR run on ``device`` when it is
    a CUDA GPU (elsewhere on the CPU: MPS has no QR): the seed's [65536, 3072] init took 6 s on an H200 instead of
    30 s with the QR on 2 CPU threads. On the CPU it equals orthogonal_ bit for bit."""
    on = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    a = torch.empty(rows, cols).normal_(0, 1, generator=generator).to(on)
    tall = rows >= cols
    q, r = torch.linalg.qr(a if tall else a.t())
    q *= torch.diagonal(r).sign()
    return (q if tall else q.t()).to(device)


# --------------------------------------------------------------------------- normalization
def normalize(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """SAELens's per-token layer_norm: x̃ = (x - mean) / (std + eps), std with Bessel's correction.

    Args: x [N, d] any float dtype. Returns (x̃ [N, d] float32, mean [N, 1] or None, std [N, 1] or None).
    """
    x = x.float()  # upcast island: statistics in float32
    if mode == "none":
        return x, None, None
    mu = x.mean(-1, keepdim=True)  # [N, 1]
    xc = x - mu
    std = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).div_((x.shape[-1] - 1) ** 0.5)  # [N, 1], unbiased
    return xc.div_(std + LN_EPS), mu, std  # (torch.std_mean gives the same, ~8x slower on CPU)


def denormalize(y: torch.Tensor, mu: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`normalize` on a reconstruction [N, d] (SAELens: y * std + mean, no eps)."""
    return y if mu is None else y * std + mu


# --------------------------------------------------------------------------- sparse kernels
def select_topk(pre: torch.Tensor, k: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU(TopK(pre)) along the last dim: (values [M, k] in pre's dtype, indices [M, k]), unsorted; exact
    (ties broken arbitrarily), and faster than one topk over wide rows.

    The n latents form n / group blocks of ``group`` strided latents {j, j + n/group, ...}. A latent in the
    top k lies in one of the k blocks with the largest maxima (otherwise k other blocks would each hold a
    larger value), so one cheap max pass and a top-k over the block maxima leave k * group candidates.
    With up to NUMPY_SELECT_THREADS CPU threads both top-k steps are numpy selections (:func:`top_k_positions`,
    single-threaded): faster than torch.topk on float32 with one thread, and than its row-parallel loop on two
    (13-29% at the shapes measured); with more threads torch.topk runs.
    """
    M, n = pre.shape
    if group is None:  # 16 where it fits (fastest at 8,192 latents); narrower SAEs still prune with 8 or 4
        group = _group(n, k) or 16
    if M * n <= SMALL_SELECT:  # a few tokens (generation steps): one topk call, no per-call overheads
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return vals.relu_(), idx
    top = _top_k_cpu if pre.device.type == "cpu" and torch.get_num_threads() <= NUMPY_SELECT_THREADS else _top_k_torch
    if n % group or 4 * k * group > n:
        pos = top(pre, k)
        return pre.gather(1, pos).relu_(), pos
    m = n // group
    grouped = pre.view(M, group, m)  # latent t·m + j sits at [:, t, j]
    blocks = top(grouped.amax(1), k)  # [M, k]
    cand = grouped.gather(2, blocks[:, None, :].expand(M, group, k)).view(M, group * k)  # [M, group·k]
    pos = top(cand, k)  # pos = t·k + slot
    return cand.gather(1, pos).relu_(), blocks.gather(1, pos % k) + (pos // k) * m


def _top_k_torch(a: torch.Tensor, k: int) -> torch.Tensor:
    return a.topk(k, dim=-1, sorted=False).indices


def _top_k_cpu(a: torch.Tensor, k: int) -> torch.Tensor:
    a = a.detach()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()  # numpy has no bfloat16; float32 holds bf16 and fp16 values exactly
    return torch.from_numpy(top_k_positions(a.numpy(), k))


def top_k_positions(a: np.ndarray, k: int) -> np.ndarray:
    """Positions [M, k] (int64, in no particular order) of the k largest entries of each row of a [M, w].

    numpy finds each row's k-th largest value (values only: a sort for rows up to SORT_WIDTH wide, where
    the AVX-512 sorting networks beat introselect, else a partition; both ~3x cheaper than argpartition),
    and the entries at or above it are the top k. Every row holds at least k of them, so when the whole
    matrix holds M·k and no NaN, each row holds exactly k. Otherwise the rows where that is not exactly k
    entries (ties at the k-th value, NaN) take a full argpartition; NaN ranks above every number, as in
    torch.topk.
    """
    M, w = a.shape
    kth = np.sort(a, axis=-1)[:, w - k, None] if w <= SORT_WIDTH else np.partition(a, w - k, axis=-1)[:, w - k, None]
    mask = a >= kth  # [M, w]
    if np.count_nonzero(mask) == M * k and not np.isnan(a).any():
        pos = np.flatnonzero(mask).reshape(M, k)
        pos -= np.arange(0, M * w, w)[:, None]  # flat position -> position in its row (cheaper than % w)
        return pos
    mask |= np.isnan(a)  # NaN compares False: count it, so that its row takes the argpartition
    ok = np.count_nonzero(mask, axis=1) == k
    out = np.empty((M, k), dtype=np.int64)
    out[ok] = (np.flatnonzero(mask[ok]) % w).reshape(-1, k)
    out[~ok] = np.argpartition(a[~ok], w - k, axis=-1)[:, w - k:]
    return out


def row_norm_rms(W_enc: torch.Tensor, b_enc: torch.Tensor) -> float:
    """The RMS of the row norms of [W_enc | b_enc] (one pass over the weights: :func:`encode_select` takes it once
    per call, as the weights may have changed since, in place, by an optimizer step that bumps no version)."""
    w, b = W_enc.detach(), b_enc.detach()  # (vector_norm reads them once; pow().sum() copied W_enc: 40x slower)
    return float((torch.linalg.vector_norm(w) ** 2 + torch.linalg.vector_norm(b) ** 2) / w.shape[0]) ** 0.5


def _group(n: int, k: int) -> int | None:
    """The block size of :func:`select_topk`'s strided blocks for rows of n latents (None: too narrow to prune)."""
    return next((g for g in (16, 8, 4) if n % g == 0 and 4 * k * g <= n), None)


@torch.no_grad()
def topk_by_candidates(pre: torch.Tensor, k: int, xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                       w_rms: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU(TopK) of the exact pre-activations xc · W_encᵀ + b_enc, given pre [M, n], the same computed in a lower
    precision (CPU only): (values [M, k] in W_enc's dtype, indices [M, k]). ``w_rms``: :func:`row_norm_rms` of
    these weights (computed here when not given).

    The low-precision values only choose candidates. τ, the k-th largest of the strided blocks' maxima (see
    :func:`select_topk`), is at most the k-th largest pre-activation; every latent within CANDIDATE_MARGIN of it
    or above is a candidate (k to ~1.2k per row), the margin relative to |τ| or to the scale of the input
    rounding's error if larger (absolute: a k-th value near 0, or a sum that cancels, still needs room). Only the
    candidates' exact values are computed (a sampled GEMM over their CSR pattern, ~1.2·M·k·d multiply-adds), and
    the top k of those are kept. Unlike a top k of the low-precision values followed by exact values, a near-tie
    at the k-th place is decided by the exact values. A row chunk holding NaN or infinite pre-activations takes
    that other way; one with more than 4k and 1/CANDIDATE_DENSE of the latents as candidates per row (a large
    common offset, which bf16 cannot rank) takes the float32 GEMM.
    """
    M, n = pre.shape
    w_rms = row_norm_rms(W_enc, b_enc) if w_rms is None else w_rms
    chunk = max(16, CANDIDATE_BLOCK // n)  # rows whose float32 temporaries stay in cache
    if M > chunk:
        parts = [topk_by_candidates(pre[s:s + chunk], k, xc[s:s + chunk], W_enc, b_enc, w_rms)
                 for s in range(0, M, chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    p = pre.detach().float()  # numpy has no bfloat16; float32 holds its values exactly
    group = _group(n, k)
    blocks = p if group is None else p.view(M, group, n // group).amax(1)  # [M, m]
    blocks = blocks.numpy()
    m = blocks.shape[1]
    tau = np.partition(blocks, m - k, axis=1)[:, m - k] if M else np.zeros(0, np.float32)  # [M]
    pn = p.numpy()
    x = xc.detach().to(W_enc.dtype)
    # The low precision's error: its output rounding is relative (|τ|), its input rounding absolute, about
    # 2^-9·sqrt(Σ_i (x_i w_i)²) ~ 2^-9·|[x, 1]|·|[w, b]|/sqrt(d + 1) (with cancellation, even where τ is near 0).
    spread = (x.pow(2).sum(1) + 1).sqrt().numpy() * (w_rms / (W_enc.shape[1] + 1) ** 0.5)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.maximum(np.abs(tau), spread)
    if M == 0 or not np.isfinite(scale).all() or np.isnan(blocks).any():
        _, idx = select_topk(pre, k)
        return exact_acts(xc, W_enc, b_enc, idx), idx
    tau -= CANDIDATE_MARGIN * scale
    flat = np.flatnonzero(pn >= tau[:, None])  # row · n + col, by row
    if len(flat) > M * max(4 * k, n // CANDIDATE_DENSE):  # bf16 ranks these rows too coarsely: float32 GEMM
        return select_topk(torch.addmm(b_enc, x, W_enc.t()), k)
    rows = flat // n
    cols = flat - rows * n
    counts = np.bincount(rows, minlength=M)  # >= k each: the k largest block maxima are at least tau
    crow = np.zeros(M + 1, dtype=np.int64)
    np.cumsum(counts, out=crow[1:])
    cols_t = torch.from_numpy(cols)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(torch.from_numpy(crow), cols_t, b_enc[cols_t], size=(M, n),
                                          check_invariants=False)
        exact = torch.sparse.sampled_addmm(pattern, x, W_enc.t()).values()  # [nnz]
    width = int(counts.max())
    padded = np.full(M * width, -np.inf, dtype=np.float32)  # each row's candidates, then -inf
    padded[rows * width + (np.arange(len(flat)) - crow[rows])] = exact.float().numpy()
    pos = crow[:-1, None] + top_k_positions(padded.reshape(M, width), k)  # [M, k] into the candidates
    pos_t = torch.from_numpy(pos)
    return exact[pos_t].relu_(), cols_t[pos_t]


def scratch_buffer(scratch: dict | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """An uninitialized tensor, kept in ``scratch`` (if given) for the next call of the same shape.

    Reusing large buffers step after step spares the allocator's fresh pages (glibc maps every block
    over 32 MiB anew, and the kernel zero-fills each page on first touch).
    """
    t = None if scratch is None else scratch.get(name)
    if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
        t = torch.empty(shape, dtype=dtype, device=device)
        if scratch is not None:
            scratch[name] = t
    return t


@torch.no_grad()
def encode_select(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                  dead: torch.Tensor | None = None, k_aux: int = 0, compute_dtype: torch.dtype | None = None,
                  scratch: dict | None = None, W_aug: torch.Tensor | None = None):
    """The dense encoder GEMM fused with the top-k selections, one row block at a time.

    b_enc rides in the GEMM as an extra input column of ones (K = d + 1, on a GPU padded with zero columns to a
    multiple of AUG_ALIGN: :func:`augmented_width`), which saves a pass over the
    [rows, n] pre-activations. Only one [rows, n] block exists at any time, in ``compute_dtype`` (default:
    W_enc's; bfloat16 runs the GEMM on AMX with float32 accumulation). A lower compute dtype only chooses
    the latents: their values are recomputed in W_enc's dtype (N·(k + k_aux)·d multiply-adds).

    Args: xc [N, d] input minus b_dec; W_enc [n, d]; b_enc [n]; dead [n_dead] indices of dead latents;
    scratch a dict that keeps the large buffers for the next call (see :func:`scratch_buffer`); W_aug
    [n, K] the [W_enc | b_enc | 0] matrix already built in ``compute_dtype`` (see :meth:`SAE.encoder_matrix`).
    Without scratch or W_aug at W_enc's own dtype (inference), the GEMM is an addmm on W_enc itself: no copy
    of the weights per call.
    Returns: top_acts [N, k], top_indices [N, k], aux_acts [N, k_aux], aux_indices [N, k_aux].
    """
    (N, d), n, device = xc.shape, W_enc.shape[0], xc.device
    compute_dtype = compute_dtype or W_enc.dtype
    direct = W_aug is None and scratch is None and compute_dtype == W_enc.dtype
    W = W_enc if direct else W_aug
    K = W.shape[1] if W is not None and not direct else augmented_width(d, device)
    if W is None:
        W = scratch_buffer(scratch, "W", (n, K), compute_dtype, device)  # [n, K] = [W_enc | b_enc | 0]
        W[:, :d], W[:, d], W[:, d + 1:] = W_enc, b_enc, 0
    if not direct:
        xq = scratch_buffer(scratch, "xq", (N, K), compute_dtype, device)  # [N, K] = [xc | 1 | 0]
        xq[:, :d], xq[:, d], xq[:, d + 1:] = xc, 1, 0
    k_aux = 0 if dead is None else min(k_aux, dead.numel())
    # Below full precision, a small dead set gets its own GEMM in W_enc's dtype: exact aux-k values at once,
    # cheaper than gathering its columns and recomputing the chosen ones row by row.
    W_dead = W_enc[dead] if k_aux and compute_dtype != W_enc.dtype and dead.numel() <= AUX_DENSE_RATIO * k_aux \
        else None  # [n_dead, d]
    # On a CPU, low precision picks candidates and their exact values rank them (topk_by_candidates); elsewhere it
    # picks the top k, whose values are recomputed below.
    by_candidates = compute_dtype != W_enc.dtype and device.type == "cpu"
    w_rms = row_norm_rms(W_enc, b_enc) if by_candidates else None
    rows = max(1, min(N, PRE_BUFFER_BYTES // (n * W.element_size())))
    buf = scratch_buffer(scratch, "pre", (rows, n), compute_dtype, device)  # [rows, n], reused by each block
    parts = []
    for s in range(0, N, rows):
        out = buf[:min(rows, N - s)]
        pre = torch.addmm(b_enc, xc[s:s + rows], W.t(), out=out) if direct else torch.mm(xq[s:s + rows], W.t(), out=out)
        vals, idx = (topk_by_candidates(pre, k, xc[s:s + rows], W_enc, b_enc, w_rms) if by_candidates
                     else select_topk(pre, k))
        if not k_aux:
            aux_vals, aux_idx = vals[:, :0], idx[:, :0]
        elif W_dead is not None:
            aux_vals, aux_idx = select_topk(torch.addmm(b_enc[dead], xc[s:s + rows], W_dead.t()), k_aux)
        else:
            aux_vals, aux_idx = select_topk(pre.index_select(1, dead), k_aux)
        parts.append((vals, idx, aux_vals, dead[aux_idx] if k_aux else aux_idx))  # [rows, k], [rows, k_aux]
    if not parts:  # no tokens
        empty = torch.empty(0, k, dtype=W_enc.dtype, device=device)
        return empty, empty.long(), empty[:, :k_aux], empty[:, :k_aux].long()
    vals, idx, aux_vals, aux_idx = parts[0] if len(parts) == 1 else [torch.cat(t) for t in zip(*parts)]
    if compute_dtype != W_enc.dtype and not by_candidates:  # low precision chose these latents: exact values
        vals = exact_acts(xc, W_enc, b_enc, idx)
    if compute_dtype != W_enc.dtype and W_dead is None:
        aux_vals = exact_acts(xc, W_enc, b_enc, aux_idx)
    return vals, idx, aux_vals, aux_idx


def augmented_width(d: int, device: torch.device | str = "cpu") -> int:
    """K of the encoder GEMM with b_enc folded in: d + 1, rounded up to a multiple of AUG_ALIGN on a GPU."""
    return -(-(d + 1) // AUG_ALIGN) * AUG_ALIGN if torch.device(device).type == "cuda" else d + 1


def exact_acts(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """ReLU(W_enc[idx] · xc + b_enc[idx]) in W_enc's dtype: [N, m] for idx [N, m] (N·m·d multiply-adds)."""
    return (gather_dot(idx, W_enc, xc.to(W_enc.dtype)) + b_enc[idx]).relu_()


class LatentRows:
    """The (latent, token) pairs of index matrices, sorted by latent once: the CSR [n, T] pattern of every
    product that scatters per-token rows into the rows of the selected latents.

    ``blocks`` are index matrices [N_i, m_i] over consecutive token ranges (block i's tokens follow block
    i-1's), so main and aux-k selections share one pattern. A product costs Σ N_i·m_i·d multiply-adds (not
    the N·n·d of a dense one). The pairs are sorted by latent with a stable sort, so each latent's tokens
    stay in ascending order: the order, and every sum taken in it, is the same on every run and device.
    """

    def __init__(self, blocks: list[torch.Tensor], n: int):
        T, nnz, device = sum(b.shape[0] for b in blocks), sum(b.numel() for b in blocks), blocks[0].device
        if nnz >= 2**31 or T >= 2**31:
            raise ValueError(f"{nnz} selections over {T} tokens exceed int32 CSR indices: use smaller batches")
        token_of = torch.cat([torch.arange(b.shape[0], dtype=torch.int32, device=device).repeat_interleave(b.shape[1])
                              + sum(c.shape[0] for c in blocks[:i]) for i, b in enumerate(blocks)])  # [nnz]
        flat = torch.cat([b.reshape(-1) for b in blocks])  # [nnz] latent of each pair, token-major
        if device.type == "cpu":  # numpy's radix sort of 16-bit keys: ~3x faster than a sort of int64 keys
            order = torch.from_numpy(stable_order(flat.numpy(), n))
        else:  # on the accelerator: no copy to the host and back
            order = torch.sort(flat.to(torch.int32), stable=True).indices
        self.order = order  # [nnz]
        self.tokens = token_of[order]  # [nnz] CSR columns, latent-major
        crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
        torch.cumsum(torch.bincount(flat, minlength=n), 0, out=crow[1:])
        self.crow = crow.to(torch.int32)  # [n + 1]
        self.shape = (n, T)

    def scatter(self, coefs: list[torch.Tensor], src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out[i] = Σ over pairs (i, t) of coef[t, j] * src[t]: coefs like ``blocks``, src [T, d] -> [n, d]
        (written into ``out`` if given: its old values are ignored)."""
        coef = coefs[0].reshape(-1) if len(coefs) == 1 else torch.cat([c.reshape(-1) for c in coefs])
        coef = coef[self.order].to(src.dtype)  # [nnz], latent-major
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
            warnings.simplefilter("ignore")
            G = torch.sparse_csr_tensor(self.crow, self.tokens, coef, self.shape)  # [n, T]
        shape = (self.shape[0], src.shape[1])
        if out is None or out.shape != shape or out.dtype != src.dtype or out.device != src.device:
            out = src.new_empty(shape)  # [n, d]
        return torch.addmm(out, G, src, beta=0, out=out)  # beta=0: no zero fill, old values ignored


def stable_order(keys: np.ndarray, n: int) -> np.ndarray:
    """The positions [len(keys)] that sort integer ``keys`` in [0, n) stably (ties keep their order): numpy's
    radix sort on 16-bit digits, least significant first (one pass up to n = 65,536)."""
    keys = keys.astype(np.int64, copy=False)
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    shift = 16
    while n > 1 << shift:
        digit = ((keys[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order


def scatter_rows(indices: torch.Tensor, coef: torch.Tensor, src: torch.Tensor, n: int) -> torch.Tensor:
    """out[indices[b, j]] += coef[b, j] * src[b] for indices [N, m], coef [N, m], src [N, d]: out [n, d]."""
    return LatentRows([indices], n).scatter([coef], src)


def gather_dot(indices: torch.Tensor, table: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """out[b, j] = table[indices[b, j]] · vec[b], without materializing table[indices] ([N, m, d]).

    Args: indices [N, m], table [n, d], vec [N, d]. Returns [N, m]. Uses embedding_bag's own
    per-sample-weight backward kernel, which is exactly this product.
    """
    N, m = indices.shape
    if m == 0:
        return vec.new_zeros(N, 0)
    offsets, bag_of = _bags(N, m, vec.device)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        vec.contiguous(), table, indices.reshape(-1), offsets, bag_of, 0, -1)  # mode 0 = sum
    return out.view(N, m)


def add_rows_(t: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """t[rows] += src for distinct ``rows`` [r] and src [r, d] (a row gather and a row scatter: on CPU far
    faster than index_add_ along dim 0, which torch runs as an element-wise scatter_add)."""
    t.index_copy_(0, rows, t.index_select(0, rows).add_(src))


@functools.lru_cache(maxsize=8)
def _bags(N: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """embedding_bag's offsets [N] and bag of each index [N*m] for N bags of m (the same every step)."""
    return torch.arange(0, N * m, m, device=device), torch.arange(N, device=device).repeat_interleave(m)


# --------------------------------------------------------------------------- the SAE
class SAE(nn.Module):
    """TopK sparse autoencoder.

    With x̃ the (optionally layer-normalized) input x ∈ R^d:

        z = W_enc (x̃ - b_dec) + b_enc          W_enc [d_sae, d_in], b_enc [d_sae]   (pre-activations)
        h = ReLU(TopK_k(z))                     k non-zeros per token
        x̂ = W_decᵀ h + b_dec                   W_dec [d_sae, d_in]: row i is latent i's unit-norm direction
        output = x̂ · std(x) + mean(x)           (layer_norm only; SAELens semantics)

    b_dec is the OpenAI paper's b_pre. Both matrices are stored latent-major ([d_sae, d_in]) so the sparse
    kernels gather and scatter whole rows; SAELens's file stores W_enc transposed, and formats.py converts.
    """

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.d_sae, cfg.d_in
        self.W_enc = nn.Parameter(torch.zeros(n, d, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = nn.Parameter(torch.zeros(n, d, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        self.scratch: dict[str, torch.Tensor] = {}  # training's large per-step buffers, kept between steps

    # ----------------------------------------------------------------- init and constraints
    @torch.no_grad()
    def init_(self, x_norm: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """OpenAI init: W_enc orthogonal, W_dec = W_encᵀ with unit-norm latents, b_dec = mean input, b_enc = 0.

        Args: x_norm [N, d] a sample of inputs in the space the SAE sees (after :func:`normalize`).
        """
        W = orthogonal(self.cfg.d_sae, self.cfg.d_in, generator, self.W_enc.device)  # [n, d]
        self.W_enc.copy_(W)
        self.W_dec.copy_(W)
        self.normalize_decoder_()
        self.b_enc.zero_()
        self.b_dec.copy_(x_norm.float().mean(0))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale each latent's decoder vector (a row of W_dec) to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each latent's decoder gradient its component along that latent's (unit) direction."""
        g = self.W_dec.grad
        if g is not None:
            g.addcmul_(torch.linalg.vecdot(g, self.W_dec)[:, None], self.W_dec, value=-1)  # g -= (g·w) w

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def forward_train(self, x_norm: torch.Tensor, dead: torch.Tensor | None = None, k_aux: int = 0,
                      compute_dtype: torch.dtype | None = None) -> TrainOutput:
        """Sparse forward pass for training, in normalized space; :meth:`backward_train_` takes it from here.

        Args: x_norm [N, d] in the weights' dtype; dead [n_dead] indices of dead latents (or None); k_aux the
        most dead latents used per token for aux-k (fewer if fewer are dead); compute_dtype the encoder GEMM's
        dtype (default: the weights'; bfloat16 keeps float32 master weights and gradients).
        """
        xc = x_norm - self.b_dec  # [N, d], before any bf16 cast (b_dec can dwarf the signal)
        vals, idx, aux_vals, aux_idx = encode_select(xc, self.W_enc, self.b_enc, self.cfg.k, dead, k_aux,
                                                     compute_dtype, self.scratch)
        recon = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum").add_(self.b_dec)  # [N, d]
        auxk = aux_dense = None
        if aux_idx.shape[1] and dead.numel() <= AUX_DENSE_RATIO * aux_idx.shape[1]:
            # many of the dead latents are chosen: dense GEMMs over them beat row gathers
            slot = torch.empty(self.cfg.d_sae, dtype=torch.long, device=dead.device)
            slot[dead] = torch.arange(dead.numel(), device=dead.device)
            aux_dense = torch.zeros(xc.shape[0], dead.numel(), dtype=xc.dtype, device=xc.device).scatter_(
                1, slot[aux_idx], aux_vals)  # [N, n_dead]
            auxk = aux_dense @ self.W_dec[dead]  # [N, d]
        elif aux_idx.shape[1]:
            auxk = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux_vals, mode="sum")  # [N, d]
        return TrainOutput(xc, recon, vals, idx, aux_vals, aux_idx, auxk, dead, aux_dense)

    @torch.no_grad()
    def backward_train_(self, out: TrainOutput, g_recon: torch.Tensor, g_auxk: torch.Tensor | None = None) -> None:
        """Set every parameter's .grad from the loss gradients w.r.t. recon [N, d] and auxk_recon [N, d].

        Touches only the k + k_aux selected latents per token: with g_h the gradient of a selected latent
        (the decoder row's dot product with g_recon, zero where ReLU clipped), W_dec and W_enc get sparse
        [n, N] @ [N, d] products, b_enc an index_add, and b_dec Σ g_recon - W_encᵀ (b_enc's gradient).
        Aux-k over a small dead set (``out.aux_dense``) uses dense [n_dead, N] @ [N, d] products instead.
        """
        W_enc, W_dec, n = self.W_enc, self.W_dec, self.cfg.d_sae
        g_pre = gather_dot(out.top_indices, W_dec, g_recon).mul_(out.top_acts > 0)  # [N, k], ReLU gate
        sparse_aux = g_auxk is not None and out.auxk_recon is not None and out.aux_dense is None
        if not sparse_aux:
            blocks, acts, g_pres, g_out, xc = [out.top_indices], [out.top_acts], [g_pre], g_recon, out.xc
        else:  # aux-k selections are a second block of tokens: one sort, one product per matrix
            g_aux = gather_dot(out.aux_indices, W_dec, g_auxk).mul_(out.aux_acts > 0)  # [N, k_aux]
            blocks, acts, g_pres = [out.top_indices, out.aux_indices], [out.top_acts, out.aux_acts], [g_pre, g_aux]
            g_out, xc = torch.cat([g_recon, g_auxk]), torch.cat([out.xc, out.xc])  # [2N, d]
        rows = LatentRows(blocks, n)
        # written into last step's gradient tensors: no fresh [n, d] pages every step
        g_W_dec, g_W_enc = rows.scatter(acts, g_out, W_dec.grad), rows.scatter(g_pres, xc, W_enc.grad)  # [n, d]
        g_b_enc = torch.zeros(n, dtype=W_enc.dtype, device=W_enc.device)  # [n]
        for b, g in zip(blocks, g_pres):
            g_b_enc.index_add_(0, b.reshape(-1), g.reshape(-1))
        if g_auxk is not None and out.aux_dense is not None:  # dense aux-k over the dead latents
            g_dense = (g_auxk @ W_dec[out.dead].T).mul_(out.aux_dense > 0)  # [N, n_dead], ReLU gate
            add_rows_(g_W_dec, out.dead, out.aux_dense.T @ g_auxk)
            add_rows_(g_W_enc, out.dead, g_dense.T @ out.xc)
            g_b_enc.index_add_(0, out.dead, g_dense.sum(0))
        self.W_enc.grad, self.b_enc.grad, self.W_dec.grad = g_W_enc, g_b_enc, g_W_dec
        self.b_dec.grad = g_recon.sum(0) - g_b_enc @ W_enc  # [d]: x - b_dec enters every latent alike

    def forward_train_dense(self, x_norm: torch.Tensor, dead: torch.Tensor | None = None,
                            k_aux: int = 0) -> TrainOutput:
        """The same maths as :meth:`forward_train` with dense autograd ops: the reference for tests."""
        xc = x_norm - self.b_dec
        pre = xc @ self.W_enc.T + self.b_enc  # [N, n]
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)  # plain topk: the reference for select_topk too
        vals = vals.relu()
        h = torch.zeros_like(pre).scatter(1, idx, vals)  # [N, n]
        recon = h @ self.W_dec + self.b_dec  # [N, d]
        k_aux = 0 if dead is None else min(k_aux, dead.numel())
        if not k_aux:
            return TrainOutput(xc, recon, vals, idx, vals[:, :0], idx[:, :0], None)
        is_dead = torch.zeros(pre.shape[1], dtype=torch.bool, device=pre.device)
        is_dead[dead] = True
        a_vals, a_idx = pre.masked_fill(~is_dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        a_vals = a_vals.relu()
        h_aux = torch.zeros_like(pre).scatter(1, a_idx, a_vals)  # [N, n]
        return TrainOutput(xc, recon, vals, idx, a_vals, a_idx, h_aux @ self.W_dec)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def encoder_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """[W_enc | b_enc | 0] as one [d_sae, K] matrix in ``dtype`` (bf16 inference; K: :func:`augmented_width`),
        kept until the weights
        change: replaced, or changed in place by an op that bumps their version counter. torch's fused AdamW
        does not bump it, so an optimizer step must call :meth:`weights_changed` (the trainer does)."""
        key = (self.weights_key(("W_enc", "b_enc")), dtype)
        cache = self.__dict__.setdefault("_encoder_matrices", {})
        if cache.get(dtype, (None,))[0] != key:
            pad = self.W_enc.new_zeros(self.cfg.d_sae,
                                       augmented_width(self.cfg.d_in, self.W_enc.device) - self.cfg.d_in - 1)
            cache[dtype] = (key, torch.cat([self.W_enc, self.b_enc[:, None], pad], 1).to(dtype))
        return cache[dtype][1]

    @torch.no_grad()
    def weights_key(self, names: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")) -> tuple:
        """What the caches of derived values (:meth:`encoder_matrix`, the fingerprint) are keyed on: each
        weight's storage and version counter, and two float64 checksums of its values (the sum, and the row
        sums weighted by row index). The checksums see what the version counter misses: a change written
        through ``.data``, which has a counter of its own (``sae.W_enc.data[7] = 0``, a common ablation). They
        read the weights once: ~0.1 s for the seed's 200M-entry encoder on a CPU, 2.7 ms on an H200."""
        key = []
        for name in names:
            t = getattr(self, name).detach()
            rows = t.reshape(t.shape[0], -1).sum(-1, dtype=torch.float64)  # [rows]
            weights = torch.arange(1, len(rows) + 1, dtype=torch.float64, device=rows.device)
            key += [t.data_ptr(), getattr(self, name)._version, float(rows.sum()), float(rows @ weights)]
        return tuple(key)

    def weights_changed(self) -> None:
        """Drop what is cached from the weights: the encoder matrices (see :meth:`encoder_matrix`) and the
        fingerprint (:func:`llama_sae.features.sae_fingerprint`)."""
        self.__dict__.pop("_encoder_matrices", None)
        self.__dict__.pop("_fingerprint", None)

    @torch.no_grad()
    def select(self, xc: torch.Tensor, compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK of the pre-activations of xc [N, d_in] (normalized input minus b_dec): (values [N, k] in
        W_enc's dtype, indices [N, k]).

        ``compute_dtype`` bfloat16 runs the encoder GEMM in bf16 (AMX, tensor cores) and computes the values in
        float32: 2.5-3x faster where the GEMM dominates (the seed's shape on an AMX CPU). On a CPU the bf16 values
        only propose candidates and their float32 values choose the top k (:func:`topk_by_candidates`: the
        float32 selection in every token measured). On a GPU the bf16 top k is kept: where the k-th and
        (k+1)-th pre-activations lie within bf16 rounding of each other (about 1 token in 10 for the demo SAE)
        it may keep the other one.
        """
        self.check_float32()
        low = compute_dtype not in (None, self.W_enc.dtype)  # float32 reads W_enc itself: nothing to cache
        vals, idx, _, _ = encode_select(xc, self.W_enc, self.b_enc, self.cfg.k, compute_dtype=compute_dtype,
                                        W_aug=self.encoder_matrix(compute_dtype) if low else None)
        return vals, idx

    def check_float32(self) -> None:
        """Inference keeps the weights in float32 (the values, the reconstruction and the error term are float32
        math; a lower precision for the encoder GEMM is ``compute_dtype``): say so for an SAE cast to another."""
        if self.W_enc.dtype != torch.float32 or self.W_dec.dtype != torch.float32:
            raise TypeError(f"this SAE's weights are {self.W_enc.dtype}: SAEs run in float32 here (call sae.float(); "
                            "for a bf16 encoder GEMM pass compute_dtype=torch.bfloat16)")

    @torch.no_grad()
    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k active latents of each token: (values [N, k] float32, indices [N, k]). x [N, d_in]."""
        x_norm, _, _ = normalize(x.reshape(-1, self.cfg.d_in), self.cfg.normalize_activations)
        return self.select(x_norm - self.b_dec)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [..., d_sae] (zero outside each token's top k) for inputs x [..., d_in] (leading
        dimensions kept, as SAELens does: ``decode(encode(x), x)`` works on [B, T, d_in])."""
        vals, idx = self.encode_topk(x)
        dense = torch.zeros(vals.shape[0], self.cfg.d_sae, device=vals.device).scatter_(1, idx, vals)
        return dense.view(*x.shape[:-1], self.cfg.d_sae)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction [..., d_in] from dense latents [..., d_sae].

        With layer_norm, pass the input ``x`` [..., d_in] the latents came from: its per-token mean and std
        undo the normalization (SAELens keeps them from the last encode). Without it, the output stays in
        the normalized space.
        """
        self.check_float32()
        lead = latents.shape[:-1]
        y = latents.reshape(-1, self.cfg.d_sae).float() @ self.W_dec + self.b_dec  # [N, d_in]
        if x is not None:
            if x.shape[:-1] != lead:
                raise ValueError(f"decode: x has tokens {tuple(x.shape[:-1])} but the latents {tuple(lead)}")
            _, mu, std = normalize(x.reshape(-1, self.cfg.d_in), self.cfg.normalize_activations)
            y = denormalize(y, mu, std)
        return y.view(*lead, self.cfg.d_in)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x [..., d_in] (same shape, float32), through the k active latents only."""
        return self.forward_topk(x)[0]

    @torch.no_grad()
    def forward_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encode, both results: (the reconstruction :meth:`forward` gives, the (values [N, k], indices
        [N, k]) :meth:`encode_topk` gives), N the tokens of x [..., d_in]."""
        flat = x.reshape(-1, self.cfg.d_in)
        x_norm, mu, std = normalize(flat, self.cfg.normalize_activations)
        vals, idx = self.select(x_norm - self.b_dec)
        y = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec  # [N, d_in]
        return denormalize(y, mu, std).view(x.shape), vals, idx

    def save(self, path, **metadata) -> None:
        """Write this SAE to directory ``path`` in the SAELens v6 layout (see formats.save)."""
        from llama_sae.sae.formats import save

        save(self, path, **metadata)
