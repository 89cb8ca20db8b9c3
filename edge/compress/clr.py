"""Clustered low-rank (CLR) word embeddings: the table E (V x d) stored as clusters of rows.

Cluster c holds n_c vocabulary rows as U_c (n_c x r_c) . V_c (r_c x d), or, when that would be
no cheaper than the rows themselves, as the dense rows (a "dense" cluster: U_c = E_c, no V_c).

Every vocabulary id t has a slot s = slot[t] in 0..V-1; the clusters own consecutive slot ranges
(cluster c owns [start_c, start_c + n_c)), so the row of t inside its cluster is s - start_c and
the cluster is found from the few boundaries. One uint16 per token is the whole index.

Lookup cost of one token in cluster c (d = hidden size):
    low-rank:  reads r_c values of U_c and r_c*d values of V_c, r_c*d multiply-accumulates
    dense:     reads d values, no arithmetic
In int8 (see `QuantCLR`) the reads are bytes, the MACs are int8 x int8 -> int32, and d
multiplies apply the scales. With d = 128 and r_c = 16 that is 2 KB read and 2,048 MACs per
token: ~0.26 M MACs for 128 tokens, well under 1% of a BERT-tiny forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from base.errors import TinyshieldError
from base.quant import quantize_weights_f32


@dataclass(frozen=True)
class Layout:
    """Which tokens go to which cluster, and how each cluster is stored.

    `slot[t]` is token t's position in the cluster-ordered table; `sizes[c]` rows per cluster;
    `ranks[c]` its rank (== d for a dense cluster); `dense[c]` whether it is stored as plain rows.
    """
    slot: np.ndarray       # (V,) int64, a permutation of 0..V-1
    sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    dense: tuple[bool, ...]
    dim: int

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.slot)

    def members(self, c: int) -> np.ndarray:
        """Token ids of cluster c, in slot order."""
        order = np.argsort(self.slot, kind="stable")
        s = int(self.starts[c])
        return order[s:s + self.sizes[c]]

    def params(self) -> int:
        """Number of stored factor values (the index and scales are counted in bytes, not params)."""
        return sum(cluster_params(n, r, dn, self.dim) for n, r, dn in zip(self.sizes, self.ranks, self.dense))


def cluster_params(n: int, r: int, dense: bool, d: int) -> int:
    return n * d if dense else r * (n + d)


def layout_from_clusters(cluster_of: np.ndarray, ranks, dense, dim: int) -> Layout:
    """Clusters given as a cluster id per token -> slots (tokens keep their id order inside a cluster)."""
    cluster_of = np.asarray(cluster_of, dtype=np.int64)
    k = len(ranks)
    if cluster_of.min() < 0 or cluster_of.max() >= k:
        raise TinyshieldError(f"cluster ids must lie in 0..{k - 1}")
    order = np.lexsort((np.arange(len(cluster_of)), cluster_of))
    slot = np.empty(len(cluster_of), dtype=np.int64)
    slot[order] = np.arange(len(cluster_of))
    sizes = tuple(int(x) for x in np.bincount(cluster_of, minlength=k))
    if 0 in sizes:
        raise TinyshieldError(f"cluster {sizes.index(0)} is empty")
    return Layout(slot, sizes, tuple(int(r) for r in ranks), tuple(bool(x) for x in dense), dim)


def weighted_basis(rows: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and squared singular values of diag(sqrt(w)) . rows.

    Projecting the rows onto the top-r vectors minimises sum_i w_i ||e_i - e^_i||^2 over rank r;
    the k-th squared singular value is exactly the weighted error removed by the k-th rank.
    """
    a = rows.double() * weights.double().sqrt()[:, None]
    if a.shape[0] > a.shape[1]:
        # Tall cluster: the d x d Gram matrix has the same right singular vectors and is far cheaper.
        evals, evecs = torch.linalg.eigh(a.T @ a)
        order = torch.argsort(evals, descending=True)
        return evecs[:, order].T.contiguous(), evals[order].clamp(min=0)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    return vh, s * s


class CLREmbedding(nn.Module):
    """Trainable float CLR table; `forward(ids)` returns the (…, d) word embeddings."""

    def __init__(self, layout: Layout, us: list[torch.Tensor], vs: list[torch.Tensor | None]):
        super().__init__()
        self.layout = layout
        self.u = nn.ParameterList(nn.Parameter(u.float().clone()) for u in us)
        # A dense cluster has no V; keep a zero-size placeholder so indices line up.
        self.v = nn.ParameterList(nn.Parameter((v if v is not None else torch.zeros(0, layout.dim)).float().clone())
                                  for v in vs)
        slot = torch.as_tensor(layout.slot, dtype=torch.long)
        starts = torch.as_tensor(layout.starts, dtype=torch.long)
        cluster = torch.bucketize(slot, starts, right=True) - 1
        self.register_buffer("cluster_of", cluster, persistent=False)
        self.register_buffer("row_of", slot - starts[cluster], persistent=False)

    @property
    def dim(self) -> int:
        return self.layout.dim

    def cluster_rows(self, c: int) -> torch.Tensor:
        """The (n_c, d) reconstructed rows of cluster c."""
        return self.u[c] if self.layout.dense[c] else self.u[c] @ self.v[c]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        c, r = self.cluster_of[flat], self.row_of[flat]
        out = torch.zeros(flat.shape[0], self.dim, dtype=self.u[0].dtype, device=flat.device)
        for k in torch.unique(c).tolist():
            sel = (c == k).nonzero().squeeze(1)
            u = self.u[k][r[sel]]                       # one row of U_k per token
            out = out.index_copy(0, sel, u if self.layout.dense[k] else u @ self.v[k])
        return out.view(*ids.shape, self.dim)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """The whole reconstructed (V, d) table in token-id order."""
        return self.forward(torch.arange(self.layout.vocab_size))

    def params(self) -> int:
        return self.layout.params()


def factorize(table: torch.Tensor, layout: Layout, weights: torch.Tensor | None = None,
              bases: list | None = None) -> CLREmbedding:
    """Best weighted rank-r_c factors of every cluster (U_c = E_c V_c^T, V_c = top right singular vectors).

    `bases` may carry precomputed `weighted_basis` results per cluster (the search already has them).
    """
    if table.shape != (layout.vocab_size, layout.dim):
        raise TinyshieldError(f"table has shape {tuple(table.shape)}, layout expects "
                              f"({layout.vocab_size}, {layout.dim})")
    w = torch.ones(layout.vocab_size, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    us, vs = [], []
    for c in range(len(layout.sizes)):
        idx = torch.as_tensor(layout.members(c))
        rows = table[idx].double()
        if layout.dense[c]:
            us.append(rows.float())
            vs.append(None)
            continue
        vh = bases[c][0] if bases is not None else weighted_basis(rows, w[idx])[0]
        v = vh[:layout.ranks[c]]
        us.append((rows @ v.T).float())
        vs.append(v.float())
    return CLREmbedding(layout, us, vs)


# ---------------------------------------------------------------------------------------------
# int8 factors

def _quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x ~= q * scale[:, None] (base.quant.quantize_weights_f32: the shipped
    model's factors were made with exactly this rule)."""
    q, scale = quantize_weights_f32(x.numpy(), axis=0)
    return torch.from_numpy(q), torch.from_numpy(scale)


@dataclass
class QuantCLR:
    """int8 CLR table. For cluster c:
    u[c]: int8 (n_c, r_c), u_scale[c]: float32 (n_c,)  — one scale per row
    v[c]: int8 (r_c, d),   v_scale[c]: float32 (d,)    — one scale per output column (None if dense)
    embedding[t, j] = u_scale[c][i] * v_scale[c][j] * sum_k u[c][i, k] * v[c][k, j]   (i = row of t)
    dense cluster:  embedding[t, j] = u_scale[c][i] * u[c][i, j]
    """
    layout: Layout
    u: list[torch.Tensor]
    u_scale: list[torch.Tensor]
    v: list[torch.Tensor | None]
    v_scale: list[torch.Tensor | None]

    @classmethod
    def from_float(cls, emb: CLREmbedding) -> "QuantCLR":
        u, us, v, vs = [], [], [], []
        for c in range(len(emb.layout.sizes)):
            uf = emb.u[c].detach()
            if emb.layout.dense[c]:
                q, s = _quant_rows(uf)
                u.append(q), us.append(s), v.append(None), vs.append(None)
                continue
            vf = emb.v[c].detach()
            vq, vsc = _quant_rows(vf.T)  # per output column j
            vq = vq.T.contiguous()
            # Refit U to the rounded V (least squares), so U's values also absorb V's rounding.
            vd = vq.double() * vsc.double()[None, :]
            uf = ((uf.double() @ vf.double()) @ torch.linalg.pinv(vd)).float()
            uq, usc = _quant_rows(uf)
            u.append(uq), us.append(usc), v.append(vq), vs.append(vsc)
        return cls(emb.layout, u, us, v, vs)

    def rows(self, c: int) -> torch.Tensor:
        """Dequantised (n_c, d) rows of cluster c (float32, computed as the integer kernel does)."""
        if self.layout.dense[c]:
            return self.u[c].float() * self.u_scale[c][:, None]
        acc = self.u[c].to(torch.int32) @ self.v[c].to(torch.int32)  # exact int32 accumulation
        return acc.float() * self.u_scale[c][:, None] * self.v_scale[c][None, :]

    def table(self) -> torch.Tensor:
        out = torch.empty(self.layout.vocab_size, self.layout.dim)
        for c in range(len(self.layout.sizes)):
            out[torch.as_tensor(self.layout.members(c))] = self.rows(c)
        return out

    def to_float(self) -> CLREmbedding:
        """A float CLREmbedding holding exactly the dequantised factors (for evaluation)."""
        us = [self.u[c].float() * self.u_scale[c][:, None] for c in range(len(self.u))]
        vs = [None if self.v[c] is None else self.v[c].float() * self.v_scale[c][None, :] for c in range(len(self.u))]
        return CLREmbedding(self.layout, us, vs)

    def nbytes(self) -> dict:
        return layout_bytes(self.layout)


CLUSTER_RECORD = 36  # bytes per cluster in the board's table (9 int32 fields)


def layout_bytes(layout: Layout) -> dict:
    """Flash bytes of the int8 form: factors, float32 scales, and the uint16 slot index."""
    factors = scales = 0
    for n, r, dn in zip(layout.sizes, layout.ranks, layout.dense):
        factors += cluster_params(n, r, dn, layout.dim)
        scales += 4 * n + (0 if dn else 4 * layout.dim)
    # slot per token + one record of 9 int32 per cluster (start, rows, rank, dense, offsets, shifts)
    index = (2 if layout.vocab_size <= 65536 else 4) * layout.vocab_size + CLUSTER_RECORD * len(layout.sizes)
    return {"factors": factors, "scales": scales, "index": index, "total": factors + scales + index}


def token_cost(layout: Layout, c: int) -> dict:
    """Per-token lookup cost in cluster c (int8 form): bytes read and multiply-accumulates."""
    d, r = layout.dim, layout.ranks[c]
    if layout.dense[c]:
        return {"macs": 0, "bytes_read": d + 4 + 2}
    return {"macs": r * d, "bytes_read": r + 4 + r * d + 4 * d + 2}
