"""Choosing blocks within a memory budget, against exhaustive search and the dense
reference: the chosen posterior must be exactly the block-diagonal matrix of the
chosen blocks (exact blocks from the dense GGN, diagonals of it, EKFAC blocks of a
plain fit), and its evidence and predictive what the selection scored."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from laplace import Laplace
from torch import Tensor, nn

from ekfac_laplace.evaluation.structures import (
    StructureSelection,
    _exhaustive,
    _greedy,
    select_structures,
)
from tests.cases import loader
from tests.utils import assert_close, dense_ggn, jacobians

PRIOR = 0.5


def _problem(n: int = 40, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()
    return model, torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def _laplace(model: nn.Module, **kwargs) -> Laplace:
    return Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="ekfac",
        prior_precision=PRIOR,
        **kwargs,
    )


def _block_diagonal(blocks: list[Tensor]) -> Tensor:
    return torch.block_diag(*blocks)


def _reference_precision(
    selection: StructureSelection, X: Tensor, plain, corrected=None
) -> Tensor:
    """Densely: each tensor's chosen block from the dense GGN or the plain fit (or,
    for a low-rank correction, the corrected fit)."""
    la = selection.laplace
    params = la.posterior_parameters
    ggn = dense_ggn(la.model, params, X, "classification")
    offsets = [0, *itertools.accumulate(p.numel() for p in params)]
    blocks = []
    for index, choice in enumerate(selection.choices):
        window = slice(offsets[index], offsets[index + 1])
        exact = ggn[window, window]
        if choice.structure == "exact":
            blocks.append(exact)
        elif choice.structure == "diagonal":
            blocks.append(torch.diag(torch.diagonal(exact)))
        elif choice.structure == "lowrank":
            blocks.append(corrected[window, window])
        else:
            blocks.append(plain[window, window])
    return _block_diagonal(blocks) + PRIOR * torch.eye(offsets[-1], dtype=X.dtype)


@pytest.mark.parametrize("budget", [900, 1600, 4000, 8000])
def test_selected_posterior_equals_the_dense_construction(budget: int) -> None:
    """Precision, log det, evidence and GLM variance of the assembled posterior."""
    model, X, y = _problem()
    plain = _laplace(model)
    plain.fit(loader(X, y))
    plain_matrix = plain.H.to_matrix()
    selection = select_structures(_laplace(model), loader(X, y), budget)
    la = selection.laplace
    reference = _reference_precision(selection, X, plain_matrix)
    assert_close(la.posterior_precision.to_matrix(), reference)
    assert_close(la.log_det_posterior_precision, torch.logdet(reference))
    # the evidence differs from the plain fit's by the log dets only
    lml = float(la.log_marginal_likelihood())
    plain_log_det = float(plain.log_det_posterior_precision)
    shift = 0.5 * (plain_log_det - float(torch.logdet(reference)))
    expected = float(plain.log_marginal_likelihood()) + shift
    assert lml == pytest.approx(expected, abs=1e-8)
    assert selection.score == pytest.approx(lml, abs=1e-10)
    J, _ = jacobians(la.model, la.posterior_parameters, X[:7])  # (B, K, P)
    dense_variance = J @ torch.linalg.solve(reference, J.mT)
    _, variance = la._glm_predictive_distribution(X[:7], joint=False)
    assert_close(variance, dense_variance)
    assert selection.total_bytes <= budget
    assert set(selection.structures.values()) <= {"diagonal", "ekfac", "exact"}


def test_low_rank_blocks_are_offered_scored_and_assembled_exactly() -> None:
    """With a correction_rank, a fourth structure: the corrected block of the same
    fit; the assembled posterior (some blocks corrected, some not) is exact, its
    evidence the score, and its state loads back."""
    model, X, y = _problem()
    plain = _laplace(model)
    plain.fit(loader(X, y))
    corrected = _laplace(model, correction_rank=2)
    corrected.fit(loader(X, y))
    seen = set()
    for budget in (900, 1300, 1600, 2400, 4000):
        selection = select_structures(
            _laplace(model, correction_rank=2), loader(X, y), budget
        )
        la = selection.laplace
        reference = _reference_precision(
            selection, X, plain.H.to_matrix(), corrected.H.to_matrix()
        )
        assert_close(la.posterior_precision.to_matrix(), reference)
        assert_close(la.log_det_posterior_precision, torch.logdet(reference))
        assert selection.score == pytest.approx(
            float(la.log_marginal_likelihood()), abs=1e-10
        )
        J, _ = jacobians(la.model, la.posterior_parameters, X[:5])
        _, variance = la._glm_predictive_distribution(X[:5], joint=False)
        assert_close(variance, J @ torch.linalg.solve(reference, J.mT))
        assert selection.total_bytes <= budget
        structures = set(selection.structures.values())
        seen |= structures
        if "lowrank" in structures:
            other = _laplace(model, correction_rank=2)
            other.load_state_dict(la.state_dict())
            assert_close(other.posterior_precision.to_matrix(), reference)
            assert "EKFAC + low rank" in selection.table()
    assert {"lowrank", "ekfac"} <= seen


def test_a_budget_between_mixes_every_structure() -> None:
    """The dense-construction test above sees all three structures at once."""
    model, X, y = _problem()
    selection = select_structures(_laplace(model), loader(X, y), 1600)
    assert set(selection.structures.values()) == {"diagonal", "ekfac", "exact"}
    table = selection.table()
    assert table.count("\n") == 2 + len(selection.choices)
    assert "log evidence" in table and "of 1600" in table


@pytest.mark.parametrize("criterion", ["evidence", "val_nll"])
def test_greedy_finds_the_exhaustive_optimum(criterion: str) -> None:
    """Over a sweep of budgets (after its exchange step) on a small model; the
    plain gain-per-byte rule alone falls short on some of them."""
    model, X, y = _problem()
    val = loader(*_problem(n=30, seed=1)[1:])
    budgets = [700, 800, 900, 1000, 1200, 1600, 2000, 2400, 3000, 4000, 6000, 9000]
    for budget in budgets:
        scores = {}
        for search in ("greedy", "exhaustive"):
            selection = select_structures(
                _laplace(model),
                loader(X, y),
                budget,
                search=search,
                criterion=criterion,
                val_loader=val,
            )
            scores[search] = selection.score
            assert selection.total_bytes <= budget
        assert scores["greedy"] == pytest.approx(scores["exhaustive"], abs=1e-9)
    # gain per byte alone falls short where a big upgrade pays only in full: A
    # gains 1.5 for 1 byte, B 5 for 4, and 4 bytes are free
    sizes, gains = [[1, 2], [1, 5]], [[0.0, 1.5], [0.0, 5.0]]

    def score(choice):
        return sum(gain[i] for gain, i in zip(gains, choice))

    assert score(_greedy(sizes, 6, score, exchange=False)) == 1.5
    assert score(_greedy(sizes, 6, score)) == 5.0
    assert score(_exhaustive(sizes, 6, score)) == 5.0


def test_val_nll_score_is_the_predictive_nll() -> None:
    """The score of ``val_nll`` is the NLL of the fitted object's own predictive."""
    model, X, y = _problem()
    X_val, y_val = _problem(n=30, seed=1)[1:]
    selection = select_structures(
        _laplace(model),
        loader(X, y),
        1600,
        criterion="val_nll",
        val_loader=loader(X_val, y_val, batch_size=7),
    )
    probs = selection.laplace(X_val, pred_type="glm", link_approx="probit")
    nll = -torch.log(probs[torch.arange(len(y_val)), y_val]).mean()
    assert selection.score == pytest.approx(float(nll), abs=1e-10)


def test_regression_and_last_layer() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randn(30, 2, dtype=torch.float64)
    la = Laplace(
        model,
        "regression",
        subset_of_weights="last_layer",
        hessian_structure="ekfac",
        sigma_noise=0.7,
    )
    selection = select_structures(
        la, loader(X, y), 2000, criterion="val_nll", val_loader=loader(X, y)
    )
    assert [c.name for c in selection.choices] == ["model.2.weight", "model.2.bias"]
    f, variance = la._glm_predictive_distribution(X, joint=False)
    total = torch.diagonal(variance, dim1=-2, dim2=-1) + 0.49
    nll = 0.5 * ((y - f).square() / total + torch.log(2 * math.pi * total))
    assert selection.score == pytest.approx(float(nll.sum(-1).mean()), abs=1e-10)


def test_refusals_leave_the_object_unchanged() -> None:
    model, X, y = _problem()
    data = loader(X, y)
    la = _laplace(model)
    with pytest.raises(ValueError, match="does not hold even the cheapest"):
        select_structures(la, data, 100)
    assert la.H is None  # the fit inside was undone
    with pytest.raises(ValueError, match="needs a val_loader"):
        select_structures(la, data, 2000, criterion="val_nll")
    with pytest.raises(ValueError, match="criterion must be one of"):
        select_structures(la, data, 2000, criterion="bic")
    with pytest.raises(ValueError, match="without dense_blocks_up_to"):
        select_structures(_laplace(model, dense_blocks_up_to=10), data, 2000)
    with pytest.raises(ValueError, match="EKFAC Laplace object"):
        select_structures(
            Laplace(model, "classification", hessian_structure="diag"), data, 2000
        )
    la.fit(data)
    before = [v.clone() for v in la.H.eigenvalues]
    with pytest.raises(ValueError, match="does not hold even the cheapest"):
        select_structures(la, data, 100)
    assert all(torch.equal(a, b) for a, b in zip(before, la.H.eigenvalues))


def _cnn_problem(n: int, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)
    ).double()
    X = torch.randn(n, 1, 5, 5, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (n,))


def test_convolutions_and_online_fits_keep_the_exact_blocks_exact() -> None:
    """A convolution's exact bias (its gradient sums the positions: not EKFAC's)
    beside an exact weight stays exact when more data is added online."""
    model, X, y = _cnn_problem(20, 0)
    X_b, y_b = _cnn_problem(12, 1)[1:]
    plain = _laplace(model)
    plain.fit(loader(X, y))
    plain_matrix = plain.H.to_matrix()
    for budget in (1200, 3000, 40000):
        selection = select_structures(_laplace(model), loader(X, y), budget)
        reference = _reference_precision(selection, X, plain_matrix)
        assert_close(selection.laplace.posterior_precision.to_matrix(), reference)
    assert set(selection.structures.values()) == {"exact"}
    la = selection.laplace
    la.fit(loader(X_b, y_b), override=False)
    params = la.posterior_parameters
    both = torch.cat([X, X_b])
    ggn = dense_ggn(la.model, params, both, "classification")
    sizes = [0, *itertools.accumulate(p.numel() for p in params)]
    exact = _block_diagonal(
        [ggn[a:b, a:b] for a, b in zip(sizes, sizes[1:])]
    ) + PRIOR * torch.eye(sizes[-1], dtype=torch.float64)
    assert_close(la.posterior_precision.to_matrix(), exact, "float64_loose")
