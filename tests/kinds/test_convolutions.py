"""Convolutions and transposed convolutions of 1, 2 and 3 spatial dimensions.

Each case is fitted and checked against the dense float64 reference: every block's
corrected eigenvalues in its own basis, that basis diagonalising the reference
Kronecker factors (patches from torch's own convolution, not our unfold), the GLM
variance ``J Σ Jᵀ`` and the samples' covariance; for both ``kfac_approx`` modes,
the exact GGN, the empirical and the Monte-Carlo Fisher, online fitting and the
state. ``tests/test_distributed.py`` fits one across processes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from ekfac_laplace import EKFACLaplace
from ekfac_laplace.kinds.convolution import unfold_patches
from ekfac_laplace.layout import ParameterLayout
from tests.cases import fit_factors, loader
from tests.utils import (
    assert_close,
    backprop_vectors,
    blocks,
    conv_patches,
    corrected_eigenvalues,
    dense_empirical_fisher,
    dense_ggn,
    jacobians,
    kfac_factors,
    mc_fisher_moments,
    supported_modules,
    transposed_conv_patches,
)

MC_SAMPLES = 128
MAX_Z = 5.0


@dataclass
class Case:
    """A convolution between a tanh and a linear head, and its input shape."""

    name: str
    layer: Callable[[], nn.Module]
    shape: tuple[int, ...]

    def make(self, n: int = 10, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(seed)
        layer = self.layer()
        X = torch.randn(n, *self.shape)
        with torch.no_grad():
            width = layer(X[:1]).numel()
        model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3))
        model = model.double().eval()
        return model, X.double(), torch.randint(0, 3, (n,))


CASES = [
    Case("conv1d", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 9)),
    Case(
        "conv1d_same_even_kernel_reflect",
        lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect"),
        (2, 7),
    ),
    Case(
        "conv1d_dilated_circular_nobias",
        lambda: nn.Conv1d(
            2, 2, 3, dilation=2, padding=2, padding_mode="circular", bias=False
        ),
        (2, 8),
    ),
    Case(
        "conv2d_replicate_strided",
        lambda: nn.Conv2d(
            2, 3, (3, 2), stride=(2, 1), padding=(1, 2), padding_mode="replicate"
        ),
        (2, 5, 4),
    ),
    Case("conv2d_valid", lambda: nn.Conv2d(1, 2, 2, padding="valid"), (1, 4, 4)),
    Case(
        "conv3d",
        lambda: nn.Conv3d(
            2, 2, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2)
        ),
        (2, 3, 5, 4),
    ),
    Case(
        "conv3d_reflect_same",
        lambda: nn.Conv3d(1, 2, 3, padding="same", padding_mode="reflect"),
        (1, 3, 3, 3),
    ),
    Case(
        "conv_transpose1d",
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1),
        (2, 4),
    ),
    Case(
        "conv_transpose1d_dilated_nobias",
        lambda: nn.ConvTranspose1d(3, 2, 2, dilation=3, bias=False),
        (3, 4),
    ),
    Case(
        "conv_transpose2d",
        lambda: nn.ConvTranspose2d(
            2, 2, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)
        ),
        (2, 3, 2),
    ),
    Case(
        "conv_transpose3d",
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=(0, 1, 0)),
        (2, 2, 2, 2),
    ),
    Case("conv2d_groups", lambda: nn.Conv2d(4, 6, 2, groups=2, padding=1), (4, 3, 3)),
    Case(
        "conv1d_depthwise_reflect",
        lambda: nn.Conv1d(3, 3, 3, groups=3, padding=1, padding_mode="reflect"),
        (3, 6),
    ),
    Case(
        "conv_transpose2d_groups",
        lambda: nn.ConvTranspose2d(4, 2, 2, groups=2, stride=2),
        (4, 2, 2),
    ),
]
IDS = [case.name for case in CASES]
KINDS = {
    case.name: "transposed_convolution" if "transpose" in case.name else "convolution"
    for case in CASES
}


def _quietly(fit: Callable[[], object]) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no layer may be demoted
        return fit()


def _check_blocks(model, X, y, factors, fisher_type: str, kfac_approx: str) -> None:
    """Corrected eigenvalues in their basis; the basis is the reference KFAC's."""
    params = list(model.parameters())
    if fisher_type == "type2":
        full = dense_ggn(model, params, X, "classification")
    else:
        full = dense_empirical_fisher(model, params, X, y, "classification")
    exact = blocks(full, [p.numel() for p in params])
    vectors = backprop_vectors(model, X, y, "classification", fisher_type)
    owners = supported_modules(model, params)
    for (module, kind), block, basis, values in zip(
        owners, exact, factors.eigenvectors, factors.eigenvalues
    ):
        assert basis, "every block is Kronecker-factored"
        assert_close(values.flatten(), corrected_eigenvalues(block, basis))
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        groups = getattr(module, "groups", 1)
        for group in range(groups):
            A, G = _reference_factors(model, module, X, vectors, kfac_approx, group)
            if kind == "bias" and transposed:  # its own factor: the output gradient
                references = (
                    _transposed_bias_factor(model, module, X, vectors, kfac_approx),
                )
            elif kind == "bias":
                references = (G,)
            else:
                references = (A, G) if transposed else (G, A)
            for q, factor in zip(basis, references):
                q = q[group] if q.ndim == 3 else q
                rotated = q.T @ factor @ q
                off = rotated - torch.diag(torch.diagonal(rotated))
                assert off.abs().max() <= 1e-9 * factor.abs().max()


def _reference_factors(model, module, X, vectors, kfac_approx: str, group: int):
    """``A`` and ``G`` of one group, from torch's convolution (not our unfold)."""
    if getattr(module, "groups", 1) == 1:
        A, G, _, _ = kfac_factors(model, module, X, vectors, kfac_approx)
        return A, G
    store = {}
    handle = module.register_forward_hook(
        lambda m, i, o: store.update(input=i[0].detach(), output=o)
    )
    f = model(X)
    handle.remove()
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    width = module.weight.shape[0] // module.groups  # rows of W per group
    if transposed:  # a: this group's input channels; g: their output patches
        a = store["input"][:, group * width : (group + 1) * width]
        a = a.flatten(2).transpose(1, 2)
    else:  # a: the patches of the group's first output channel
        a = conv_patches(module, store["input"], channel=group * width)
    gradients = []
    for k in range(vectors.shape[1]):
        (grad,) = torch.autograd.grad(
            (f * vectors[:, k]).sum(), store["output"], retain_graph=True
        )
        if transposed:
            g = transposed_conv_patches(module, grad, channel=group * width)
        else:
            g = grad[:, group * width : (group + 1) * width].flatten(2).transpose(1, 2)
        gradients.append(g)
    g = torch.stack(gradients, dim=1)  # (N, K, S, d_out)
    if kfac_approx == "reduce":
        a, g = a.mean(1, keepdim=True), g.sum(2, keepdim=True)
    N, S = a.shape[:2]
    A = torch.einsum("nsi,nsj->ij", a, a) / (N * S)
    G = torch.einsum("nksi,nksj->ij", g, g)
    return A, G


def _transposed_bias_factor(model, module, X, vectors, kfac_approx: str) -> Tensor:
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.setdefault("output", o))
    f = model(X)
    handle.remove()
    total = 0
    for k in range(vectors.shape[1]):
        (grad,) = torch.autograd.grad(
            (f * vectors[:, k]).sum(), store["output"], retain_graph=True
        )
        rows = grad.flatten(2).transpose(1, 2)  # (N, output positions, c_out)
        if kfac_approx == "reduce":
            rows = rows.sum(1, keepdim=True)
        total = total + torch.einsum("nsi,nsj->ij", rows, rows)
    return total


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_layer_s_rows_rebuild_its_gradient_exactly(case: Case):
    """Σ_s g_s a_sᵀ of one example is autograd's weight gradient (any output
    gradient); the bias's rows sum to its gradient."""
    model, X, _ = case.make(n=3)
    layer = ParameterLayout(model, list(model.parameters())).layers[0]
    assert layer.kind.name == KINDS[case.name]
    x = X[:1]
    out = model[0](x)
    direction = torch.randn_like(out)
    grads = torch.autograd.grad((out * direction).sum(), list(model[0].parameters()))
    a, g = layer.inputs(x), layer.output_gradients(direction)
    assert a.shape[:2] == g.shape[:2]
    G = layer.groups  # a grouped layer: each group's rows give its own map
    rebuilt = torch.einsum(
        "nsgi,nsgj->gij", g.reshape(*g.shape[:2], G, -1), a.reshape(*a.shape[:2], G, -1)
    )
    assert_close(rebuilt, layer.as_groups(grads[0]))
    if model[0].bias is not None:
        assert_close(layer.bias_gradients(direction).sum((0, 1)), grads[1])


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_blocks_match_the_dense_curvature(case: Case, fisher_type, kfac_approx):
    model, X, y = case.make()
    factors = _quietly(
        lambda: fit_factors(
            model,
            list(model.parameters()),
            X,
            y,
            "classification",
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
        )
    )
    _check_blocks(model, X, y, factors, fisher_type, kfac_approx)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("conv3d", "conv_transpose2d")], ids=str
)
def test_the_monte_carlo_fisher_is_unbiased(case: Case):
    model, X, y = case.make()
    params = list(model.parameters())
    first = fit_factors(model, params, X, y, "classification")
    basis = first.eigenvectors
    mc = fit_factors(
        model,
        params,
        X,
        y,
        "classification",
        eigenbasis=basis,
        fitted=first.layout,
        fisher_type="mc",
        mc_samples=MC_SAMPLES,
        seed=0,
    )
    means, variances = mc_fisher_moments(model, params, X, "classification", basis)
    for estimate, mean, variance in zip(mc.eigenvalues, means, variances):
        error = (estimate.flatten() - mean).abs()
        standard_error = (variance / MC_SAMPLES).sqrt()
        degenerate = standard_error < 1e-12
        assert (error[degenerate] < 1e-10).all()
        assert (error[~degenerate] / standard_error[~degenerate]).max() < MAX_Z


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_posterior_predictive_samples_and_state(case: Case):
    model, X, y = case.make()
    la = EKFACLaplace(model, "classification", prior_precision=0.3)
    _quietly(lambda: la.fit(loader(X, y)))
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    J, f = jacobians(model, list(la.params), X[:4])
    mean, variance = la._glm_predictive_distribution(X[:4])
    assert_close(mean, f)
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")
    root = la.posterior_precision.eigenbasis_matmul(
        torch.eye(la.n_params, dtype=torch.float64)
    )
    assert_close(root.T @ root, covariance, "float64_loose")
    fresh = EKFACLaplace(case.make()[0], "classification", prior_precision=0.3)
    fresh.load_state_dict(la.state_dict())
    assert torch.equal(fresh(X[:4]), la(X[:4]))
    # Online fitting: the same data again doubles every eigenvalue, same basis.
    first = [values.clone() for values in la.H.eigenvalues]
    _quietly(lambda: la.fit(loader(X, y), override=False))
    for old, new in zip(first, la.H.eigenvalues):
        torch.testing.assert_close(new, 2 * old, rtol=1e-12, atol=1e-14)


def test_grouped_layers_stack_one_basis_per_group():
    model, X, y = CASES[IDS.index("conv2d_groups")].make()
    la = EKFACLaplace(model, "classification")
    _quietly(lambda: la.fit(loader(X, y)))
    weight, bias = la.H.eigenvectors[:2]
    assert [tuple(q.shape) for q in weight] == [(2, 3, 3), (2, 8, 8)]
    assert [tuple(q.shape) for q in bias] == [(2, 3, 3)]
    assert la.H.eigenvalues[0].shape == (2, 3, 8)
    # The transposed one: its bias has one factor over all its outputs.
    model, X, y = CASES[IDS.index("conv_transpose2d_groups")].make()
    la = EKFACLaplace(model, "classification")
    _quietly(lambda: la.fit(loader(X, y)))
    weight, bias = la.H.eigenvectors[:2]
    assert [tuple(q.shape) for q in weight] == [(2, 2, 2), (2, 4, 4)]
    assert [tuple(q.shape) for q in bias] == [(2, 2)]


def test_the_curvlinops_engine_takes_only_conv2d_with_zero_padding():
    for name in ("conv2d_valid", "conv1d", "conv_transpose2d"):
        case = CASES[IDS.index(name)]
        model, X, y = case.make()
        la = EKFACLaplace(model, "classification", engine="curvlinops")
        with pytest.raises(ValueError, match=r"supports only nn.Linear and nn.Conv2d"):
            la.fit(loader(X, y))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3))
    model = model.double()
    X, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ours = EKFACLaplace(model, "classification")
    ours.fit(loader(X, y))
    theirs = EKFACLaplace(model, "classification", engine="curvlinops")
    theirs.fit(loader(X, y))
    assert_close(
        ours.posterior_precision.to_matrix(), theirs.posterior_precision.to_matrix()
    )


def test_unfold_patches_against_torch_s_convolution():
    """The patches times the flattened kernel are the convolution, for every
    padding mode and dimension (the N-d path and F.unfold's)."""
    torch.manual_seed(0)
    for layer, shape in (
        (
            nn.Conv1d(
                2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="circular"
            ),
            (2, 2, 9),
        ),
        (nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 2, 5, 5)),
        (nn.Conv3d(1, 2, 2, stride=2, padding=1), (2, 1, 4, 4, 4)),
    ):
        layer = layer.double()
        x = torch.randn(*shape, dtype=torch.float64)
        kind_layer = ParameterLayout(layer, list(layer.parameters())).layers[0]
        patches = kind_layer.inputs(x)
        expected = layer(x).flatten(2).transpose(1, 2)
        assert_close(patches @ layer.weight.flatten(1).T + layer.bias, expected)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    generic = unfold_patches(x, (2, 3), (2, 1), (1, 2), [(0, 1), (1, 1)])
    fast = unfold_patches(x, (2, 3), (2, 1), (1, 2), [(1, 1), (1, 1)])
    assert generic.shape[-1] == fast.shape[-1] == 18
