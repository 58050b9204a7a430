"""EKFAC curvature against the dense brute-force reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace import EKFACOptions, compute_ekfac
from ekfac_laplace.batches import LaplaceBatches
from ekfac_laplace.factors import likelihood_loss
from tests.cases import CASE_IDS, CASES, Case, last_layer_params, loader
from tests.utils import (
    assert_close,
    corrected_eigenvalues,
    ekfac_in_basis,
    reference_ekfac,
)


def _fit(model, params, X, y, likelihood, batch_size=5, eigenbasis=None, **options):
    batches = LaplaceBatches(loader(X, y, batch_size))
    return compute_ekfac(
        model,
        params,
        batches,
        likelihood,
        len(X),
        EKFACOptions(**options),
        eigenbasis=eigenbasis,
    )


def _subsets(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    return {"all": list(model.parameters()), "last_layer": last_layer_params(model)}


def _dense_blocks(factors) -> list[torch.Tensor]:
    decomposed = factors.to_decomposed()
    sizes = decomposed.block_sizes
    dense = decomposed.to_matrix()
    out, start = [], 0
    for size in sizes:
        out.append(dense[start : start + size, start : start + size])
        start += size
    return out


ENGINES = ["fast", "curvlinops"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ekfac_matches_dense_reference(
    case: Case, fisher_type: str, subset: str, engine: str
):
    model, X, y = case.make()
    params = _subsets(model)[subset]
    factors = _fit(
        model,
        params,
        X,
        y,
        case.likelihood,
        fisher_type=fisher_type,
        kfac_approx=case.kfac_approx,
        engine=engine,
    )
    ref = reference_ekfac(
        model, params, X, y, case.likelihood, fisher_type, case.kfac_approx
    )
    ours = _dense_blocks(factors)
    for index, basis in enumerate(factors.eigenvectors):
        # The library's eigenbasis diagonalises the reference Kronecker factors.
        G = ref["G"][index]
        rotated = basis[0].T @ G @ basis[0]
        assert_close(rotated - torch.diag(torch.diagonal(rotated)), torch.zeros_like(G))
        if len(basis) == 2:
            A = ref["A"][index]
            rotated = basis[1].T @ A @ basis[1]
            assert_close(
                rotated - torch.diag(torch.diagonal(rotated)), torch.zeros_like(A)
            )
        # Corrected eigenvalues are the exact block's diagonal in that basis.
        expected = corrected_eigenvalues(ref["exact"][index], basis).clamp_min(0)
        assert_close(factors.eigenvalues[index].flatten(), expected)
        # And the dense EKFAC equals the reference built from its own eigh.
        assert_close(ours[index], ekfac_in_basis(ref["exact"][index], basis))
        assert_close(ours[index], ref["ekfac"][index], "float64_loose")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_is_laplace_torch_data_term(case: Case, engine: str):
    model, X, y = case.make()
    factors = _fit(
        model, list(model.parameters()), X, y, case.likelihood, engine=engine
    )
    loss_function, factor = likelihood_loss(case.likelihood)
    with torch.no_grad():
        expected = factor * loss_function(model(X), y)
    assert_close(factors.loss, expected)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_batch_size_invariance(case: Case, fisher_type: str, engine: str):
    model, X, y = case.make()
    params = list(model.parameters())
    results = [
        _fit(
            model,
            params,
            X,
            y,
            case.likelihood,
            batch_size=b,
            fisher_type=fisher_type,
            kfac_approx=case.kfac_approx,
            engine=engine,
        )
        .to_decomposed()
        .to_matrix()
        for b in (1, 7, len(X))
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_monte_carlo_fisher_is_seeded_and_unbiased(engine: str):
    """Seeded; with many samples, close to the exact GGN's EKFAC (the engines'
    label samplers are compared against each other below)."""
    case = CASES[0]
    model, X, y = case.make()
    params = list(model.parameters())
    mc = {"fisher_type": "mc", "engine": engine}
    first = _fit(model, params, X, y, case.likelihood, seed=3, **mc)
    again = _fit(model, params, X, y, case.likelihood, seed=3, **mc)
    other = _fit(model, params, X, y, case.likelihood, seed=4, **mc)
    for a, b, c in zip(first.eigenvalues, again.eigenvalues, other.eigenvalues):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # Many samples: the MC Fisher's dense EKFAC approaches the exact-GGN EKFAC
    # computed in the same eigenbasis (the eigenbases themselves differ slightly).
    if engine == "curvlinops":
        return  # slow with many samples; its sampler is checked against ours below
    many = _fit(model, params, X, y, case.likelihood, mc_samples=4000, seed=0, **mc)
    ref = reference_ekfac(model, params, X, y, case.likelihood, "type2")
    for index, basis in enumerate(many.eigenvectors):
        expected = corrected_eigenvalues(ref["exact"][index], basis)
        relative = (
            many.eigenvalues[index].flatten() - expected
        ).norm() / expected.norm()
        assert relative < 0.1


@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ekfac_never_further_from_exact_than_kfac(case: Case, fisher_type: str):
    model, X, y = case.make(seed=1)
    params = list(model.parameters())
    ref = reference_ekfac(
        model, params, X, y, case.likelihood, fisher_type, case.kfac_approx
    )
    ours = _dense_blocks(
        _fit(
            model,
            params,
            X,
            y,
            case.likelihood,
            fisher_type=fisher_type,
            kfac_approx=case.kfac_approx,
        )
    )
    for exact, kfac, ekfac in zip(ref["exact"], ref["kfac"], ours):
        assert (ekfac - exact).norm() <= (kfac - exact).norm() * (1 + 1e-10) + 1e-12


def test_ekfac_equals_kfac_where_kfac_is_exact():
    # One data point, one output, no weight sharing: B = (g gᵀ) ⊗ (a aᵀ) exactly.
    case = Case(
        "single",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
        "regression",
        (3,),
        1,
        n_data=1,
    )
    model, X, y = case.make()
    params = list(model.parameters())
    ref = reference_ekfac(model, params, X, y, "regression")
    ours = _dense_blocks(_fit(model, params, X, y, "regression"))
    for exact, kfac, ekfac in zip(ref["exact"], ref["kfac"], ours):
        assert_close(kfac, exact)
        assert_close(ekfac, exact)


@pytest.mark.parametrize("engine", ENGINES)
def test_online_eigenbasis_gives_eigenvalues_in_that_basis(engine: str):
    case = CASES[0]
    model, X, y = case.make()
    params = list(model.parameters())
    first = _fit(model, params, X[:6], y[:6], case.likelihood, engine=engine)
    second = _fit(
        model,
        params,
        X[6:],
        y[6:],
        case.likelihood,
        eigenbasis=first.eigenvectors,
        engine=engine,
    )
    ref = reference_ekfac(model, params, X[6:], y[6:], case.likelihood)
    for index, basis in enumerate(first.eigenvectors):
        assert second.eigenvectors[index] is basis or all(
            torch.equal(a, b) for a, b in zip(second.eigenvectors[index], basis)
        )
        expected = corrected_eigenvalues(ref["exact"][index], basis)
        assert_close(second.eigenvalues[index].flatten(), expected)


def test_errors_name_the_problem():
    case = CASES[0]
    model, X, y = case.make()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="fisher_type"):
        _fit(model, params, X, y, case.likelihood, fisher_type="gauss")
    with pytest.raises(ValueError, match="kfac_approx"):
        _fit(model, params, X, y, case.likelihood, kfac_approx="both")
    with pytest.raises(ValueError, match="mc_samples=3 only applies"):
        _fit(model, params, X, y, case.likelihood, mc_samples=3)
    with pytest.raises(ValueError, match="positive integer"):
        _fit(model, params, X, y, case.likelihood, fisher_type="mc", mc_samples=0)
    with pytest.raises(ValueError, match="likelihoods"):
        _fit(model, params, X, y, "reward_modeling")
    with pytest.raises(ValueError, match="eigenbasis has 1 blocks"):
        _fit(model, params, X, y, case.likelihood, eigenbasis=[(torch.eye(5),)])

    # With unsupported_layers="raise", layers without a Kronecker factorisation are
    # refused by name (the default gives them diagonal blocks: tests/test_diagonal).
    normed = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"'1.weight' belongs to a LayerNorm"):
        _fit(
            normed,
            list(normed.parameters()),
            X,
            y,
            case.likelihood,
            unsupported_layers="raise",
        )
    with pytest.raises(ValueError, match="Unknown unsupported_layers"):
        _fit(model, params, X, y, case.likelihood, unsupported_layers="ignore")

    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).double()
    reflect = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()
    ).double()
    for model, message in ((grouped, "groups=2"), (reflect, "padding_mode='reflect'")):
        with pytest.raises(ValueError, match=message):
            _fit(
                model,
                list(model.parameters()),
                torch.randn(3, 2, 3, 3).double(),
                torch.randint(0, 2, (3,)),
                "classification",
                unsupported_layers="raise",
            )


@pytest.mark.parametrize("engine", ENGINES)
def test_non_finite_curvature_names_the_layer(engine: str):
    case = CASES[0]
    model, X, y = case.make()
    X = X.clone()
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0' is not finite"):
        _fit(model, list(model.parameters()), X, y, case.likelihood, engine=engine)


def test_foreign_parameters_are_refused():
    case = CASES[0]
    model, X, y = case.make()
    stranger = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        _fit(model, [stranger], X, y, case.likelihood)


def test_compat_fails_loudly_on_an_unknown_curvlinops():
    from ekfac_laplace import _compat

    class Changed:
        pass

    with pytest.raises(RuntimeError, match="curvlinops-for-pytorch"):
        _compat.set_kronecker_eigenbasis(Changed(), {}, {})


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failing_pass_leaves_no_hooks_on_the_model(engine: str):
    case = CASES[0]
    model, X, y = case.make()
    bad_targets = torch.full_like(y, 7)  # class 7 of 3: cross-entropy fails mid-pass
    with pytest.raises((IndexError, RuntimeError)):
        _fit(
            model,
            list(model.parameters()),
            X,
            bad_targets,
            case.likelihood,
            engine=engine,
        )
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


MLP_CASES = [case for case in CASES if "mlp" in case.tags]
ENGINE_CASES = [(case, ft) for case in CASES for ft in ("type2", "empirical")] + [
    (case, "mc") for case in MLP_CASES
]


@pytest.mark.parametrize(
    ("case", "fisher_type"),
    ENGINE_CASES,
    ids=[f"{case.name}-{ft}" for case, ft in ENGINE_CASES],
)
def test_fast_engine_equals_curvlinops(case: Case, fisher_type: str):
    model, X, y = case.make()
    params = list(model.parameters())
    options = {"fisher_type": fisher_type, "kfac_approx": case.kfac_approx}
    if fisher_type == "mc":
        # The label samplers differ; fix the basis and compare with many samples.
        base = _fit(model, params, X, y, case.likelihood, **options)
        options.update(eigenbasis=base.eigenvectors, mc_samples=3000, seed=0)
    fast = _fit(model, params, X, y, case.likelihood, engine="fast", **options)
    reference = _fit(
        model, params, X, y, case.likelihood, engine="curvlinops", **options
    )
    if fisher_type == "mc":
        for ours, theirs in zip(fast.eigenvalues, reference.eigenvalues):
            assert (ours - theirs).norm() / theirs.norm() < 0.1
    else:
        assert_close(
            fast.to_decomposed().to_matrix(), reference.to_decomposed().to_matrix()
        )
    assert_close(fast.loss, reference.loss)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cached_and_two_pass_corrections_agree(case: Case):
    model, X, y = case.make()
    params = list(model.parameters())
    cached = _fit(
        model,
        params,
        X,
        y,
        case.likelihood,
        kfac_approx=case.kfac_approx,
        cache_budget_bytes=2**30,
    )
    two_pass = _fit(
        model,
        params,
        X,
        y,
        case.likelihood,
        kfac_approx=case.kfac_approx,
        cache_budget_bytes=0,
    )
    small = _fit(
        model,
        params,
        X,
        y,
        case.likelihood,
        kfac_approx=case.kfac_approx,
        cache_budget_bytes=2000,  # the first batch projects more than that
    )
    for a, b, c in zip(cached.eigenvalues, two_pass.eigenvalues, small.eigenvalues):
        assert_close(a, b)
        assert_close(a, c)
    with pytest.raises(ValueError, match="engine"):
        _fit(model, params, X, y, case.likelihood, engine="backpack")


class _ScaledInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out = self.head(self.body(x))
        out *= 2.0  # the head's output is modified in place: not the raw output
        return out


def test_output_layer_shortcut_is_not_fooled_by_in_place_changes():
    torch.manual_seed(0)
    model = _ScaledInPlace().double()
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    params = list(model.parameters())
    factors = _fit(model, params, X, y, "classification")
    ref = reference_ekfac(model, params, X, y, "classification")
    for index, basis in enumerate(factors.eigenvectors):
        expected = corrected_eigenvalues(ref["exact"][index], basis).clamp_min(0)
        assert_close(factors.eigenvalues[index].flatten(), expected)
