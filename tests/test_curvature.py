"""EKFAC curvature against the dense brute-force reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace._compat import has_module_hooks
from ekfac_laplace.factors import likelihood_loss
from tests.cases import CASE_IDS, CASES, Case, fit_factors, last_layer_params
from tests.utils import (
    assert_close,
    corrected_eigenvalues,
    ekfac_in_basis,
    reference_ekfac,
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
    factors = fit_factors(
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
    factors = fit_factors(
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
        fit_factors(
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
def test_monte_carlo_fisher_is_seeded(engine: str):
    """Same seed, same labels (whatever the global generator); another seed differs.
    That the estimate is unbiased, with the right variance, is tested against the
    exact moments in tests/test_curvlinops_engine.py."""
    case = CASES[0]
    model, X, y = case.make()
    params = list(model.parameters())
    mc = {"fisher_type": "mc", "engine": engine}
    first = fit_factors(model, params, X, y, case.likelihood, seed=3, **mc)
    torch.manual_seed(1)
    again = fit_factors(model, params, X, y, case.likelihood, seed=3, **mc)
    other = fit_factors(model, params, X, y, case.likelihood, seed=4, **mc)
    for a, b, c in zip(first.eigenvalues, again.eigenvalues, other.eigenvalues):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ekfac_never_further_from_exact_than_kfac(case: Case, fisher_type: str):
    model, X, y = case.make(seed=1)
    params = list(model.parameters())
    ref = reference_ekfac(
        model, params, X, y, case.likelihood, fisher_type, case.kfac_approx
    )
    ours = _dense_blocks(
        fit_factors(
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
    ours = _dense_blocks(fit_factors(model, params, X, y, "regression"))
    for exact, kfac, ekfac in zip(ref["exact"], ref["kfac"], ours):
        assert_close(kfac, exact)
        assert_close(ekfac, exact)


@pytest.mark.parametrize("engine", ENGINES)
def test_online_eigenbasis_gives_eigenvalues_in_that_basis(engine: str):
    case = CASES[0]
    model, X, y = case.make()
    params = list(model.parameters())
    first = fit_factors(model, params, X[:6], y[:6], case.likelihood, engine=engine)
    second = fit_factors(
        model,
        params,
        X[6:],
        y[6:],
        case.likelihood,
        eigenbasis=first.eigenvectors,
        fitted=first.layout,
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
        fit_factors(model, params, X, y, case.likelihood, fisher_type="gauss")
    with pytest.raises(ValueError, match="kfac_approx"):
        fit_factors(model, params, X, y, case.likelihood, kfac_approx="both")
    with pytest.raises(ValueError, match="mc_samples=3 only applies"):
        fit_factors(model, params, X, y, case.likelihood, mc_samples=3)
    with pytest.raises(ValueError, match="positive integer"):
        fit_factors(
            model, params, X, y, case.likelihood, fisher_type="mc", mc_samples=0
        )
    with pytest.raises(ValueError, match="likelihoods"):
        fit_factors(model, params, X, y, "reward_modeling")
    with pytest.raises(ValueError, match="eigenbasis has 1 blocks"):
        fit_factors(model, params, X, y, case.likelihood, eigenbasis=[(torch.eye(5),)])

    # With unsupported_layers="raise", layers without a Kronecker factorisation are
    # refused by name (the default gives them diagonal blocks: tests/test_diagonal).
    normed = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"'1.weight' belongs to a LayerNorm"):
        fit_factors(
            normed,
            list(normed.parameters()),
            X,
            y,
            case.likelihood,
            unsupported_layers="raise",
        )
    with pytest.raises(ValueError, match="Unknown unsupported_layers"):
        fit_factors(model, params, X, y, case.likelihood, unsupported_layers="ignore")


@pytest.mark.parametrize("engine", ENGINES)
def test_non_finite_curvature_names_the_layer(engine: str):
    case = CASES[0]
    model, X, y = case.make()
    X = X.clone()
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0' is not finite"):
        fit_factors(
            model, list(model.parameters()), X, y, case.likelihood, engine=engine
        )


def test_foreign_parameters_are_refused():
    case = CASES[0]
    model, X, y = case.make()
    stranger = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        fit_factors(model, [stranger], X, y, case.likelihood)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failing_pass_leaves_no_hooks_on_the_model(engine: str):
    case = CASES[0]
    model, X, y = case.make()
    bad_targets = torch.full_like(y, 7)  # class 7 of 3: the pass fails on its batch
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        fit_factors(
            model,
            list(model.parameters()),
            X,
            bad_targets,
            case.likelihood,
            engine=engine,
        )
    assert not any(has_module_hooks(module) for module in model.modules())
