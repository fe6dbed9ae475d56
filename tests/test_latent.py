"""medanomaly.latent: coarse-to-fine retrieval equals a brute-force loop, the weighted
combination, the partial swap, slice selection and the repository's save / load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.latent import (
    LatentRepository,
    RepositoryMissing,
    load_repository,
    partial_swap,
    retrieve,
    select_fraction,
    weighted_combination,
)


def _codes(n: int, layers: int = 12, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, layers, dim, generator=g) + 0.5  # a shared mean, like W+ codes around w_avg


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def brute_force(query: np.ndarray, codes: np.ndarray, l1: int, k1: int, k2: int, l2: int, coarse_to_fine=True):
    """The method as written in METHODS.md, one query at a time, with Python loops."""
    if coarse_to_fine:
        coarse = [_cosine(query[:l1].ravel(), code[:l1].ravel()) for code in codes]
        candidates = sorted(range(len(codes)), key=lambda i: -coarse[i])[:k1]
        fine = {i: _cosine(query[l1:].ravel(), codes[i][l1:].ravel()) for i in candidates}
    else:
        fine = {i: _cosine(query.ravel(), code.ravel()) for i, code in enumerate(codes)}
    chosen = sorted(fine, key=lambda i: -fine[i])[:k2]
    sims = np.array([max(fine[i], 0.0) for i in chosen])
    combined = sum(s / sims.sum() * codes[i] for s, i in zip(sims, chosen))
    restored = np.concatenate([query[:l2], combined[l2:]])
    return chosen, np.array([fine[i] for i in chosen]), restored


@pytest.mark.parametrize("coarse_to_fine", [True, False])
def test_batched_retrieval_combination_and_swap_equal_brute_force(coarse_to_fine):
    codes, queries = _codes(150), _codes(7, seed=1)
    l1, k1, k2, l2 = 6, 40, 10, 9
    indices, sims = retrieve(queries, codes, l1, k1, k2, coarse_to_fine)
    restored = LatentRepository(codes).restore(queries, l1, k1, k2, l2, coarse_to_fine)
    assert indices.shape == (7, k2) and restored.shape == queries.shape
    for b in range(len(queries)):
        chosen, expected_sims, expected = brute_force(queries[b].double().numpy(), codes.double().numpy(),
                                                      l1, k1, k2, l2, coarse_to_fine)
        assert indices[b].tolist() == chosen
        np.testing.assert_allclose(sims[b].numpy(), expected_sims, atol=1e-5)
        np.testing.assert_allclose(restored[b].numpy(), expected, atol=1e-4)


def test_coarse_stage_restricts_the_fine_stage():
    """A code that matches the query's fine layers perfectly but not its coarse ones is found by
    one-stage retrieval with k2 = 1 only if it also ranks in the coarse top k1."""
    codes, query = _codes(50), _codes(1, seed=3)
    codes[17, 6:] = query[0, 6:]  # fine layers identical
    codes[17, :6] = -query[0, :6]  # coarse layers opposite
    fine_only, _ = retrieve(query, codes, l1=6, k1=50, k2=1)
    assert fine_only.item() == 17  # k1 = everything: the fine stage decides
    coarse_first, _ = retrieve(query, codes, l1=6, k1=10, k2=1)
    assert coarse_first.item() != 17


def test_k1_and_k2_are_capped_at_the_repository_size():
    codes, queries = _codes(5), _codes(2, seed=1)
    indices, sims = retrieve(queries, codes, l1=6, k1=100, k2=20)
    assert indices.shape == (2, 5) and sorted(indices[0].tolist()) == list(range(5))
    with pytest.raises(ValueError, match="l1"):
        retrieve(queries, codes, l1=12)


def test_weighted_combination_uses_similarity_weights():
    codes = torch.stack([torch.zeros(2, 3), torch.ones(2, 3)])[None]  # (1, 2, 2, 3)
    out = weighted_combination(codes, torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(out, torch.full((1, 2, 3), 0.75))
    # negative similarities count as zero; all non-positive: the plain mean
    torch.testing.assert_close(weighted_combination(codes, torch.tensor([[-0.5, 0.5]])), torch.ones(1, 2, 3))
    torch.testing.assert_close(weighted_combination(codes, torch.tensor([[-0.5, -0.1]])), torch.full((1, 2, 3), 0.5))


@pytest.mark.parametrize("l2", [0, 6, 9, 11, 12])
def test_partial_swap_keeps_the_first_l2_layers_of_the_test_code(l2):
    test, retrieved = _codes(3), _codes(3, seed=5)
    swapped = partial_swap(test, retrieved, l2)
    torch.testing.assert_close(swapped[:, :l2], test[:, :l2])
    torch.testing.assert_close(swapped[:, l2:], retrieved[:, l2:])
    with pytest.raises(ValueError, match="l2"):
        partial_swap(test, retrieved, 13)


def test_select_fraction_is_seeded_sorted_and_never_empty():
    a, b = select_fraction(1000, 0.05, seed=1), select_fraction(1000, 0.05, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    assert len(select_fraction(10, 0.01, seed=0)) == 1
    assert not np.array_equal(a, select_fraction(1000, 0.05, seed=2))


def test_repository_saves_and_loads_beside_the_weights(tmp_path):
    repository = LatentRepository(_codes(9), [f"sub-{i}:{i}" for i in range(9)], {"fraction": 0.05})
    repository.save(tmp_path / "repository.pt")
    loaded = load_repository(tmp_path)
    torch.testing.assert_close(loaded.codes, repository.codes)
    assert loaded.sources == repository.sources and loaded.info == {"fraction": 0.05}
    assert len(loaded) == 9 and loaded.num_layers == 12
    with pytest.raises(RepositoryMissing, match="build_repository"):
        load_repository(tmp_path / "elsewhere")


def test_bad_inputs_raise_errors_that_name_the_argument_and_the_shapes():
    codes, queries = _codes(5), _codes(3, seed=1)
    with pytest.raises(ValueError, match=r"^queries must be W\+ codes \(N, L, D\), got shape \(3, 12\)\.$"):
        retrieve(queries[:, :, 0], codes)
    with pytest.raises(ValueError, match=r"^repository codes must be W\+ codes \(N, L, D\), got shape \(5, 12\)\.$"):
        retrieve(queries, codes[:, :, 0])
    with pytest.raises(ValueError, match=r"^repository codes must be W\+ codes"):
        LatentRepository(codes[:, :, 0])
    with pytest.raises(ValueError, match=r"^Query codes \(12, 16\) and repository codes \(11, 16\) differ\.$"):
        retrieve(queries, codes[:, 1:])
    with pytest.raises(ValueError, match=r"^The latent repository is empty\.$"):
        retrieve(queries, codes[:0])
    with pytest.raises(ValueError, match=r"^Codes to swap must have one shape, got \(3, 12, 16\) and \(3, 11, 16\)\.$"):
        partial_swap(queries, queries[:, 1:], 2)
    with pytest.raises(ValueError, match=r"^l2 must lie in 0 \.\. 12, got 13\.$"):
        partial_swap(queries, queries, 13)
    with pytest.raises(ValueError, match=r"^2 sources for 5 codes\.$"):
        LatentRepository(codes, ["a", "b"])


@pytest.mark.parametrize("l1, valid", [(0, False), (1, True), (11, True), (12, False)])
def test_l1_must_split_the_layers_into_two_non_empty_stages(l1, valid):
    codes, queries = _codes(5), _codes(2, seed=1)
    if valid:
        assert retrieve(queries, codes, l1=l1, k1=3, k2=2)[0].shape == (2, 2)
    else:
        with pytest.raises(ValueError, match=rf"^l1 must lie in 1 \.\. 11 for coarse-to-fine retrieval, got {l1}\.$"):
            retrieve(queries, codes, l1=l1)
    retrieve(queries[:1], codes[:2], l1=l1, coarse_to_fine=False)  # one-stage retrieval ignores l1


def test_the_papers_settings_are_the_defaults():
    """SCRPS: l1 = 6 coarse layers, k1 = 100 coarse candidates, k2 = 20 codes combined, swap at l2 = 9."""
    import inspect

    expected = {"l1": 6, "k1": 100, "k2": 20, "coarse_to_fine": True}
    for function in (retrieve, LatentRepository.retrieve, LatentRepository.combined, LatentRepository.restore):
        defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()
                    if name in expected or name == "l2"}
        assert defaults == {**expected, **({"l2": 9} if function is LatentRepository.restore else {})}
    assert inspect.signature(select_fraction).parameters["seed"].default == 0


def test_codes_and_results_keep_their_dtype_and_sources_their_names():
    codes, queries = _codes(6).double(), _codes(2, seed=1).double()
    assert weighted_combination(codes[None, :3], torch.ones(1, 3)).dtype == torch.float64
    repository = LatentRepository(codes, [f"s{i}" for i in range(6)])
    assert repository.sources == [f"s{i}" for i in range(6)] and LatentRepository(codes).sources == list("012345")
    assert repository.combined(queries, k1=4, k2=2).dtype == torch.float64
    assert repository.combined(queries.float(), k1=4, k2=2).dtype == torch.float32


def test_select_fraction_bounds():
    np.testing.assert_array_equal(select_fraction(20, 1.0), np.arange(20))  # all of them, each once
    assert select_fraction(0, 0.5).size == 0
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"^fraction must lie in \(0, 1\], got {fraction}\.$"):
            select_fraction(10, fraction)


def test_repository_saves_into_new_folders_and_loads_onto_the_asked_device(tmp_path):
    path = LatentRepository(_codes(4)).save(tmp_path / "new" / "folder" / "repository.pt")
    assert path.is_file()
    assert LatentRepository.load(path).codes.device.type == "cpu"
    assert LatentRepository.load(path, device="meta").codes.device.type == "meta"  # a device no test machine lacks
    assert load_repository(path.parent, device="meta").codes.device.type == "meta"
    with pytest.raises(RepositoryMissing, match=r"python -m monai\.bundle run --config_file "
                                                r"\"\['configs/inference\.yaml','configs/build_repository\.yaml'\]\" "
                                                r"--model_dir .*elsewhere\)\.$"):
        LatentRepository.load(tmp_path / "elsewhere" / "repository.pt")


def test_default_settings_are_used_when_none_are_given():
    """Calls without settings equal calls with l1 = 6, k1 = 100, k2 = 20, l2 = 9, coarse-to-fine; a code
    whose coarse similarity ranks 101st but whose fine layers equal the query's tells k1 = 100 from 101."""
    codes, queries = _codes(130, dim=4), _codes(2, dim=4, seed=1)
    coarse = torch.nn.functional.cosine_similarity(codes[:, :6].flatten(1), queries[0, :6].flatten()[None], dim=1)
    rank_101 = int(coarse.argsort(descending=True)[100])
    codes[rank_101, 6:] = queries[0, 6:]
    assert rank_101 in retrieve(queries, codes, 6, 101, 20)[0][0].tolist()  # the crafted case works
    explicit = dict(l1=6, k1=100, k2=20, coarse_to_fine=True)
    indices, sims = retrieve(queries, codes)
    assert rank_101 not in indices[0].tolist()
    expected_indices, expected_sims = retrieve(queries, codes, **explicit)
    assert torch.equal(indices, expected_indices) and torch.equal(sims, expected_sims)
    repository = LatentRepository(codes)
    for got, want in zip(repository.retrieve(queries), (expected_indices, expected_sims)):
        assert torch.equal(got, want)
    torch.testing.assert_close(repository.combined(queries), repository.combined(queries, **explicit))
    assert not torch.allclose(repository.combined(queries), repository.combined(queries, coarse_to_fine=False))
    torch.testing.assert_close(repository.restore(queries), repository.restore(queries, l2=9, **explicit))
    assert not torch.allclose(repository.restore(queries), repository.restore(queries, l2=10, **explicit))


def test_select_fraction_is_seeded_with_0_by_default():
    np.testing.assert_array_equal(select_fraction(100, 0.1), select_fraction(100, 0.1, seed=0))
    assert not np.array_equal(select_fraction(100, 0.1), select_fraction(100, 0.1, seed=1))
