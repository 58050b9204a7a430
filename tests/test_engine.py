"""Our engine: how many passes a fit makes, the cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace import engine as engine_module
from ekfac_laplace.accumulators import FactorAccumulator
from ekfac_laplace.batches import LaplaceBatches
from ekfac_laplace.engine import FastEKFAC
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.options import EKFACOptions
from tests.cases import CASE_IDS, CASES, Case, fit_factors, loader
from tests.utils import assert_close


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
