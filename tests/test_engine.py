"""Our engine: how many passes a fit makes, the cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace import engine as engine_module
from ekfac_laplace import lowrank
from ekfac_laplace.accumulators import FactorAccumulator
from ekfac_laplace.batches import LaplaceBatches
from ekfac_laplace.engine import FastEKFAC
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.options import EKFACOptions
from ekfac_laplace.sketch import CurvatureSketch, block_seed
from tests.cases import CASE_IDS, CASES, Case, fit_factors, loader
from tests.utils import assert_close, reference_ekfac


def _count_forwards(model: nn.Module) -> list[int]:
    count = [0]
    model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize(
    ("options", "eigenbasis", "passes"),
    [
        ({}, False, 1),  # the default cache holds this small problem: replay
        ({"cache_budget_bytes": 0}, False, 2),  # no cache: a second pass
        ({"cache_budget_bytes": 2000}, False, 2),  # projected over budget
        ({"cache_budget_bytes": 0}, True, 1),  # online: one pass in a fixed basis
    ],
)
def test_pass_count(options, eigenbasis, passes):
    case = CASES[4]  # a CNN: hidden layers with weight sharing
    model, X, y = case.make()
    params = list(model.parameters())
    basis = fit_factors(model, params, X, y, case.likelihood).eigenvectors
    forwards = _count_forwards(model)
    engine = FastEKFAC(
        model,
        ParameterLayout(model, params),
        case.likelihood,
        EKFACOptions(**options),
        num_data=len(X),
    )
    batches = LaplaceBatches(loader(X, y, batch_size=5))
    engine.compute(batches, basis if eigenbasis else None)
    assert batches.passes == passes
    assert forwards[0] == passes * 5  # 24 examples in batches of 5


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cache_replay_equals_a_second_pass(case: Case):
    model, X, y = case.make()
    params = list(model.parameters())
    results = [
        fit_factors(
            model,
            params,
            X,
            y,
            case.likelihood,
            kfac_approx=case.kfac_approx,
            cache_budget_bytes=budget,
        )
        for budget in (2**30, 0, 2000)  # replay, two passes, projected over budget
    ]
    for cached, two_pass, small in zip(*(r.eigenvalues for r in results)):
        assert_close(cached, two_pass)
        assert_close(cached, small)
    assert_close(results[0].loss, results[1].loss)


@pytest.mark.parametrize("fisher_type", ["type2", "mc"])
def test_outputs_changed_in_place_fall_back_to_parameter_targets(fisher_type):
    """Hidden outputs modified in place (ReLU(inplace=True)) give the same EKFAC."""

    def net(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.ReLU(inplace=inplace),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, 4),
            nn.ReLU(inplace=inplace),
            nn.Linear(4, 3),
        ).double()

    X = torch.randn(10, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    results = []
    for inplace in (False, True):
        model = net(inplace)
        params = list(model.parameters())
        options = {"fisher_type": fisher_type, "cache_budget_bytes": 0}
        results.append(fit_factors(model, params, X, y, "classification", **options))
    for plain, in_place in zip(*(r.eigenvalues for r in results)):
        assert_close(in_place, plain)


def test_partial_cache_replays_the_smallest_layers_and_revisits_the_rest(monkeypatch):
    """Budgets between nothing and everything: some layers replayed, some revisited."""
    made: list[FactorAccumulator] = []

    class Recording(FactorAccumulator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(engine_module, "FactorAccumulator", Recording)
    case = CASES[4]  # a CNN: two convolutions (compact entries) and a linear head
    model, X, y = case.make()
    params = list(model.parameters())
    reference = fit_factors(model, params, X, y, case.likelihood, cache_budget_bytes=0)
    n_layers = len(ParameterLayout(model, params).layers)
    partial = set()
    for budget in (2**k for k in range(8, 22)):
        made.clear()
        result = fit_factors(
            model, params, X, y, case.likelihood, cache_budget_bytes=budget
        )
        for values, expected in zip(result.eigenvalues, reference.eigenvalues):
            assert_close(values, expected)
        if 0 < len(made[0].cached) < n_layers:
            partial.add(len(made[0].cached))
    assert partial  # at least one budget cached some layers but not all


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_accumulate_in_float32(dtype):
    """The factors, eigenvalues and loss of a float16 / bfloat16 model are float32,
    within the model's own rounding of a float64 fit of the same weights."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    from ekfac_laplace import EKFACLaplace

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)
    ).to(dtype)
    X = torch.randn(40, 6).to(dtype)
    y = torch.randint(0, 3, (40,))
    half = EKFACLaplace(model, "classification")
    half.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    reference = EKFACLaplace(copy.deepcopy(model).double(), "classification")
    reference.fit(DataLoader(TensorDataset(X.double(), y), batch_size=10))
    assert half.loss.dtype == torch.float32
    for values, basis, expected in zip(
        half.H.eigenvalues, half.H.eigenvectors, reference.H.eigenvalues
    ):
        assert values.dtype == torch.float32
        assert all(q.dtype == torch.float32 for q in basis)
        torch.testing.assert_close(
            values.double().sum(), expected.sum(), rtol=1e-2, atol=0
        )
    probs = half(X[:4], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(
        probs.double(), reference(X[:4].double()), rtol=2e-2, atol=2e-3
    )
    assert torch.isfinite(half.log_marginal_likelihood())


class _Route(torch.autograd.Function):
    """``cat([u, v], 1)`` whose backward gives no gradient (``None``) to an input
    whose share of the output gradient is all zero, as some autograd functions do."""

    @staticmethod
    def forward(ctx, u, v):
        ctx.split = u.shape[1]
        return torch.cat([u, v], dim=1)

    @staticmethod
    def backward(ctx, grad):
        parts = grad[:, : ctx.split], grad[:, ctx.split :]
        return tuple(part if bool(part.any()) else None for part in parts)


class _Heads(nn.Module):
    """A body and two regression heads, one behind a diagonal-block LayerNorm."""

    def __init__(self, route: bool) -> None:
        super().__init__()
        self.route = route
        self.body = nn.Linear(4, 5)
        self.first = nn.Linear(5, 2)
        self.norm = nn.LayerNorm(5)
        self.second = nn.Linear(5, 1)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        u, v = self.first(h), self.second(self.norm(h))
        return _Route.apply(u, v) if self.route else torch.cat([u, v], dim=1)


def test_a_pass_that_does_not_reach_a_layer_adds_zero_to_fit_and_predictive():
    """Regression's backward passes are one-hot: pass k reaches only head k's layers.

    Where autograd hands those layers no gradient at all (``_Route``), the fit and
    the GLM predictive equal those of the same model handing them zeros
    (``torch.cat``), and the predictive equals the dense-Jacobian one.
    """
    from laplace import Laplace

    torch.manual_seed(0)
    X = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randn(12, 3, dtype=torch.float64)
    routed = _Heads(route=True).double()
    plain = _Heads(route=False).double()
    plain.load_state_dict(routed.state_dict())
    results = []
    for model in (routed, plain):
        la = Laplace(model, "regression", "all", hessian_structure="ekfac")
        la.fit(loader(X, y, 4))
        results.append((la, la._glm_predictive_distribution(X[:5], joint=True)))
    (la, (mean, cov)), (plain_la, (plain_mean, plain_cov)) = results
    assert_close(
        la.posterior_precision.to_matrix(), plain_la.posterior_precision.to_matrix()
    )
    assert_close(mean, plain_mean)
    assert_close(cov, plain_cov)
    # The dense reference: J P⁻¹ Jᵀ from every output's gradient (None: zero).
    params = list(routed.parameters())
    f = routed(X[:5])
    rows = []
    for output in f.flatten():
        grads = torch.autograd.grad(
            output, params, retain_graph=True, allow_unused=True
        )
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for p, g in zip(params, grads)
                ]
            )
        )
    J = torch.stack(rows)
    precision = la.posterior_precision.to_matrix()
    assert_close(cov, J @ torch.linalg.solve(precision, J.T))


def test_a_layer_that_no_backward_pass_reaches_is_refused():
    class _Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            self.unused(x)  # runs, but the outputs do not depend on it
            return self.used(torch.tanh(x))

    model = _Unused()
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match=r"reaches layer\(s\) \['unused'\]"):
        fit_factors(model, list(model.parameters()), X, y, "classification")


# ------------------------------------------------------- low-rank correction
def _reference_corrected(
    exact: torch.Tensor,
    basis: tuple[torch.Tensor, ...],
    diagonal_block: torch.Tensor,
    shape: tuple[int, ...],
    rank: int,
    seed: int,
    scale: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """``Q (D + U S Uᵀ) Qᵀ`` built densely: ``R = Qᵀ B Q``, its sketches by hand.

    ``exact`` is the block the sketch saw (a subsample's), ``diagonal_block`` the
    one the diagonal comes from (every example's); ``shape`` the accumulator's
    ``(…, d_out, d_in)``, the block's own the transposed one if ``transposed``.
    """
    Q = torch.kron(*basis) if len(basis) == 2 else basis[0]
    R = Q.mT @ exact @ Q
    first = CurvatureSketch.new(shape, rank, seed, torch.float64, torch.device("cpu"))
    if first.exact:
        values, vectors = torch.linalg.eigh(R)
        U, S = vectors.flip(1)[:, :rank], values.flip(0)[:rank].clamp_min(0)
    else:
        omega = first.omega()
        if transposed:  # Ω's rows in the block's own layout
            columns = omega.shape[1]
            omega = omega.reshape(*shape, columns).transpose(-3, -2)
            omega = omega.reshape(-1, columns)
        Q1 = torch.linalg.qr(R @ omega).Q
        U, S = lowrank.nystrom_eigenpairs(R @ Q1, Q1, rank)
    S = S * scale
    diagonal = (Q.mT @ diagonal_block @ Q).diagonal()
    D = (diagonal - U.square() @ S).clamp_min(0)
    return Q @ (torch.diag(D) + (U * S) @ U.mT) @ Q.mT


def _accumulator_shape(param: torch.Tensor, basis: tuple[torch.Tensor, ...]):
    return tuple(q.shape[-1] for q in basis)


@pytest.mark.parametrize("budget", [2**30, 0])  # replayed from the cache, or a pass
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_low_rank_correction_is_the_dense_construction(case: Case, budget: int):
    model, X, y = case.make()
    params = list(model.parameters())
    rank = 2
    factors = fit_factors(
        model,
        params,
        X,
        y,
        case.likelihood,
        kfac_approx=case.kfac_approx,
        cache_budget_bytes=budget,
        correction_rank=rank,
    )
    plain = fit_factors(
        model, params, X, y, case.likelihood, kfac_approx=case.kfac_approx
    )
    for ours, theirs in zip(factors.eigenvalues, plain.eigenvalues):
        assert_close(ours, theirs)  # the diagonal is EKFAC's
    exact = reference_ekfac(
        model, params, X, y, case.likelihood, kfac_approx=case.kfac_approx
    )["exact"]
    matrix = factors.to_decomposed()
    assert set(factors.corrections) == set(range(len(params)))
    seed = EKFACOptions().seed
    for index, (basis, block) in enumerate(zip(factors.eigenvectors, exact)):
        shape = _accumulator_shape(params[index], basis)
        expected = _reference_corrected(
            block, basis, block, shape, rank, block_seed(seed, index)
        )
        sizes = [p.numel() for p in params]
        start = sum(sizes[:index])
        got = matrix.to_matrix()[start : start + sizes[index]][
            :, start : start + sizes[index]
        ]
        assert_close(got, expected)


def test_a_correction_of_full_rank_is_the_exact_block_and_rank_zero_is_ekfac():
    case = CASES[4]
    model, X, y = case.make()
    params = list(model.parameters())
    full = fit_factors(model, params, X, y, case.likelihood, correction_rank=54)
    exact = reference_ekfac(model, params, X, y, case.likelihood)["exact"]
    sizes = [p.numel() for p in params]
    dense = full.to_decomposed().to_matrix()
    for index, block in enumerate(exact):
        start = sum(sizes[:index])
        window = slice(start, start + sizes[index])
        assert_close(dense[window][:, window], block)
    none = fit_factors(model, params, X, y, case.likelihood, correction_rank=0)
    assert none.corrections == {}
    assert all(c is None for c in none.to_decomposed().corrections)


def test_the_sketch_sees_the_first_correction_examples_scaled_to_all():
    case = CASES[4]  # a CNN: shared weights, sketched per example
    model, X, y = case.make()
    params = list(model.parameters())
    # Batches of 5: the first two (10 examples) are sketched, N = 24.
    factors = fit_factors(
        model, params, X, y, case.likelihood, correction_rank=2, correction_examples=8
    )
    every = reference_ekfac(model, params, X, y, case.likelihood)["exact"]
    first = reference_ekfac(model, params, X[:10], y[:10], case.likelihood)["exact"]
    matrix = factors.to_decomposed().to_matrix()
    sizes = [p.numel() for p in params]
    seed = EKFACOptions().seed
    for index, basis in enumerate(factors.eigenvectors):
        shape = _accumulator_shape(params[index], basis)
        expected = _reference_corrected(
            first[index], basis, every[index], shape, 2, block_seed(seed, index), 2.4
        )
        start = sum(sizes[:index])
        window = slice(start, start + sizes[index])
        assert_close(matrix[window][:, window], expected)


def test_grouped_transposed_and_separate_bias_blocks_are_corrected_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, groups=2),  # a basis per group
        nn.Tanh(),
        nn.ConvTranspose1d(4, 2, 2, stride=2, groups=2),  # a bias of its own
        nn.Flatten(),
        nn.Linear(2 * 8, 3),
    ).double()
    X, y = torch.randn(14, 2, 4, dtype=torch.float64), torch.randint(0, 3, (14,))
    params = list(model.parameters())
    factors = fit_factors(model, params, X, y, "classification", correction_rank=3)
    exact = reference_ekfac(model, params, X, y, "classification")["exact"]
    dense = factors.to_decomposed().to_matrix()
    sizes = [p.numel() for p in params]
    seed = EKFACOptions().seed
    for index, (basis, block) in enumerate(zip(factors.eigenvectors, exact)):
        start = sum(sizes[:index])
        window = slice(start, start + sizes[index])
        if basis[0].ndim == 3:  # per group: R is block-diagonal over the groups
            Q = torch.block_diag(
                *[
                    torch.kron(*[q[g] for q in basis])
                    if len(basis) == 2
                    else basis[0][g]
                    for g in range(basis[0].shape[0])
                ]
            )
            shape = (basis[0].shape[0], *(q.shape[-1] for q in basis))
            transposed = index == 2  # the transposed convolution's weight
            if transposed:
                shape = (*shape[:-2], shape[-1], shape[-2])
            expected = _reference_corrected(
                block, (Q,), block, shape, 3, block_seed(seed, index),
                transposed=transposed,
            )  # fmt: skip
        else:
            expected = _reference_corrected(
                block, basis, block, tuple(q.shape[-1] for q in basis), 3,
                block_seed(seed, index),
            )  # fmt: skip
        assert_close(dense[window][:, window], expected)
