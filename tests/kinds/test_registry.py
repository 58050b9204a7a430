"""The registry of layer kinds: what is registered, in which order, and a new kind."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from ekfac_laplace import EKFACLaplace
from ekfac_laplace.kinds import LayerKind, kind_of, registered_kinds
from ekfac_laplace.kinds.base import LayerKind as Base
from ekfac_laplace.layout import ParameterLayout
from tests.cases import loader
from tests.utils import assert_close, blocks, corrected_eigenvalues, dense_ggn


def test_every_kind_is_registered_once_most_specific_first():
    names = [kind.name for kind in registered_kinds()]
    assert sorted(names) == sorted(
        [
            "attention_in",
            "attention_out",
            "convolution",
            "gpt2_conv1d",
            "linear",
            "transposed_convolution",
        ]
    )
    assert names.index("attention_out") < names.index("linear")
    attention = nn.MultiheadAttention(4, 2)
    assert kind_of(attention, "out_proj", attention.out_proj, "weight")[0].name == (
        "attention_out"
    )
    assert kind_of(attention, "", attention, "in_proj_weight")[1] == "in_proj"
    assert kind_of(nn.Sequential(), "x", nn.LayerNorm(3), "weight") is None


class Bilinear(nn.Module):
    """A module no kind knows: ``y = x Wᵀ`` with its own parameter."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.kernel.T


@pytest.fixture
def bilinear_kind():
    """A new kind, declared in one class (as a new module of kinds/ would)."""
    before = list(Base._registry)

    class BilinearKind(LayerKind):
        name = "bilinear"
        description = "a Bilinear"
        weight_name = "kernel"
        base_classes = (Bilinear,)

        def claims(self, model, module_name, module, param_name):
            return module_name if isinstance(module, Bilinear) else None

    yield BilinearKind
    Base._registry[:] = before


def test_a_new_kind_is_one_class_and_gets_exact_kronecker_blocks(bilinear_kind):
    torch.manual_seed(0)
    model = nn.Sequential(Bilinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    layout = ParameterLayout(model, list(model.parameters()))
    assert [layer.kind.name for layer in layout.layers] == ["bilinear", "linear"]
    la = EKFACLaplace(model, "classification")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # passes the layer check
        la.fit(loader(X, y))
    params = list(model.parameters())
    exact = blocks(
        dense_ggn(model, params, X, "classification"), [p.numel() for p in params]
    )
    for block, basis, values in zip(exact, la.H.eigenvectors, la.H.eigenvalues):
        assert len(basis) >= 1
        assert_close(values.flatten(), corrected_eigenvalues(block, basis))


def test_a_kind_claiming_a_module_it_does_not_describe_is_caught(bilinear_kind):
    """A wrong declaration is not trusted: the layer check moves the layer."""

    class Transposing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(5, 4))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.kernel.T.tanh()  # not linear in the kernel

    bilinear_kind.base_classes = (Transposing,)
    bilinear_kind.claims = lambda self, model, name, module, param: (
        name if isinstance(module, Transposing) else None
    )
    torch.manual_seed(0)
    model = nn.Sequential(Transposing(), nn.Linear(5, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    la = EKFACLaplace(model, "classification")
    with pytest.warns(UserWarning, match="'0' does not compute y = W x"):
        la.fit(loader(X, y))
    assert la.H.eigenvectors[0] == ()
