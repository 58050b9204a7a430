"""Diagonal blocks for layers KFAC cannot factorise, on real model shapes.

Every model here mixes Kronecker-factored layers (Linear / Conv2d) with modules that
get diagonal blocks (BatchNorm, LayerNorm, Embedding, grouped and reflect-padded
convolutions). Each block is checked against the dense float64 GGN / empirical
Fisher: a diagonal block must equal the exact diagonal, a Kronecker block the exact
diagonal in its eigenbasis, with an eigenbasis that diagonalises the reference KFAC
factors.
"""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsEF
from torch import nn

from ekfac_laplace import EKFACLaplace, compute_ekfac
from ekfac_laplace.batches import LaplaceBatches
from ekfac_laplace.diagonal import (
    ModuleCall,
    per_example_gradients,
    restricted_gradients,
)
from ekfac_laplace.predictive import glm_predictive_variance
from tests.cases import DictDataset, loader
from tests.utils import (
    assert_close,
    backprop_vectors,
    blocks,
    corrected_eigenvalues,
    dense_empirical_fisher,
    dense_ggn,
    kfac_factors,
    loop_ggn,
    loop_jacobians,
    supported_modules,
)


class Residual(nn.Module):
    """A ResNet basic block: ``tanh(x + bn(conv(tanh(bn(conv(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = torch.tanh(self.bn1(self.conv1(x)))
        return torch.tanh(x + self.bn2(self.conv2(inner)))


def resnet() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        Residual(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )
    # Non-trivial running statistics and affine parameters (eval mode uses them).
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model


def layernorm_mlp(n_out: int = 3) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, n_out)
    )
    nn.init.uniform_(model[1].weight, 0.5, 1.5)
    nn.init.uniform_(model[1].bias, -0.5, 0.5)
    return model


class TextClassifier(nn.Module):
    """Embedding, mean over tokens, a hidden and an output layer."""

    def __init__(
        self,
        vocabulary: int = 12,
        width: int = 4,
        classes: int = 3,
        padding_idx: int | None = None,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width, padding_idx=padding_idx)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embedding(tokens).mean(1))))


class PositionEmbedding(TextClassifier):
    """A text classifier with learned positions, looked up for ``(1, T)`` positions
    and broadcast over the batch (as GPT-2's ``wpe`` and BERT's position embeddings),
    normalised by a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)  # (1, T)
        hidden = self.norm(self.embedding(tokens) + self.positions(positions))
        return self.out(torch.tanh(self.hidden(hidden.mean(1))))


def odd_convs() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    )


class LoRA(nn.Module):
    """A frozen base layer plus a trainable low-rank update ``B A x``."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 6).requires_grad_(False)
        self.down = nn.Linear(4, 2, bias=False)
        self.up = nn.Linear(2, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.base(x) + self.up(self.down(x))))


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 12, (n, 5))


MODELS = {
    # name: (builder, inputs(n), likelihood, n_outputs, diagonal parameter names)
    "resnet_batchnorm": (
        resnet,
        lambda n: torch.randn(n, 2, 4, 4),
        "classification",
        3,
        {
            "1.weight",
            "1.bias",
            "3.bn1.weight",
            "3.bn1.bias",
            "3.bn2.weight",
            "3.bn2.bias",
        },
    ),
    "layernorm_mlp": (
        layernorm_mlp,
        lambda n: torch.randn(n, 4),
        "classification",
        3,
        {"1.weight", "1.bias"},
    ),
    "layernorm_mlp_regression": (
        lambda: layernorm_mlp(n_out=2),
        lambda n: torch.randn(n, 4),
        "regression",
        2,
        {"1.weight", "1.bias"},
    ),
    "embedding_text": (
        TextClassifier,
        _tokens,
        "classification",
        3,
        {"embedding.weight"},
    ),
    "embedding_text_padding": (
        lambda: TextClassifier(padding_idx=0),
        _tokens,
        "classification",
        3,
        {"embedding.weight"},
    ),
    "shared_position_embedding": (
        PositionEmbedding,
        _tokens,
        "classification",
        3,
        {"embedding.weight", "positions.weight", "norm.weight", "norm.bias"},
    ),
    "grouped_and_reflect_conv": (  # Kronecker blocks (per group for the first)
        odd_convs,
        lambda n: torch.randn(n, 2, 4, 4),
        "classification",
        3,
        set(),
    ),
    "lora_frozen_base": (
        LoRA,
        lambda n: torch.randn(n, 4),
        "classification",
        3,
        set(),
    ),
}


def _make(name: str, n: int = 11, seed: int = 0):
    build, inputs, likelihood, n_outputs, diagonal = MODELS[name]
    torch.manual_seed(seed)
    model = build().to(torch.float64).eval()
    X = inputs(n)
    X = X.to(torch.float64) if X.is_floating_point() else X
    if likelihood == "classification":
        y = torch.randint(0, n_outputs, (n,))
    else:
        y = torch.randn(n, n_outputs, dtype=torch.float64)
    return model, X, y, likelihood, diagonal


def _check_blocks(model, X, y, likelihood, la, fisher_type: str, diagonal: set[str]):
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    if fisher_type == "type2":
        full = dense_ggn(model, params, X, likelihood)
    else:
        full = dense_empirical_fisher(model, params, X, y, likelihood)
    exact = blocks(full, [p.numel() for p in params])
    vectors = backprop_vectors(model, X, y, likelihood, fisher_type)
    owners = supported_modules(model, params)
    seen_diagonal = set()
    for index, (param, block) in enumerate(zip(params, exact)):
        basis = la.H.eigenvectors[index]
        values = la.H.eigenvalues[index]
        if not basis:
            seen_diagonal.add(names[id(param)])
            assert values.shape == param.shape
            assert_close(values.flatten(), torch.diagonal(block))
            continue
        assert_close(values.flatten(), corrected_eigenvalues(block, basis))
        if basis[0].ndim == 3:  # per group: see tests/kinds/test_convolutions.py
            continue
        module, _ = owners[index]
        A, G, _, _ = kfac_factors(model, module, X, vectors)
        for q, factor in zip(basis, (G, A)):
            rotated = q.T @ factor @ q
            off = rotated - torch.diag(torch.diagonal(rotated))
            assert off.abs().max() <= 1e-9 * factor.abs().max()
    assert seen_diagonal == diagonal


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_match_the_dense_ggn(name: str):
    model, X, y, likelihood, diagonal = _make(name)
    la = EKFACLaplace(model, likelihood)
    la.fit(loader(X, y, batch_size=4))
    _check_blocks(model, X, y, likelihood, la, "type2", diagonal)


@pytest.mark.parametrize("name", ["resnet_batchnorm", "embedding_text"])
def test_blocks_match_the_dense_empirical_fisher(name: str):
    model, X, y, likelihood, diagonal = _make(name)
    la = EKFACLaplace(model, likelihood, backend=CurvlinopsEF)
    la.fit(loader(X, y, batch_size=4))
    _check_blocks(model, X, y, likelihood, la, "empirical", diagonal)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_glm_predictive_matches_the_dense_jacobian_path(name: str):
    model, X, y, likelihood, _ = _make(name)
    la = EKFACLaplace(model, likelihood, prior_precision=0.7)
    la.fit(loader(X, y, batch_size=4))
    X_test = _make(name, n=6, seed=1)[1]
    for joint in (False, True):
        # The Jacobian-free path itself (no silent fallback to the dense one).
        fast = glm_predictive_variance(
            model,
            la.params,
            la.posterior_precision,
            X_test,
            la.fitted_layout,
            joint=joint,
        )
        dense = la._dense_glm_predictive_distribution(
            X_test, joint=joint, diagonal_output=False
        )
        assert_close(fast[0], dense[0])
        assert_close(fast[1], dense[1], "float64_loose")


def test_online_fit_adds_diagonal_eigenvalues():
    model, X, y, likelihood, _ = _make("layernorm_mlp")
    once = EKFACLaplace(model, likelihood)
    once.fit(loader(X, y))
    twice = EKFACLaplace(model, likelihood)
    twice.fit(loader(X, y))
    twice.fit(loader(X, y), override=False)
    for a, b, basis in zip(
        once.H.eigenvalues, twice.H.eigenvalues, once.H.eigenvectors
    ):
        assert_close(2 * a, b, "float64_loose" if basis else "float64")


def test_raise_option_and_curvlinops_engine_refuse_unsupported_layers():
    model, X, y, likelihood, _ = _make("layernorm_mlp")
    la = EKFACLaplace(model, likelihood, unsupported_layers="raise")
    with pytest.raises(ValueError, match=r"'1\.weight' belongs to a LayerNorm"):
        la.fit(loader(X, y))
    assert la.H is None
    with pytest.raises(ValueError, match="engine='curvlinops' supports only"):
        EKFACLaplace(model, likelihood, engine="curvlinops").fit(loader(X, y))
    with pytest.raises(ValueError, match="Unknown unsupported_layers 'skip'"):
        EKFACLaplace(model, likelihood, unsupported_layers="skip")


def test_batchnorm_in_training_mode_is_refused():
    model, X, y, likelihood, _ = _make("resnet_batchnorm")
    model.train()
    params = [p for p in model.parameters()]
    with pytest.raises(ValueError, match="BatchNorm2d '1' is in training mode"):
        compute_ekfac(model, params, LaplaceBatches(loader(X, y)), likelihood, len(X))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(12, 4)
        self.out = nn.Linear(4, 12, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embedding(tokens).mean(1))


class ReusedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(self.norm(x)))


class BatchSum(nn.Module):
    """Sums over the batch: its output has no batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).sum(0)


class WithBatchSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = BatchSum()
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x + self.inner(x)))


@pytest.mark.parametrize(
    ("build", "inputs", "match"),
    [
        (
            ReusedNorm,
            lambda n: torch.randn(n, 4),
            "'norm' runs 2 times per forward pass and each of these calls reaches",
        ),
        (
            WithBatchSum,
            lambda n: torch.randn(n, 4),
            r"'inner' \(BatchSum\) returns a tensor of shape \(4,\) that the outputs",
        ),
    ],
)
def test_tied_reused_and_batch_coupling_modules_are_refused(build, inputs, match):
    torch.manual_seed(0)
    model = build().to(torch.float64)
    X = inputs(6)
    X = X.to(torch.float64) if X.is_floating_point() else X
    n_out = model(X).shape[1]
    y = torch.randint(0, n_out, (6,))
    la = EKFACLaplace(model, "classification")
    with pytest.raises(ValueError, match=match):
        la.fit(loader(X, y))
    assert la.H is None
    assert all(not m._forward_hooks for m in model.modules())


def test_a_tied_parameter_gets_its_exact_diagonal_block():
    """An embedding tied to the output layer: per example, the gradient is the sum
    of both uses' (squared after the sum), the GLM predictive likewise."""
    torch.manual_seed(0)
    model = Tied().double()
    X, y = _tokens(6), torch.randint(0, 12, (6,))
    params = list(model.parameters())
    assert len(params) == 1
    la = EKFACLaplace(model, "classification", prior_precision=0.7)
    with pytest.warns(UserWarning, match=r"\['embedding.weight', 'out.weight'\]"):
        la.fit(loader(X, y))
    exact = loop_ggn(model, params, X, "classification")
    assert_close(la.H.eigenvalues[0].flatten(), torch.diagonal(exact))
    X_test = _tokens(3)
    J, _ = loop_jacobians(model, params, X_test)
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    _, variance = la._glm_predictive_distribution(X_test)
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")
    loaded = EKFACLaplace(model, "classification")
    loaded.load_state_dict(la.state_dict())
    assert_close(loaded._glm_predictive_distribution(X_test)[1], variance)
    with pytest.raises(ValueError, match=r"shared by several modules .*weight tying"):
        EKFACLaplace(model, "classification", unsupported_layers="raise").fit(
            loader(X, y)
        )


def test_float32_diagonal_blocks_agree_with_float64():
    model, X, y, likelihood, _ = _make("resnet_batchnorm")
    la64 = EKFACLaplace(model, likelihood)
    la64.fit(loader(X, y))
    model32 = model.to(torch.float32)
    la32 = EKFACLaplace(model32, likelihood)
    la32.fit(loader(X.float(), y))
    for a, b, basis in zip(la32.H.eigenvalues, la64.H.eigenvalues, la64.H.eigenvectors):
        if basis:  # the eigenbasis may rotate within near-degenerate eigenspaces
            a, b = a.sum(), b.sum()  # the trace does not depend on the basis
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_rows_equal_the_generic_per_example_gradients(padding_idx):
    torch.manual_seed(0)
    embedding = nn.Embedding(7, 3, padding_idx=padding_idx).double()
    tokens = torch.tensor([[1, 2, 2, 5], [2, 2, 2, 2], [0, 6, 1, 1]])
    grad_output = torch.randn(3, 4, 3, dtype=torch.float64)
    call = ModuleCall.of("embedding", embedding, (tokens,), {}, embedding(tokens))
    [(rows, restricted)] = restricted_gradients(
        embedding, ["weight"], call, (grad_output,)
    )
    [generic] = per_example_gradients(embedding, ["weight"], call, (grad_output,))
    assert rows.tolist() == [0, 1, 2, 5, 6]
    assert_close(restricted, generic[:, rows])
    unused = [r for r in range(7) if r not in rows.tolist()]
    assert generic[:, unused].abs().max() == 0


def test_renormalising_embedding_is_refused():
    torch.manual_seed(0)
    model = TextClassifier().double()
    model.embedding.max_norm = 1.0
    X, y = _tokens(6), torch.randint(0, 3, (6,))
    la = EKFACLaplace(model, "classification")
    with pytest.raises(ValueError, match="Embedding 'embedding' has max_norm=1.0"):
        la.fit(loader(X, y))
    assert la.H is None


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.BatchNorm1d(3), (5, 3)),
        (nn.BatchNorm1d(3), (5, 3, 4)),
        (nn.BatchNorm2d(3), (5, 3, 4, 2)),
        (nn.LayerNorm(4), (5, 4)),
        (nn.LayerNorm((3, 4)), (5, 2, 3, 4)),
        (nn.LayerNorm(4, bias=False), (5, 6, 4)),
    ],
)
def test_norm_layers_in_closed_form_equal_the_generic_gradients(module, shape):
    torch.manual_seed(0)
    module = module.double().eval()
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    for param in module.parameters():
        nn.init.uniform_(param, -1, 1)
    x = torch.randn(*shape, dtype=torch.float64)
    grad_output = torch.randn(*shape, dtype=torch.float64)
    names = [name for name, _ in module.named_parameters()]
    call = ModuleCall.of("norm", module, (x,), {}, module(x))
    closed = restricted_gradients(module, names, call, (grad_output,))
    generic = per_example_gradients(module, names, call, (grad_output,))
    for (rows, a), b in zip(closed, generic):
        assert rows is None
        assert_close(a, b)


def test_batchnorm_without_running_statistics_is_refused():
    model = nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 2)
    ).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        EKFACLaplace(model, "classification").fit(loader(X, y))


class _HuggingFaceStyle(nn.Module):
    """Takes the whole dict batch, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TextClassifier()

    def forward(self, batch):
        tokens = batch["input_ids"] if isinstance(batch, dict) else batch
        return self.body(tokens)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_dict_batches_with_an_embedding_model(subset: str):
    torch.manual_seed(0)
    model = _HuggingFaceStyle().double()
    X, y = _tokens(10), torch.randint(0, 3, (10,))
    dicts = torch.utils.data.DataLoader(DictDataset(X, y), batch_size=4)
    fitted = []
    for data in (dicts, loader(X, y, batch_size=4)):
        la = Laplace(model, "classification", subset, hessian_structure="ekfac")
        la.fit(data)
        fitted.append(la)
    assert_close(
        fitted[0].posterior_precision.to_matrix(),
        fitted[1].posterior_precision.to_matrix(),
    )
    if subset == "all":
        assert fitted[0].H.eigenvectors[0] == ()  # the embedding's diagonal block
    batch = next(iter(dicts))
    assert_close(fitted[0](batch), fitted[1](X[:4]))


def test_nan_outputs_name_a_layer():
    model, X, y, likelihood, _ = _make("layernorm_mlp")
    with torch.no_grad():
        model[3].bias[0] = float("nan")
    la = EKFACLaplace(model, likelihood)
    with pytest.raises(ValueError, match=r"(layer '\d+'|'\d+\.\w+') is not finite"):
        la.fit(loader(X, y))
    assert la.H is None
