"""Layers that do not compute what the engine assumes: exact blocks or a refusal.

Every case is fitted and compared with the dense float64 reference: each block's
eigenvalues in its own basis (the exact GGN diagonal for a diagonal block), the
posterior precision, the GLM variance ``J Σ Jᵀ`` and the samples' covariance.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from laplace import Laplace
from torch import Tensor, nn
from torch.nn import functional as F

from ekfac_laplace import EKFACLaplace
from ekfac_laplace.layer_check import LayerCheckError, failing_layers
from ekfac_laplace.layout import ParameterLayout
from tests.cases import loader
from tests.utils import (
    assert_close,
    blocks,
    corrected_eigenvalues,
    dense_ggn,
    jacobians,
    param_names,
)


class MaskedLinear(nn.Linear):
    """MADE's masked layer: ``F.linear(x, mask * W, b)``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.register_buffer("mask", (torch.rand(d_out, d_in) > 0.4).float())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.mask * self.weight, self.bias)


class CosineLinear(nn.Linear):
    """A cosine classifier: normalised inputs and weights, a fixed scale."""

    def forward(self, x: Tensor) -> Tensor:
        return 4 * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


class StandardisedConv2d(nn.Conv2d):
    """Weight standardisation (Qiao et al., 2019)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean((1, 2, 3), keepdim=True)
        std = w.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, (w - mean) / (std + 1e-5), self.bias, self.stride)


class Affine(nn.Module):
    """A parametrisation: ``1.5 W + 0.1 W²``."""

    def forward(self, w: Tensor) -> Tensor:
        return 1.5 * w + 0.1 * w.square()


class FunctionalReuse(nn.Module):
    """A layer's weight applied again outside it: ``F.linear(h, layer.weight)``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(x))
        h = torch.tanh(self.out(h) + F.linear(h, self.out.weight))
        return self.head(h)


class TiedHead(nn.Module):
    """An embedding whose table is also the output layer, through ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(tokens).mean(1)))
        return F.linear(h, self.embed.weight)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _cnn(first: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(
        first or nn.Conv2d(2, 3, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    )


def _pruned() -> nn.Module:
    model = _mlp()
    prune.random_unstructured(model[0], "weight", amount=0.5)
    return model


def _hooked_output() -> nn.Module:
    model = _mlp()
    model[0].register_forward_hook(lambda module, args, output: 2 * output + 0.5)
    model[2].register_forward_hook(lambda module, args, output: output.tanh())
    return model


def _hooked_input() -> nn.Module:
    model = _mlp()
    model[2].register_forward_pre_hook(lambda module, args: (args[0] ** 2,))
    return model


def _hooked_conv() -> nn.Module:
    model = _cnn()
    model[0].register_forward_hook(lambda module, args, output: output * 3)
    return model


def _masked() -> nn.Module:
    model = _mlp()
    model[0] = MaskedLinear(4, 5)
    return model


def _cosine() -> nn.Module:
    model = _mlp()
    model[2] = CosineLinear(5, 3)
    return model


def _parametrised() -> nn.Module:
    model = _mlp()
    parametrize.register_parametrization(model[0], "weight", Affine())
    return model


def _with(wrap: Callable[[nn.Module], object]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = _mlp()
        with warnings.catch_warnings():  # the old APIs' deprecation notices
            warnings.simplefilter("ignore", FutureWarning)
            wrap(model[0])
        return model

    return build


@dataclass
class Case:
    """A model, which of its layers get diagonal blocks, and its input."""

    name: str
    build: Callable[[], nn.Module]
    diagonal: set[str] = field(default_factory=set)
    shape: tuple[int, ...] = (4,)
    warns: bool = True

    def make(self, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(seed)
        model = self.build().double().eval()
        X = torch.randn(12, *self.shape, dtype=torch.float64)
        y = torch.randint(0, 3, (12,))
        return model, X, y


CASES = [
    Case("pruned", _pruned, {"0"}),
    Case("forward_hooks", _hooked_output, warns=False),
    Case("pre_hook_on_input", _hooked_input, warns=False),
    Case("forward_hook_on_conv", _hooked_conv, shape=(2, 5, 5), warns=False),
    Case("masked_linear", _masked, {"0"}),
    Case("cosine_classifier", _cosine, {"2"}),
    Case(
        "weight_standardised_conv",
        lambda: _cnn(StandardisedConv2d(2, 3, 3)),
        {"0"},
        shape=(2, 5, 5),
    ),
    Case("parametrization", _parametrised, {"0"}),
    Case(
        "spectral_norm",
        _with(torch.nn.utils.parametrizations.spectral_norm),
        {"0"},
    ),
    Case("weight_norm", _with(torch.nn.utils.parametrizations.weight_norm), {"0"}),
    Case("spectral_norm_old_api", _with(torch.nn.utils.spectral_norm), {"0"}),
    Case("weight_norm_old_api", _with(torch.nn.utils.weight_norm), {"0"}),
]
IDS = [case.name for case in CASES]


def _fit(case: Case, **kwargs) -> tuple[EKFACLaplace, Tensor, Tensor]:
    model, X, y = case.make()
    la = EKFACLaplace(model, "classification", prior_precision=0.7, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.fit(loader(X, y))
    demoted = [w for w in caught if "exact diagonal block instead" in str(w.message)]
    assert bool(demoted) == case.warns, [str(w.message) for w in caught]
    return la, X, y


def _reference_precision(la: EKFACLaplace, X: Tensor) -> Tensor:
    """Kronecker blocks in the fitted basis with corrected eigenvalues, exact
    diagonals elsewhere, from the dense GGN; plus the prior."""
    params = list(la.params)
    exact = blocks(
        dense_ggn(la.model, params, X, "classification"), [p.numel() for p in params]
    )
    dense = []
    for block, basis in zip(exact, la.H.eigenvectors):
        if not basis:
            dense.append(torch.diag(torch.diagonal(block)))
            continue
        Q = torch.kron(*basis) if len(basis) == 2 else basis[0]
        dense.append((Q * corrected_eigenvalues(block, basis)) @ Q.T)
    prior = la.prior_precision_diag
    return torch.block_diag(*dense) + torch.diag(prior)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_layer_gets_an_exact_block(case: Case):
    la, X, _ = _fit(case)
    names = param_names(la.model, list(la.params))
    diagonal = {
        name.rsplit(".", 1)[0].split(".parametrizations")[0]
        for name, basis in zip(names, la.H.eigenvectors)
        if not basis
    }
    assert diagonal == case.diagonal
    # Blocks: corrected eigenvalues in the fitted basis, the exact diagonal.
    params = list(la.params)
    exact = blocks(
        dense_ggn(la.model, params, X, "classification"), [p.numel() for p in params]
    )
    for block, basis, values in zip(exact, la.H.eigenvectors, la.H.eigenvalues):
        if basis:
            assert_close(values.flatten(), corrected_eigenvalues(block, basis))
        else:
            assert_close(values.flatten(), torch.diagonal(block))
    # The posterior, its GLM predictive and its samples' covariance.
    precision = _reference_precision(la, X)
    assert_close(la.posterior_precision.to_matrix(), precision)
    covariance = torch.linalg.inv(precision)
    J, f = jacobians(la.model, params, X[:5])
    mean, variance = la._glm_predictive_distribution(X[:5])
    assert_close(mean, f)
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")
    root = la.posterior_precision.eigenbasis_matmul(
        torch.eye(la.n_params, dtype=torch.float64)
    )  # samples are θ* + z rootᵀ... covariance rootᵀ root
    assert_close(root.T @ root, covariance, "float64_loose")
    assert_close(la.log_det_posterior_precision, torch.logdet(precision))
    # Nothing is left on the model: no hooks of ours, no batched tensors.
    la.model(X)
    for module in la.model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor):
                assert not torch._C._functorch.is_batchedtensor(value)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.diagonal], ids=lambda case: case.name
)
def test_raise_refuses_each_layer_that_would_get_a_diagonal_block(case: Case):
    model, X, y = case.make()
    la = EKFACLaplace(model, "classification", unsupported_layers="raise")
    match = r"does not compute y = W x \+ b|has the parameters \["
    with pytest.raises(ValueError, match=match):
        la.fit(loader(X, y))
    assert la.H is None


@pytest.mark.parametrize(
    ("build", "shape", "match"),
    [
        (FunctionalReuse, (4,), r"'out\.weight'.*outside that module's call"),
        (TiedHead, (3,), r"'embed\.weight'.*outside that module's call"),
    ],
    ids=["functional_reuse", "tied_head"],
)
def test_a_parameter_used_outside_its_module_is_refused(build, shape, match):
    torch.manual_seed(0)
    model = build().double().eval()
    X = torch.randn(12, *shape, dtype=torch.float64)
    if isinstance(model, TiedHead):
        X = torch.randint(0, 6, (12, *shape))
        y = torch.randint(0, 6, (12,))
    else:
        y = torch.randint(0, 3, (12,))
    la = EKFACLaplace(model, "classification")
    with pytest.raises(LayerCheckError, match=match):
        la.fit(loader(X, y))
    assert la.H is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # Its own gradient is exact when the reused weight is frozen.
    frozen = model.out.weight if isinstance(model, FunctionalReuse) else None
    if frozen is not None:
        frozen.requires_grad_(False)
        EKFACLaplace(model, "classification").fit(loader(X, y))


def test_the_curvlinops_engine_refuses_what_it_would_get_wrong():
    for case, match in (
        (CASES[IDS.index("masked_linear")], r"diagonal block: a MaskedLinear that"),
        (CASES[IDS.index("forward_hooks")], r"forward hook changes the output"),
    ):
        model, X, y = case.make()
        la = EKFACLaplace(model, "classification", engine="curvlinops")
        with pytest.raises(ValueError, match=match), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.fit(loader(X, y))
        assert la.H is None
    # A hook that only reads (laplace-torch's feature extractor) is fine.
    model, X, y = CASES[0].make()
    model = _mlp().double().eval()
    model[2].register_forward_hook(lambda module, args, output: None)
    EKFACLaplace(model, "classification", engine="curvlinops").fit(loader(X, y))


def test_last_layer_laplace_with_a_cosine_head():
    case = CASES[IDS.index("cosine_classifier")]
    model, X, y = case.make()
    la = Laplace(model, "classification", "last_layer", "ekfac", prior_precision=0.5)
    with pytest.warns(UserWarning, match="exact diagonal block instead"):
        la.fit(loader(X, y))
    assert all(basis == () for basis in la.H.eigenvectors)
    network = la.model.model  # laplace-torch's copy of the model
    params = list(la.model.last_layer.parameters())
    exact = blocks(
        dense_ggn(network, params, X, "classification"), [p.numel() for p in params]
    )
    for block, values in zip(exact, la.H.eigenvalues):
        assert_close(values.flatten(), torch.diagonal(block))
    J, _ = jacobians(network, params, X[:4])
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    _, variance = la._glm_predictive_distribution(X[:4])
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")


def test_online_fitting_refuses_a_layer_that_changed_since_the_first_fit():
    model, X, y = Case("plain", _mlp, warns=False).make()
    la = EKFACLaplace(model, "classification")
    la.fit(loader(X, y))
    before = [values.clone() for values in la.H.eigenvalues]
    model[0].forward = lambda x: F.linear(x, model[0].weight.tanh(), model[0].bias)
    with pytest.raises(LayerCheckError, match="changed since that fit"):
        la.fit(loader(X, y), override=False)
    for old, new in zip(before, la.H.eigenvalues):
        assert torch.equal(old, new)


def test_state_of_a_demoted_layer_round_trips():
    case = CASES[IDS.index("masked_linear")]
    la, X, _ = _fit(case)
    fresh = EKFACLaplace(case.make()[0], "classification")
    fresh.load_state_dict(la.state_dict())
    assert [len(b) for b in fresh.H.eigenvectors] == [0, 0, 2, 1]
    assert_close(fresh(X[:4]), la(X[:4]))


def test_the_check_passes_plain_models_and_sees_each_kind():
    """Linear, Conv2d, attention and output layers pass; a bias or a weight that
    is off by a hook on autograd's gradient is seen."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    X = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    layout = ParameterLayout(model, list(model.parameters()))
    assert failing_layers(model, layout, X) == {}
    handle = model[2].bias.register_hook(lambda grad: 2 * grad)
    try:
        failing = failing_layers(model, layout, X)
    finally:
        handle.remove()
    assert list(failing) == ["2"] and "differs by" in failing["2"]


class _LastRowMixed(nn.Module):
    """Row 0's hidden state added into the last row: examples 0 and 1 look fine."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(x)).clone()
        h[-1] = h[-1] + h[0]
        return self.out(h)


class _LateBatchMean(nn.Module):
    """A batch-mean context that rows 0 and 1 do not get."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(x))
        context = h[2:].mean(0, keepdim=True)
        return self.out(torch.cat([h[:2], h[2:] + context]))


class _MeanNorm(nn.Module):
    """A diagonal module whose parameter sees a batch statistic."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (x - x[3:].mean(0))


@pytest.mark.parametrize(
    ("build", "name"),
    [(_LastRowMixed, "'hidden'"), (_LateBatchMean, "'hidden'")],
    ids=["last_row_mixed", "late_batch_mean"],
)
def test_examples_influencing_each_other_anywhere_in_the_batch_are_refused(build, name):
    torch.manual_seed(0)
    model = build().double().eval()
    X = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    la = EKFACLaplace(model, "classification")
    with pytest.raises(
        LayerCheckError,
        match=rf"The examples of a batch influence each other's outputs: the "
        rf"gradient of {name} for a loss weighted per example differs by",
    ):
        la.fit(loader(X, y, batch_size=8))
    assert la.H is None


def test_a_diagonal_module_coupling_examples_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _MeanNorm(), nn.Tanh(), nn.Linear(4, 3))
    model = model.double().eval()
    X = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(LayerCheckError, match=r"gradient of '(0|1\.scale)' for a"):
        EKFACLaplace(model, "classification").fit(
            loader(X, torch.randint(0, 3, (8,)), batch_size=8)
        )


class _MonteCarloDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.dropout(torch.tanh(self.hidden(x)), 0.5, training=True))


def test_a_random_forward_pass_is_refused():
    torch.manual_seed(0)
    model = _MonteCarloDropout().double()
    X = torch.randn(8, 4, dtype=torch.float64)
    la = EKFACLaplace(model, "classification")
    with pytest.raises(
        LayerCheckError,
        match=r"The model's outputs on the same inputs differ between two forward "
        r"passes \(by .*% on the first batch\): its forward pass is random",
    ):
        la.fit(loader(X, torch.randint(0, 3, (8,))))
    assert la.H is None


class _Router(nn.Module):
    """Returns its logits beside the softmax of them (as Mixtral's router does)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = x @ self.weight.T
        return logits, torch.softmax(logits, -1)


class _Routed(nn.Module):
    def __init__(self, use_logits: bool) -> None:
        super().__init__()
        self.router, self.out = _Router(), nn.Linear(4, 3)
        self.use_logits = use_logits

    def forward(self, x: Tensor) -> Tensor:
        logits, probabilities = self.router(x)
        mixed = probabilities * x + (logits if self.use_logits else 0)
        return self.out(mixed)


@pytest.mark.parametrize("use_logits", [False, True])
def test_an_output_a_module_uses_itself_is_not_blamed(use_logits: bool):
    """The gradient arriving at the logits is the caller's alone (zero when only
    the probabilities are used), not the module's own use of them."""
    torch.manual_seed(0)
    model = _Routed(use_logits).double().eval()
    X = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    la = EKFACLaplace(model, "classification")
    la.fit(loader(X, y))
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    exact = blocks(dense_ggn(model, params, X, "classification"), sizes)
    assert_close(la.H.eigenvalues[0].flatten(), torch.diagonal(exact[0]))
