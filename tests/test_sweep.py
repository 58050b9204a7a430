"""One batch's sweep: what it hands the accumulators, and when it skips a pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace.accumulators import PassAccumulator
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.options import EKFACOptions
from ekfac_laplace.output_curvature import OutputCurvature
from ekfac_laplace.sweep import Sweep
from tests.cases import fit_factors
from tests.utils import assert_close, corrected_eigenvalues, reference_ekfac


class _Spy(PassAccumulator):
    """Records what a sweep hands on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []
        self.gradients: list[torch.Tensor] = []
        self.passes: list[int] = []

    def plan(self, inputs, hidden, passes, masks=None, curvature=None) -> None:
        self.passes.append(passes)

    def begin(self, layer, a) -> None:
        self.calls.append(("begin", layer.name, tuple(a.shape)))

    def gradient(self, layer, a, g, bias_rows=None) -> None:
        self.calls.append(("gradient", layer.name, tuple(g.shape)))
        self.gradients.append(g)

    def end(self, layer, a) -> None:
        self.calls.append(("end", layer.name, tuple(a.shape)))

    def output(self, layer, a, curvature) -> None:
        self.calls.append(("output", layer.name, tuple(a.shape)))


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (6,))


def _curvature_fn(fisher_type: str = "type2", mc_samples: int = 1):
    options = EKFACOptions(fisher_type=fisher_type, mc_samples=mc_samples)
    generator = torch.Generator().manual_seed(0)
    return lambda f, y: OutputCurvature(f, y, "classification", options, generator)


@pytest.mark.parametrize(
    ("fisher_type", "mc_samples", "passes"),
    [("type2", 1, 2), ("empirical", 1, 1), ("mc", 4, 4)],
)
def test_sweep_hands_each_hidden_layer_one_gradient_per_backward_pass(
    fisher_type, mc_samples, passes
):
    model, X, y = _mlp()
    layout = ParameterLayout(model, list(model.parameters()))
    spy = _Spy()
    f, _ = Sweep(model, layout).run(X, y, _curvature_fn(fisher_type, mc_samples), spy)
    assert_close(f, model(X).detach())
    # The output layer '2' gets the curvature, no backward pass; the hidden layer
    # '0' gets K = C − 1 (exact GGN of cross-entropy), 1 (empirical) or S (Monte
    # Carlo) gradients.
    assert spy.passes == [passes]
    assert spy.calls == [
        ("begin", "0", (6, 1, 4)),
        ("output", "2", (6, 1, 5)),
        *[("gradient", "0", (6, 1, 5))] * passes,
        ("end", "0", (6, 1, 4)),
    ]
    vectors = _curvature_fn(fisher_type, mc_samples)(f, y).vectors()
    hidden = model[0](X)
    for k, g in enumerate(spy.gradients):
        (expected,) = torch.autograd.grad(
            (model[2](torch.tanh(hidden)) * vectors[:, k]).sum(),
            hidden,
            retain_graph=True,
        )
        assert_close(g[:, 0], expected)


def test_last_layer_sweeps_need_no_backward_pass():
    model, X, y = _mlp()
    layout = ParameterLayout(model, list(model[2].parameters()))
    spy = _Spy()
    Sweep(model, layout).run(X, y, _curvature_fn(), spy)
    assert spy.passes == [0] and spy.calls == [("output", "2", (6, 1, 5))]


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
    spy = _Spy()
    layout = ParameterLayout(model, list(model.parameters()))
    Sweep(model, layout).run(X, y, _curvature_fn(), spy)
    assert ("output", "head", (10, 1, 5)) not in spy.calls  # a hidden layer now
    params = list(model.parameters())
    factors = fit_factors(model, params, X, y, "classification")
    ref = reference_ekfac(model, params, X, y, "classification")
    for index, basis in enumerate(factors.eigenvectors):
        expected = corrected_eigenvalues(ref["exact"][index], basis).clamp_min(0)
        assert_close(factors.eigenvalues[index].flatten(), expected)
