"""The Jacobian-free GLM predictive against the dense-Jacobian path."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from torch import nn

from ekfac_laplace.capture import ReusedModuleError
from ekfac_laplace.predictive import _rotated_jacobian, glm_predictive_variance
from tests.cases import CASE_IDS, CASES, Case, loader
from tests.utils import assert_close


def _fitted(model, likelihood, X, y, subset="all", **kwargs):
    la = Laplace(
        model, likelihood, subset_of_weights=subset, hessian_structure="ekfac", **kwargs
    )
    la.fit(loader(X, y))
    return la


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_variance_equals_dense_jacobian_path(case: Case, subset: str):
    model, X, y = case.make()
    la = _fitted(model, case.likelihood, X, y, subset, prior_precision=0.7)
    fast_mu, fast_var = la._glm_predictive_distribution(X[:6])
    dense_mu, dense_var = la._dense_glm_predictive_distribution(X[:6], False, False)
    assert_close(fast_mu, dense_mu)
    assert_close(fast_var, dense_var)
    _, fast_diag = la._glm_predictive_distribution(X[:6], diagonal_output=True)
    assert_close(fast_diag, torch.diagonal(dense_var, dim1=-2, dim2=-1))
    fast_mu, fast_cov = la._glm_predictive_distribution(X[:6], joint=True)
    dense_mu, dense_cov = la._dense_glm_predictive_distribution(X[:6], True, False)
    assert_close(fast_mu, dense_mu)
    assert_close(fast_cov, dense_cov)


def test_fast_path_never_asks_for_jacobians(monkeypatch):
    case = CASES[0]
    model, X, y = case.make()
    la = _fitted(model, case.likelihood, X, y)

    def forbidden(*args, **kwargs):
        raise AssertionError("dense Jacobians requested")

    monkeypatch.setattr(la.backend, "jacobians", forbidden)
    probs = la(X[:3], pred_type="glm", link_approx="probit")
    assert probs.shape == (3, 3)


def test_inplace_activations_are_supported():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)
    ).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    la = _fitted(model, "classification", X, y)
    _, fast = la._glm_predictive_distribution(X)
    _, dense = la._dense_glm_predictive_distribution(X, False, False)
    assert_close(fast, dense)


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class _UsedOnce(_Reused):
    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)))


def test_a_layer_used_twice_is_refused_by_fit_and_falls_back_in_prediction():
    torch.manual_seed(0)
    model = _Reused().double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    with pytest.raises(
        ValueError,
        match="Module 'inner' runs 2 times per forward pass and each of these",
    ):
        _fitted(model, "classification", X, y)
    # A posterior with the same block layout, fitted on a model that uses it once.
    once = _UsedOnce().double()
    once.load_state_dict(model.state_dict())
    la = _fitted(once, "classification", X, y)
    la.model, la.params = model, list(model.parameters())
    with pytest.raises(ReusedModuleError, match="runs 2 times per forward pass"):
        glm_predictive_variance(
            model, list(model.parameters()), la.posterior_precision, X, la.fitted_layout
        )
    _, var = la._glm_predictive_distribution(X)
    _, dense = la._dense_glm_predictive_distribution(X, False, False)
    assert_close(var, dense)


def test_backprop_uses_the_dense_path_and_joint_the_fast_one():
    case = CASES[3]  # multi-output regression
    model, X, y = case.make()
    la = _fitted(model, case.likelihood, X, y, enable_backprop=True)
    x = X[:3].clone().requires_grad_(True)
    mean, var = la(x, pred_type="glm")
    var.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    la = _fitted(model, case.likelihood, X, y)
    mean, cov = la(X[:3], pred_type="glm", joint=True)
    assert cov.shape == (6, 6)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.unused_norm = nn.LayerNorm(5)  # a diagonal block that never runs

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("kronecker", [False, True], ids=["diagonal", "kronecker"])
def test_a_module_that_does_not_run_keeps_its_prior(kronecker: bool):
    """Its curvature is zero, the posterior there the prior, and it adds nothing to
    the variance; a Kronecker layer like an expert that no example is routed to
    (zero factors)."""
    torch.manual_seed(0)
    model = _WithUnused().double()
    if kronecker:
        model.unused_norm = nn.Linear(5, 5).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    la = _fitted(model, "classification", X, y)
    assert all(v.abs().max() == 0 for v in la.H.eigenvalues[-2:])
    fast_mu, fast_var = la._glm_predictive_distribution(X[:4])
    dense_mu, dense_var = la._dense_glm_predictive_distribution(X[:4], False, False)
    assert_close(fast_mu, dense_mu)
    assert_close(fast_var, dense_var)


def test_the_predictive_leaves_nothing_for_the_garbage_collector(monkeypatch):
    """The capture's receiver (a closure that holds the capture) is cleared when
    the passes end, so that a call's capture, inputs and terms are freed by
    reference counting when it returns, not at the collector's next run."""
    import gc
    import weakref

    from ekfac_laplace.capture import ForwardCapture

    case = CASES[0]
    model, X, y = case.make()
    la = _fitted(model, case.likelihood, X, y)
    captures = []
    enter = ForwardCapture.__enter__

    def recorded(self):
        captures.append(weakref.ref(self))
        return enter(self)

    monkeypatch.setattr(ForwardCapture, "__enter__", recorded)
    gc.disable()
    try:
        glm_predictive_variance(
            model, la.params, la.posterior_precision, X[:3], la.fitted_layout
        )
        assert len(captures) == 1 and captures[0]() is None
    finally:
        gc.enable()


def test_a_refusal_inside_the_backward_pass_reaches_the_fallback(monkeypatch):
    """Each layer's gradient is reduced inside autograd's backward pass: a
    CaptureError raised there reaches the caller as itself, and laplace-torch's
    dense path answers instead."""
    import ekfac_laplace.predictive as predictive
    from ekfac_laplace.errors import CaptureError

    case = CASES[0]
    model, X, y = case.make()
    la = _fitted(model, case.likelihood, X, y)
    dense_mu, dense_var = la._dense_glm_predictive_distribution(X[:3], False, False)

    def refuse(self, gradient, c):
        raise CaptureError("refused while reducing")

    monkeypatch.setattr(predictive._LayerTerms, "add", refuse)
    with pytest.raises(CaptureError, match="refused while reducing"):
        glm_predictive_variance(
            model, la.params, la.posterior_precision, X[:3], la.fitted_layout
        )
    mu, var = la._glm_predictive_distribution(X[:3])
    assert_close(mu, dense_mu)
    assert_close(var, dense_var)


def test_a_layer_with_two_gradients_in_one_pass_is_refused(monkeypatch):
    """Each layer runs once per forward pass (a second call is refused there), so
    its output gradient arrives once per backward pass. Should a second arrive (two
    hooks on one output, simulated here), the predictive refuses it by name."""
    from ekfac_laplace.capture import ForwardCapture
    from ekfac_laplace.errors import CaptureError

    case = CASES[0]
    model, X, y = case.make()
    la = _fitted(model, case.likelihood, X, y)
    watch = ForwardCapture._watch

    def twice(self, name, output):
        watch(self, name, output)
        watch(self, name, output)

    monkeypatch.setattr(ForwardCapture, "_watch", twice)
    with pytest.raises(CaptureError, match="received 2 gradients in one backward"):
        glm_predictive_variance(
            model, la.params, la.posterior_precision, X[:3], la.fitted_layout
        )


@pytest.mark.parametrize(
    ("positions", "out", "width"),
    [(40, 3, 5), (40, 5, 3), (2, 6, 6)],  # summed first (LoRA-like), rotated first
    ids=["narrow_in", "narrow_out", "few_positions"],
)
def test_rotated_jacobians_equal_the_definition_in_either_order(
    positions: int, out: int, width: int
):
    torch.manual_seed(0)
    B, K, G = 3, 2, 2
    g = torch.randn(B, K, positions, G, out, dtype=torch.float64)
    a = torch.randn(B, positions, G, width, dtype=torch.float64)
    q_g = torch.linalg.qr(torch.randn(G, out, out, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(G, width, width, dtype=torch.float64))[0]
    expected = torch.zeros(B, K, G, out, width, dtype=torch.float64)
    for n in range(B):
        for c in range(K):
            for group in range(G):
                J = sum(
                    torch.outer(g[n, c, s, group], a[n, s, group])
                    for s in range(positions)
                )
                expected[n, c, group] = q_g[group].T @ J @ q_a[group]
    rotated_a = torch.einsum("bsgi,gij->bsgj", a, q_a)
    for c in range(K):  # one backward pass at a time, in either order
        assert_close(
            _rotated_jacobian(g[:, c], rotated_a, q_g, q_a, True), expected[:, c]
        )
        assert_close(_rotated_jacobian(g[:, c], a, q_g, q_a, False), expected[:, c])
