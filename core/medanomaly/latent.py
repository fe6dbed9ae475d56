"""Latent-code repository, coarse-to-fine retrieval, similarity-weighted combination and
partial swap (SCRPS: StyleGAN latent code retrieval and partial swap).

Codes are W+ tensors ``(L, D)`` (L style vectors of D = 512 for StyleGAN2). A repository holds
``K`` codes of healthy slices. For a batch of test codes ``(B, L, D)``:

1. coarse: cosine similarity of the first ``l1`` layers (flattened) -> top ``k1`` codes;
2. fine: among those, cosine similarity of layers ``l1 .. L-1`` -> top ``k2`` codes;
3. combination: ``s_hat = sum_i w_i s_i`` with ``w_i = sim_i / sum_j sim_j`` (fine similarities,
   negative ones clipped to 0; equal weights if all are <= 0);
4. partial swap: ``s_tilde = s_test[:l2] ++ s_hat[l2:]`` (``l2 = 0``: the retrieved code alone).

One-stage retrieval (``coarse_to_fine=False``) ranks by the cosine similarity of all layers and
keeps the top ``k2``. Everything is batched over the test codes (matrix products and ``topk``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LatentRepository", "RepositoryMissing", "cosine_similarity_matrix", "weighted_combination",
           "partial_swap", "retrieve", "select_fraction", "load_repository", "REPOSITORY_FILE"]

REPOSITORY_FILE = "repository.pt"


class RepositoryMissing(FileNotFoundError):
    """No latent repository beside the weights."""


def cosine_similarity_matrix(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(B, K)`` between rows of ``queries (B, N)`` and ``keys (K, N)``."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t()


def _check_codes(codes: torch.Tensor, name: str) -> None:
    if codes.ndim != 3:
        raise ValueError(f"{name} must be W+ codes (N, L, D), got shape {tuple(codes.shape)}.")


def retrieve(queries: torch.Tensor, codes: torch.Tensor, l1: int = 6, k1: int = 100, k2: int = 20,
             coarse_to_fine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(B, k2)`` into ``codes (K, L, D)`` of the retrieved codes of each query
    ``(B, L, D)``, and their (fine-stage) cosine similarities ``(B, k2)``, best first.
    ``k1`` and ``k2`` are capped at the repository size."""
    _check_codes(queries, "queries")
    _check_codes(codes, "repository codes")
    if queries.shape[1:] != codes.shape[1:]:
        raise ValueError(f"Query codes {tuple(queries.shape[1:])} and repository codes {tuple(codes.shape[1:])} "
                         "differ.")
    n_layers, n_codes = codes.shape[1], codes.shape[0]
    if n_codes == 0:
        raise ValueError("The latent repository is empty.")
    codes = codes.to(queries.device)
    k1, k2 = min(int(k1), n_codes), min(int(k2), n_codes)
    if not coarse_to_fine:
        sims = cosine_similarity_matrix(queries.flatten(1), codes.flatten(1))
        top = sims.topk(k2, dim=1)
        return top.indices, top.values
    if not 0 < l1 < n_layers:
        raise ValueError(f"l1 must lie in 1 .. {n_layers - 1} for coarse-to-fine retrieval, got {l1}.")
    k2 = min(k2, k1)
    coarse = cosine_similarity_matrix(queries[:, :l1].flatten(1), codes[:, :l1].flatten(1))
    candidates = coarse.topk(k1, dim=1).indices  # (B, k1)
    fine_codes = F.normalize(codes[:, l1:].flatten(1).float(), dim=-1)[candidates]  # (B, k1, N)
    fine_queries = F.normalize(queries[:, l1:].flatten(1).float(), dim=-1)
    fine = torch.einsum("bkn,bn->bk", fine_codes, fine_queries)
    top = fine.topk(k2, dim=1)
    return candidates.gather(1, top.indices), top.values


def weighted_combination(codes: torch.Tensor, similarities: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i codes_i`` with ``w_i = sim_i / sum(sim)`` over dim 1: ``codes (B, K, L, D)``,
    ``similarities (B, K)`` -> ``(B, L, D)``. Negative similarities count as 0; if none is
    positive the codes are averaged."""
    weights = similarities.float().clamp_min(0)
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp_min(1e-12), torch.full_like(weights, 1 / weights.shape[1]))
    return torch.einsum("bk,bkld->bld", weights.to(codes.dtype), codes)


def partial_swap(test_codes: torch.Tensor, retrieved: torch.Tensor, l2: int) -> torch.Tensor:
    """The first ``l2`` layers of the test code, the rest from the retrieved code."""
    if test_codes.shape != retrieved.shape:
        raise ValueError(f"Codes to swap must have one shape, got {tuple(test_codes.shape)} and "
                         f"{tuple(retrieved.shape)}.")
    if not 0 <= l2 <= test_codes.shape[1]:
        raise ValueError(f"l2 must lie in 0 .. {test_codes.shape[1]}, got {l2}.")
    return torch.cat([test_codes[:, :l2], retrieved[:, l2:]], dim=1)


def select_fraction(n: int, fraction: float, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Sorted indices of a random ``fraction`` of ``n`` items (at least one when n > 0)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    count = min(n, max(1, int(round(fraction * n)))) if n else 0
    return np.sort(rng.choice(n, size=count, replace=False))


class LatentRepository:
    """``K`` W+ codes of healthy slices ``(K, L, D)``, with where each came from (``sources``)
    and free-form ``info`` (how it was built). Saved as one ``torch.save`` file."""

    def __init__(self, codes: torch.Tensor, sources: Sequence[str] | None = None, info: dict | None = None):
        _check_codes(codes, "repository codes")
        self.codes = codes.detach().float()
        self.sources = list(sources) if sources is not None else [str(i) for i in range(len(codes))]
        if len(self.sources) != len(self.codes):
            raise ValueError(f"{len(self.sources)} sources for {len(self.codes)} codes.")
        self.info = dict(info or {})

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def num_layers(self) -> int:
        return self.codes.shape[1]

    def to(self, device) -> "LatentRepository":
        self.codes = self.codes.to(device)
        return self

    def retrieve(self, queries: torch.Tensor, l1: int = 6, k1: int = 100, k2: int = 20, coarse_to_fine: bool = True):
        return retrieve(queries, self.codes, l1, k1, k2, coarse_to_fine)

    def combined(self, queries: torch.Tensor, l1: int = 6, k1: int = 100, k2: int = 20,
                 coarse_to_fine: bool = True) -> torch.Tensor:
        """The similarity-weighted combination of the retrieved codes, ``(B, L, D)``."""
        indices, sims = self.retrieve(queries, l1, k1, k2, coarse_to_fine)
        return weighted_combination(self.codes.to(queries.device)[indices], sims).to(queries.dtype)

    def restore(self, queries: torch.Tensor, l1: int = 6, k1: int = 100, k2: int = 20, l2: int = 9,
                coarse_to_fine: bool = True) -> torch.Tensor:
        """The pseudo-healthy code of each query: retrieval, combination, partial swap at ``l2``."""
        return partial_swap(queries, self.combined(queries, l1, k1, k2, coarse_to_fine), l2)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"codes": self.codes.cpu(), "sources": self.sources, "info": self.info}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "LatentRepository":
        path = Path(path)
        if not path.is_file():
            raise RepositoryMissing(
                f"No latent repository at {path}: build it after training (medanomaly train runs it; or "
                "python -m monai.bundle run --config_file "
                "\"['configs/inference.yaml','configs/build_repository.yaml']\" "
                f"--model_dir {path.parent}).")
        state = torch.load(path, map_location="cpu", weights_only=True)
        repository = cls(state["codes"], state.get("sources"), state.get("info"))
        return repository.to(device) if device is not None else repository


def load_repository(model_dir: str | os.PathLike, device=None, filename: str = REPOSITORY_FILE) -> LatentRepository:
    """The repository saved beside the weights in ``model_dir``."""
    return LatentRepository.load(Path(model_dir) / filename, device)
