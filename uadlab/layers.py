"""Blocks shared by several methods (a block used by one method stays in that method's file)."""
from __future__ import annotations

import numpy as np
import torch


class FlatIndex:
    """Exact nearest-neighbour search over a fixed bank (B, D): faiss when installed, chunked torch otherwise.

    Args:
        bank: (N, D) float32 vectors.
        metric: ``"l2"`` (returns squared Euclidean distances, ascending) or ``"ip"`` (inner products, descending).
    """

    def __init__(self, bank: torch.Tensor, metric: str = "l2") -> None:
        if metric not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
        self.metric = metric
        self.bank = bank.float().contiguous()
        self.key = (bank.data_ptr(), tuple(bank.shape))
        try:
            import faiss

            self._faiss = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(bank.shape[1])
            self._faiss.add(np.ascontiguousarray(self.bank.numpy()))
        except ImportError:
            self._faiss = None
            self._sq = (self.bank * self.bank).sum(1)

    def search(self, queries: torch.Tensor, k: int = 1, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) -> distances or similarities (Q, k) and bank indices (Q, k)."""
        k = min(k, len(self.bank))
        if self._faiss is not None:
            d, i = self._faiss.search(np.ascontiguousarray(queries.float().numpy()), k)
            d = torch.from_numpy(d)
            return (d.clamp_min_(0) if self.metric == "l2" else d), torch.from_numpy(i)
        ds, ids = [], []
        for s in range(0, len(queries), chunk):
            q = queries[s:s + chunk].float()
            if self.metric == "l2":
                v, i = ((q * q).sum(1, keepdim=True) - 2 * q @ self.bank.T + self._sq).clamp_min_(0).topk(k, 1, largest=False)
            else:
                v, i = (q @ self.bank.T).topk(k, 1)
            ds.append(v)
            ids.append(i)
        return torch.cat(ds), torch.cat(ids)


def cached_index(owner: torch.nn.Module, bank: torch.Tensor, metric: str) -> FlatIndex:
    """The owner's FlatIndex over ``bank``, rebuilt only when the bank tensor changes (fit or load)."""
    idx = getattr(owner, "_flat_index", None)
    if idx is None or idx.key != (bank.data_ptr(), tuple(bank.shape)) or idx.metric != metric:
        idx = FlatIndex(bank, metric)
        owner._flat_index = idx
    return idx
