"""Transformers, recurrent networks and GPT-2-style layers against dense references.

Every model here fits with the default settings. Each block is checked against the
dense float64 GGN (per-example Jacobians one example at a time, since ``vmap``
cannot batch the fused recurrent kernels): a diagonal block must equal the exact
diagonal, a Kronecker block the exact diagonal in its eigenbasis. The attention
projections and GPT-2's ``Conv1D`` are also checked against the same network written
with ``nn.Linear`` layers, where the fast engine is already checked against the
dense KFAC factors: equal posterior precisions mean equal factors and corrections.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models import VisionTransformer

from ekfac_laplace import EKFACLaplace, EKFACLLLaplace
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.predictive import glm_predictive_variance
from tests.cases import loader
from tests.utils import (
    assert_close,
    blocks,
    corrected_eigenvalues,
    loop_ggn,
    loop_jacobians,
)

VOCABULARY, WIDTH, CLASSES = 11, 8, 3


class Tokens(Dataset):
    """Hugging Face-style examples with an attention mask (1: token, 0: padding)."""

    def __init__(self, tokens: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.tokens, self.mask, self.labels = tokens, mask, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.tokens[index],
            "attention_mask": self.mask[index],
            "labels": self.labels[index],
        }


def token_batch(n: int, length: int = 6, seed: int = 0) -> dict[str, Tensor]:
    """Tokens with right padding: example ``i`` has ``length - i % 3`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCABULARY, (n, length), generator=generator)
    lengths = length - torch.arange(n) % 3
    mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
    return {"input_ids": tokens * mask, "attention_mask": mask}


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


class Encoder(nn.Module):
    """Token embedding, two ``nn.TransformerEncoderLayer``, masked mean, head."""

    def __init__(self, batch_first: bool = True, norm_first: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(VOCABULARY, WIDTH, padding_idx=0)
        layer = nn.TransformerEncoderLayer(
            WIDTH,
            2,
            16,
            dropout=0.0,
            batch_first=batch_first,
            norm_first=norm_first,
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        hidden = self.embedding(batch["input_ids"])
        if not self.batch_first:
            hidden = hidden.transpose(0, 1)
        hidden = self.encoder(hidden, src_key_padding_mask=mask == 0)
        if not self.batch_first:
            hidden = hidden.transpose(0, 1)
        return self.head(_masked_mean(hidden, mask))


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch first) with ``nn.Linear``."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        width = attention.embed_dim
        self.heads = attention.num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        with torch.no_grad():
            self.qkv.weight.copy_(attention.in_proj_weight)
            self.qkv.bias.copy_(attention.in_proj_bias)
            self.out.weight.copy_(attention.out_proj.weight)
            self.out.bias.copy_(attention.out_proj.bias)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        B, T, E = x.shape
        q, k, v = (
            part.reshape(B, T, self.heads, -1).transpose(1, 2)
            for part in self.qkv(x).chunk(3, dim=-1)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, E)
        return self.out(mixed)


class AttentionBlock(nn.Module):
    """Embedding, one self-attention (torch's or the explicit twin), LayerNorm, head."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCABULARY, WIDTH, padding_idx=0)
        self.attention: nn.Module = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.explicit = explicit
        if explicit:
            self.attention = ExplicitAttention(self.attention)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        x = self.embedding(batch["input_ids"])
        if self.explicit:
            mixed = self.attention(x, mask == 0)
        else:
            mixed, _ = self.attention(x, x, x, key_padding_mask=mask == 0)
        return self.head(_masked_mean(self.norm(x + torch.tanh(mixed)), mask))


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another (``k is v``)."""

    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(VOCABULARY, WIDTH, padding_idx=0)
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = self.embedding(batch["input_ids"])
        query, memory = x[:, :2], x[:, 2:]
        if not self.batch_first:
            query, memory = query.transpose(0, 1), memory.transpose(0, 1)
        mixed, weights = self.attention(query, memory, memory)
        if not self.batch_first:
            mixed = mixed.transpose(0, 1)
        return self.head(torch.tanh(mixed).mean(1) + weights.sum((1, 2)).unsqueeze(1))


class Recurrent(nn.Module):
    """Embedding, a two-layer LSTM or GRU, its outputs and last hidden state, head."""

    def __init__(self, cell: str = "lstm", batch_first: bool = True) -> None:
        super().__init__()
        self.cell, self.batch_first = cell, batch_first
        self.embedding = nn.Embedding(VOCABULARY, 4)
        kind = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = kind(4, 5, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = self.embedding(batch["input_ids"])
        if not self.batch_first:
            x = x.transpose(0, 1)
        outputs, hidden = self.rnn(x)
        last = (hidden[0] if self.cell == "lstm" else hidden)[-1]  # (B, H)
        mean = outputs.mean(1 if self.batch_first else 0)
        return self.head(torch.tanh(mean) + last)


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D`` (``transformers.pytorch_utils``): ``x @ W + b``, ``W`` stored
    ``(d_in, d_out)``; recognised by name and shape, as the library's own."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.shape[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight)
        return x.view(size_out)


class GPT2Style(nn.Module):
    """Embedding, a Conv1D MLP on the tokens, masked mean, a Conv1D head."""

    def __init__(self, linear: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCABULARY, 4, padding_idx=0)
        self.fc = Conv1D(6, 4)
        self.proj = Conv1D(CLASSES, 6)
        if linear:  # the same network with nn.Linear (weights transposed)
            self.fc, self.proj = _as_linear(self.fc), _as_linear(self.proj)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        hidden = torch.tanh(self.fc(self.embedding(batch["input_ids"])))
        return self.proj(_masked_mean(hidden, mask))


def _as_linear(conv: Conv1D) -> nn.Linear:
    linear = nn.Linear(*conv.weight.shape)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return linear


def vit(image_size: int = 8, patch_size: int = 4) -> nn.Module:
    """torchvision's ViT: patch embedding, class token, positions, one encoder block."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=1,
        num_heads=2,
        hidden_dim=WIDTH,
        mlp_dim=16,
        num_classes=CLASSES,
    )


def _images(n: int) -> Tensor:
    return torch.randn(n, 3, 8, 8, dtype=torch.float64)


ENCODER_NORMS = {
    f"encoder.layers.{i}.norm{j}.{p}"
    for i in (0, 1)
    for j in (1, 2)
    for p in ("weight", "bias")
}
RNN_WEIGHTS = {
    f"rnn.{w}_{k}_l{i}"
    for w in ("weight", "bias")
    for k in ("ih", "hh")
    for i in (0, 1)
}

MODELS = {
    # name: (builder, kinds of its Kronecker layers, diagonal parameter names)
    "transformer_encoder": (
        Encoder,
        {"attention_in", "attention_out", "linear"},
        {"embedding.weight", *ENCODER_NORMS},
    ),
    "transformer_encoder_seq_first_norm_first": (
        lambda: Encoder(batch_first=False, norm_first=True),
        {"attention_in", "attention_out", "linear"},
        {"embedding.weight", *ENCODER_NORMS},
    ),
    "cross_attention": (
        CrossAttention,
        {"attention_in", "attention_out", "linear"},
        {"embedding.weight"},
    ),
    "lstm": (
        Recurrent,
        {"linear"},
        {"embedding.weight", *RNN_WEIGHTS},
    ),
    "gru_seq_first": (
        lambda: Recurrent("gru", batch_first=False),
        {"linear"},
        {"embedding.weight", *RNN_WEIGHTS},
    ),
    "gpt2_conv1d": (GPT2Style, {"gpt2_conv1d"}, {"embedding.weight"}),
    "vit": (
        vit,
        {
            "convolution",
            "attention_in",
            "attention_out",
            "linear",
        },
        {"class_token", "encoder.pos_embedding"}
        | {
            f"encoder.{m}.{p}"
            for m in (
                "layers.encoder_layer_0.ln_1",
                "layers.encoder_layer_0.ln_2",
                "ln",
            )
            for p in ("weight", "bias")
        },
    ),
}


def _make(name: str, n: int = 7, seed: int = 0):
    build = MODELS[name][0]
    torch.manual_seed(seed)
    model = build().to(torch.float64).eval()
    for param in model.parameters():  # away from the initialisation's symmetries
        with torch.no_grad():
            param.add_(0.1 * torch.randn_like(param))
    X = _images(n) if name == "vit" else token_batch(n, seed=seed)
    y = torch.randint(0, CLASSES, (n,))
    return model, X, y


def _loader(X, y, batch_size: int = 3) -> DataLoader:
    if isinstance(X, Tensor):
        return loader(X, y, batch_size)
    return DataLoader(Tokens(X["input_ids"], X["attention_mask"], y), batch_size)


def _fit(model, X, y, **kwargs) -> EKFACLaplace:
    la = EKFACLaplace(model, "classification", prior_precision=0.5, **kwargs)
    la.fit(_loader(X, y))
    return la


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_match_the_dense_ggn(name: str):
    model, X, y = _make(name)
    la = _fit(model, X, y)
    params = list(model.parameters())
    layout = ParameterLayout(model, params)
    assert {layer.kind.name for layer in layout.layers} == MODELS[name][1]
    exact = blocks(
        loop_ggn(model, params, X, "classification"), [p.numel() for p in params]
    )
    names = {id(p): n for n, p in model.named_parameters()}
    diagonal = set()
    for param, block, basis, values in zip(
        params, exact, la.H.eigenvectors, la.H.eigenvalues
    ):
        if not basis:
            diagonal.add(names[id(param)])
            assert_close(values.flatten(), torch.diagonal(block))
        else:
            for q in basis:
                assert_close(q.T @ q, torch.eye(len(q), dtype=q.dtype))
            assert_close(values.flatten(), corrected_eigenvalues(block, basis))
    assert diagonal == MODELS[name][2]
    # The model is as it was: eval mode, no hooks left.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_glm_predictive_matches_the_dense_jacobians(name: str):
    model, X, y = _make(name)
    la = _fit(model, X, y)
    X_test = _make(name, n=4, seed=1)[1]
    J, f = loop_jacobians(model, la.params, X_test)
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    for joint in (False, True):
        mean, variance = glm_predictive_variance(
            model,
            la.params,
            la.posterior_precision,
            X_test,
            replace(la.fitted_layout, batch_dims=None),  # probed here
            joint=joint,
            batch=4,
        )
        if joint:
            flat = J.reshape(-1, J.shape[-1])
            assert_close(mean, f.flatten())
            assert_close(variance, flat @ covariance @ flat.T, "float64_loose")
        else:
            assert_close(mean, f)
            assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")
    # Through the Laplace object too (no silent fallback changes the numbers), which
    # uses where the fit found each module's batch dimension instead of probing.
    sequence_first_linear = name == "transformer_encoder_seq_first_norm_first"
    assert sequence_first_linear == (1 in la.fitted_layout.batch_dims.values())
    _, variance = la._glm_predictive_distribution(X_test)
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")


def test_attention_projections_equal_the_same_network_with_linear_layers():
    """in_proj (one ``F.linear`` over q, k, v) and out_proj, captured inside
    ``nn.MultiheadAttention``, give the factors of the explicit ``nn.Linear`` twin."""
    X = token_batch(7)
    y = torch.randint(0, CLASSES, (7,))
    torch_model = AttentionBlock().double().eval()
    twin = AttentionBlock(explicit=True).double().eval()
    with torch.no_grad():
        for model in (torch_model, twin):
            assert_close(model(X), torch_model(X))
    for stochastic in (False, True):  # the exact GGN and the MC Fisher
        precisions = []
        for model in (torch_model, twin):
            la = EKFACLaplace(
                model, "classification", backend_kwargs={"stochastic": stochastic}
            )
            la.fit(_loader(X, y))
            precisions.append(la.posterior_precision.to_matrix())
        assert_close(precisions[0], precisions[1])


def test_gpt2_conv1d_equals_linear_with_the_transposed_weight():
    X = token_batch(7)
    y = torch.randint(0, CLASSES, (7,))
    conv, linear = GPT2Style().double().eval(), GPT2Style(linear=True).double().eval()
    la_conv, la_linear = _fit(conv, X, y), _fit(linear, X, y)
    assert la_conv.H.eigenvalues[1].shape == (4, 6)  # like the weight, (d_in, d_out)
    # Permute the Linear posterior's weights into Conv1D's (d_in, d_out) order.
    order, start = [], 0
    for name, param in linear.named_parameters():
        index = torch.arange(start, start + param.numel())
        if name in ("fc.weight", "proj.weight"):
            index = index.reshape(param.shape).T.flatten()
        order.append(index)
        start += param.numel()
    order = torch.cat(order)
    P_linear = la_linear.posterior_precision.to_matrix()[order][:, order]
    assert_close(la_conv.posterior_precision.to_matrix(), P_linear)
    # Sampling and the marginal likelihood go through the same blocks.
    assert_close(la_conv.log_marginal_likelihood(), la_linear.log_marginal_likelihood())


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_padding_contributes_nothing(kfac_approx: str):
    """A padded batch gives the posterior of the same examples without padding.

    20 examples: with ``"reduce"`` the input factors (one averaged input per
    example) then have full rank, so the eigenbasis is unique.
    """
    model, X, y = _make("transformer_encoder", n=20)
    padded = EKFACLaplace(model, "classification", kfac_approx=kfac_approx)
    padded.fit(_loader(X, y, batch_size=7))
    unpadded = EKFACLaplace(model, "classification", kfac_approx=kfac_approx)
    lengths = X["attention_mask"].sum(1)
    examples = [
        {key: value[n, : lengths[n]] for key, value in X.items()} | {"labels": y[n]}
        for n in range(len(y))
    ]
    unpadded.fit(DataLoader(examples, batch_size=1))
    assert padded.n_data == unpadded.n_data == 20
    assert_close(padded.loss, unpadded.loss)
    names = [name for name, _ in model.named_parameters()]
    for name, *pair in zip(names, padded.H.eigenvalues, unpadded.H.eigenvalues):
        assert_close(*(values.sum() for values in pair))  # the block's trace
        if kfac_approx == "reduce" and name.endswith("in_proj_weight"):
            # The keys' gradients sum to zero over the positions (softmax does not
            # see a shift of all keys), so G has a null space whose eigenbasis is
            # arbitrary: only basis-free quantities compare there.
            continue
        assert_close(*pair, "float64_loose")
    if kfac_approx == "expand":
        assert_close(
            padded.posterior_precision.to_matrix(),
            unpadded.posterior_precision.to_matrix(),
            "float64_loose",
        )
        assert_close(
            padded.log_marginal_likelihood(), unpadded.log_marginal_likelihood()
        )


def test_fast_and_curvlinops_engines_agree_where_curvlinops_supports_the_layers():
    """The encoder with its attention and norms frozen: only nn.Linear layers.

    Without padding (curvlinops would count padding positions in ``A``).
    """
    model, X, y = _make("transformer_encoder")
    X["attention_mask"] = torch.ones_like(X["attention_mask"])
    for name, param in model.named_parameters():
        param.requires_grad_("linear" in name or name.startswith("head"))
    fast = _fit(model, X, y)
    curvlinops = _fit(model, X, y, engine="curvlinops")
    assert_close(
        fast.posterior_precision.to_matrix(),
        curvlinops.posterior_precision.to_matrix(),
    )
    for name, param in model.named_parameters():
        param.requires_grad_("norm" not in name and "embedding" not in name)
    with pytest.raises(
        ValueError, match="'encoder.layers.0.self_attn.in_proj' is the in-proj"
    ):
        _fit(model, X, y, engine="curvlinops")


class TokenHead(nn.Module):
    """A head applied at every token, ``(B, T, C)``, reduced to ``(B, C)`` as
    laplace-torch's ``feature_reduction`` reduces the head's input."""

    def __init__(self, reduction: str | None) -> None:
        super().__init__()
        self.reduction = reduction
        self.embedding = nn.Embedding(VOCABULARY, 4)
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.head(torch.tanh(self.body(self.embedding(batch["input_ids"]))))
        if self.reduction == "pick_first":
            return logits[:, 0]
        if self.reduction == "pick_last":
            return logits[:, -1]
        return logits.mean(1)


@pytest.mark.parametrize("reduction", ["pick_first", "pick_last", "average", None])
def test_last_layer_feature_reduction_as_laplace_torch_defines_it(reduction):
    """``f = W φ(x) + b`` with ``φ`` the reduced head input: the curvature of that
    model, and laplace-torch's own dense last-layer predictive. Without a
    reduction, the head at every token (exact for the network)."""
    torch.manual_seed(0)
    model = TokenHead(reduction or "average").double().eval()
    X = token_batch(9)
    X["attention_mask"] = torch.ones_like(X["attention_mask"])
    y = torch.randint(0, CLASSES, (9,))
    la = EKFACLLLaplace(
        model,
        "classification",
        prior_precision=0.5,
        feature_reduction=reduction,
        last_layer_name="head",
    )
    la.fit(_loader(X, y))
    copy = la.model.model
    params = la._posterior_params()
    exact = blocks(loop_ggn(copy, params, X, "classification"), [15, 3])
    for block, basis, values in zip(exact, la.H.eigenvectors, la.H.eigenvalues):
        assert_close(values.flatten(), corrected_eigenvalues(block, basis))
    if reduction is not None:  # the input factor is that of the reduced features
        _, features = la.model.forward_with_features(X)
        q_a = la.H.eigenvectors[0][1]
        rotated = q_a.T @ features.T @ features @ q_a
        assert_close(rotated, torch.diag(torch.diagonal(rotated)))
    X_test = token_batch(4, seed=1)
    J, f = loop_jacobians(copy, params, X_test)
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    mean, variance = la._glm_predictive_distribution(X_test)
    assert_close(mean, f)
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")
    mean, variance = la._glm_predictive_distribution(X_test, joint=True)
    flat = J.reshape(-1, J.shape[-1])
    assert_close(variance, flat @ covariance @ flat.T, "float64_loose")
    if reduction is not None:  # laplace-torch's dense path: the same numbers
        dense = la._dense_glm_predictive_distribution(
            X_test, joint=False, diagonal_output=False
        )
        assert_close(dense[1], J @ covariance @ J.transpose(1, 2), "float64_loose")
    probs = la(X_test, pred_type="nn", link_approx="mc", n_samples=3)
    assert probs.shape == (4, CLASSES)
    assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64))


class TinyLM(nn.Module):
    """A causal transformer language model: logits ``(B, T, V)`` at every token."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH)
        self.block = nn.TransformerEncoderLayer(
            WIDTH, 2, 16, dropout=0.0, batch_first=True
        )
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCABULARY)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        tokens = batch["input_ids"]
        causal = nn.Transformer.generate_square_subsequent_mask(
            tokens.shape[1], dtype=torch.float64
        )
        hidden = self.block(self.embedding(tokens), src_mask=causal, is_causal=True)
        return self.head(self.norm(hidden))


def _lm_data(n: int, seed: int = 0):
    X = token_batch(n, seed=seed)
    labels = X["input_ids"].roll(-1, dims=1)  # next token
    labels[:, -1] = -100
    labels[X["attention_mask"] == 0] = -100  # padding
    labels[:, 0] = -100  # a prompt token that does not count
    return X, labels


def _token_curvature(model, params, X, labels, fisher_type: str):
    """Σ over counted tokens of J_tᵀ H_t J_t (GGN) or g_t g_tᵀ (empirical)."""
    names = {id(p): name for name, p in model.named_parameters()}
    detached = {names[id(p)]: p.detach() for p in params}
    total = 0
    for n in range(len(labels)):
        x = {key: value[n : n + 1] for key, value in X.items()}

        def f(p, x=x):
            return torch.func.functional_call(model, p, (x,)).squeeze(0)

        J = torch.func.jacrev(f)(detached)
        J = torch.cat([J[names[id(p)]].flatten(start_dim=2) for p in params], 2)
        with torch.no_grad():
            probs = f(detached).softmax(-1)
        for t in (labels[n] != -100).nonzero().flatten().tolist():
            p_t, J_t = probs[t], J[t]
            if fisher_type == "type2":
                H = torch.diag(p_t) - torch.outer(p_t, p_t)
                total = total + J_t.T @ H @ J_t
            else:
                residual = p_t - nn.functional.one_hot(labels[n, t], VOCABULARY)
                g = J_t.T @ residual
                total = total + torch.outer(g, g)
    return total


@pytest.mark.parametrize("silent", [0, 1])
def test_a_batch_without_counted_tokens_contributes_nothing(silent: int):
    """Prompt-only (every label -100) batches, first or later: the fit is that of
    the data without them."""
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    X, labels = _lm_data(6)
    rows = slice(2 * silent, 2 * silent + 2)
    labels[rows] = -100
    la = EKFACLaplace(model, "classification", prior_precision=0.5)
    la.fit(_loader(X, labels, batch_size=2))
    kept = [n for n in range(6) if n not in range(6)[rows]]
    reference = EKFACLaplace(model, "classification", prior_precision=0.5)
    reference.fit(
        _loader({k: v[kept] for k, v in X.items()}, labels[kept], batch_size=2)
    )
    assert la.n_data == reference.n_data == int((labels != -100).sum())
    assert_close(la.loss, reference.loss)
    assert_close(
        la.posterior_precision.to_matrix(), reference.posterior_precision.to_matrix()
    )


@pytest.mark.parametrize("backend", ["ggn", "ef"])
def test_token_level_outputs_each_counted_token_an_example(backend: str):
    """Outputs (B, T, V), labels -100 ignored: N is the number of counted tokens,
    the loss their summed cross-entropy, and every block the dense curvature's."""
    from laplace.curvature import CurvlinopsEF

    torch.manual_seed(0)
    model = TinyLM().double().eval()
    X, labels = _lm_data(5)
    kwargs = {"backend": CurvlinopsEF} if backend == "ef" else {}
    la = EKFACLaplace(model, "classification", prior_precision=0.5, **kwargs)
    la.fit(_loader(X, labels, batch_size=2))
    counted = labels != -100
    assert la.n_data == int(counted.sum()) and la.n_outputs == VOCABULARY
    with torch.no_grad():
        logits = model(X)
    loss = nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="sum"
    )
    assert_close(la.loss, loss)
    params = list(model.parameters())
    exact = blocks(
        _token_curvature(
            model, params, X, labels, "type2" if backend == "ggn" else "ef"
        ),
        [p.numel() for p in params],
    )
    for block, basis, values in zip(exact, la.H.eigenvectors, la.H.eigenvalues):
        if basis:
            assert_close(values.flatten(), corrected_eigenvalues(block, basis))
        else:
            assert_close(values.flatten(), torch.diagonal(block))
    # The predictive: one row per token, its (V, V) covariance.
    X_test, _ = _lm_data(2, seed=1)
    J, f = [], []
    for n in range(2):
        x = {key: value[n : n + 1] for key, value in X_test.items()}
        J_n, f_n = loop_jacobians_tokens(model, params, x)
        J.append(J_n)
        f.append(f_n)
    J, f = torch.cat(J), torch.cat(f)
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    mean, variance = la._glm_predictive_distribution(X_test)
    assert mean.shape == (2 * 6, VOCABULARY)
    assert_close(mean, f)
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")
    probs = la(X_test)
    assert probs.shape == (12, VOCABULARY)


def loop_jacobians_tokens(model, params, x):
    """One sequence's Jacobians ``(T, V, P)`` and outputs ``(T, V)``."""
    names = {id(p): name for name, p in model.named_parameters()}
    detached = {names[id(p)]: p.detach() for p in params}

    def f(p):
        return torch.func.functional_call(model, p, (x,)).squeeze(0)

    J = torch.func.jacrev(f)(detached)
    J = torch.cat([J[names[id(p)]].flatten(start_dim=2) for p in params], 2)
    with torch.no_grad():
        return J, f(detached)


class PackedLSTM(nn.Module):
    """An LSTM on a PackedSequence: its examples are mixed in the packed data."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, 4)
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = self.embedding(batch["input_ids"])
        lengths = batch["attention_mask"].sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


class TokenRegression(nn.Module):
    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        self.embedding = nn.Embedding(VOCABULARY, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.head(self.embedding(batch["input_ids"]))
        return out.flatten(0, -2) if self.flatten else out


def test_every_error_s_advice_works_when_followed():
    """Each refusal says what to do; doing it makes the fit work."""
    X, y = token_batch(6), torch.randint(0, CLASSES, (6,))
    # unsupported_layers="raise" advises the default, which fits an LSTM.
    model = Recurrent().double().eval()
    with pytest.raises(ValueError, match="unsupported_layers='diagonal' \\(the"):
        EKFACLaplace(model, "classification", unsupported_layers="raise").fit(
            _loader(X, y)
        )
    EKFACLaplace(model, "classification", unsupported_layers="diagonal").fit(
        _loader(X, y)
    )
    # A packed sequence mixes the examples: freezing the LSTM, as advised, fits.
    model = PackedLSTM().double().eval()
    with pytest.raises(ValueError, match="PackedSequence.*requires_grad_\\(False\\)"):
        EKFACLaplace(model, "classification").fit(_loader(X, y))
    model.rnn.requires_grad_(False)
    EKFACLaplace(model, "classification").fit(_loader(X, y))
    # engine='curvlinops' refuses attention and points to engine='fast'.
    model, X2, y2 = _make("cross_attention")
    model.embedding.requires_grad_(False)
    with pytest.raises(ValueError, match="use engine='fast'"):
        EKFACLaplace(model, "classification", engine="curvlinops").fit(_loader(X2, y2))
    EKFACLaplace(model, "classification", engine="fast").fit(_loader(X2, y2))
    # Token-level regression: each token an example (targets shaped like outputs).
    targets = torch.randn(6, 6, 2, dtype=torch.float64)
    model = TokenRegression().double().eval()
    with pytest.raises(ValueError, match="need regression targets of the same"):
        EKFACLaplace(model, "regression").fit(_loader(X, targets[..., :1]))
    la = EKFACLaplace(model, "regression")
    la.fit(_loader(X, targets))
    assert la.n_data == 36


class _Unbatched(nn.Module):
    """Calls a recurrent layer or an attention on one unbatched sequence."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(VOCABULARY, 4)
        if kind == "rnn":
            self.inner = nn.GRU(4, 4, batch_first=True)
        else:
            self.inner = nn.MultiheadAttention(4, 2, batch_first=True, bias=False)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = self.embedding(batch["input_ids"])
        if self.kind == "mask":  # a (B·heads, T, T) mask
            B, T = x.shape[:2]
            mask = torch.zeros(B * 2, T, T, dtype=x.dtype)
            mixed, _ = self.inner(x, x, x, attn_mask=mask)
            return self.head(mixed.mean(1))
        flat = x.reshape(-1, 4)  # every token of the batch as one sequence
        mixed = (
            self.inner(flat)[0]
            if self.kind == "rnn"
            else self.inner(flat, flat, flat)[0]
        )
        return self.head(mixed.reshape(x.shape).mean(1))


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("rnn", r"'inner' \(GRU\) takes an unbatched sequence"),
        ("attention", r"'inner' \(MultiheadAttention\) takes an unbatched sequence"),
        ("mask", r"takes a 3-D attn_mask, with examples and heads mixed"),
    ],
)
def test_unbatched_recurrent_and_attention_calls_are_refused(kind: str, match: str):
    torch.manual_seed(0)
    model = _Unbatched(kind).double().eval()
    if kind == "attention":
        model.inner.out_proj.requires_grad_(False)  # the in-projection's capture
    elif kind == "mask":
        model.inner.in_proj_weight.requires_grad_(False)
        model.inner.out_proj.requires_grad_(False)
        model.inner.bias_k = nn.Parameter(torch.zeros(1, 1, 4, dtype=torch.float64))
        model.inner.bias_v = nn.Parameter(torch.zeros(1, 1, 4, dtype=torch.float64))
        model.inner.add_zero_attn = False
    X, y = token_batch(4), torch.randint(0, CLASSES, (4,))
    la = EKFACLaplace(model, "classification")
    with pytest.raises(ValueError, match=match):
        la.fit(_loader(X, y))
    assert la.H is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_an_attention_weight_used_outside_its_attention_is_refused():
    from ekfac_laplace.capture import CaptureError, ForwardCapture

    attention = nn.MultiheadAttention(4, 2, batch_first=True).double()
    layout = ParameterLayout(attention, [attention.in_proj_weight])
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with ForwardCapture(layout) as capture:
        attention(x, x, x)
        restore = _compat_watch(capture)
        try:
            with pytest.raises(CaptureError, match="used outside the forward pass"):
                nn.functional.linear(x, attention.in_proj_weight)
        finally:
            restore()


def _compat_watch(capture):
    from ekfac_laplace import _compat

    return _compat.watching_functional_linear(capture._linear_call)


def test_curvlinops_engine_refuses_token_level_outputs():
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head"))
    X, labels = _lm_data(3)
    la = EKFACLaplace(model, "classification", engine="curvlinops")
    with pytest.raises(
        ValueError, match=r"curvlinops' needs outputs of shape .*'fast'"
    ):
        la.fit(_loader(X, labels))
    EKFACLaplace(model, "classification").fit(_loader(X, labels))


def test_per_sequence_monte_carlo_fisher_is_unbiased_for_the_corrected_eigenvalues():
    """One sampled label per token, one backward pass per sequence: in a fixed
    basis, the mean over seeds of the corrected eigenvalues is the dense GGN's
    ``diag(Qᵀ GGN Q)`` (the diagonal blocks' its diagonal), within five standard
    errors; one draw is not the per-token Monte-Carlo EKFAC."""
    from ekfac_laplace import EKFACOptions, compute_ekfac
    from ekfac_laplace.batches import LaplaceBatches

    torch.manual_seed(0)
    model = TinyLM().double().eval()
    X, labels = _lm_data(5)
    params = list(model.parameters())
    batches = LaplaceBatches(_loader(X, labels, batch_size=3), "labels", "input_ids")
    N = int((labels != -100).sum())
    first = compute_ekfac(model, params, batches, "classification", N)
    basis = first.eigenvectors
    exact = blocks(
        _token_curvature(model, params, X, labels, "type2"),
        [p.numel() for p in params],
    )
    expected = torch.cat(
        [
            corrected_eigenvalues(block, q) if q else torch.diagonal(block)
            for block, q in zip(exact, basis)
        ]
    )

    passes = []
    model.head.register_full_backward_hook(lambda *_: passes.append(1))

    def draw(seed: int, per_sequence: bool = True) -> Tensor:
        options = EKFACOptions(
            fisher_type="mc", mc_per_sequence=per_sequence, seed=seed
        )
        factors = compute_ekfac(
            model,
            params,
            batches,
            "classification",
            N,
            options,
            eigenbasis=basis,
            fitted=first.layout,
        )
        return torch.cat([values.flatten() for values in factors.eigenvalues])

    passes.clear()
    per_token = draw(0, per_sequence=False)
    per_token_passes = len(passes)
    passes.clear()
    draw(0)
    # Per token, a pass per position with a counted token; per sequence, one a batch
    # (the same layer check and batch probes before them).
    positions = [
        int((labels[start : start + 3] != -100).any(0).sum()) for start in (0, 3)
    ]
    assert per_token_passes - len(passes) == sum(positions) - len(positions)
    draws = torch.stack([draw(seed) for seed in range(100)])
    mean, error = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - expected).abs() <= 5 * error + 1e-12).all()
    assert not torch.allclose(draws[0], per_token)


def _kronecker_windows(la) -> list[slice]:
    """The parameter windows of the blocks with a low-rank correction."""
    offsets = [0]
    for param in la.posterior_parameters:
        offsets.append(offsets[-1] + param.numel())
    return [
        slice(offsets[index], offsets[index + 1])
        for index, block in enumerate(la.fitted_layout.blocks)
        if block.correction
    ]


@pytest.mark.parametrize("name", [*sorted(MODELS), "token_level_lm"])
def test_a_full_rank_correction_is_the_exact_block(name: str):
    """Every kind (attention projections, GPT-2's transposed Conv1D, a ViT's patch
    convolution, token-level outputs: per-token examples whose rows share the
    weight): with k at least a block's size, its corrected block is the exact one
    (the exact-block structure is checked against the dense GGN elsewhere)."""
    if name == "token_level_lm":
        torch.manual_seed(0)
        model = TinyLM().double().eval()
        X, y = _lm_data(5)
    else:
        model, X, y = _make(name)
    rank = max(p.numel() for p in model.parameters())
    corrected = EKFACLaplace(model, "classification", correction_rank=rank)
    corrected.fit(_loader(X, y, batch_size=2))
    exact = EKFACLaplace(model, "classification", dense_blocks_up_to=rank)
    exact.fit(_loader(X, y, batch_size=2))
    windows = _kronecker_windows(corrected)
    assert windows
    ours, theirs = corrected.H.to_matrix(), exact.H.to_matrix()
    for window in windows:
        assert_close(ours[window, window], theirs[window, window])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_blocks_match_the_dense_ggn(name: str):
    """``dense_blocks_up_to`` for every kind, against the dense GGN: a transposed
    output layer (GPT-2's Conv1D head, in closed form) was once laid out as
    ``(d_out, d_in)`` in the parameter's ``(d_in, d_out)`` order."""
    model, X, y = _make(name)
    params = list(model.parameters())
    largest = max(p.numel() for p in params)
    la = _fit(model, X, y, dense_blocks_up_to=largest)
    exact = blocks(
        loop_ggn(model, params, X, "classification"), [p.numel() for p in params]
    )
    dense = la.H.to_matrix()
    offset = 0
    for param, block in zip(params, exact):
        window = slice(offset, offset + param.numel())
        offset += param.numel()
        assert_close(dense[window, window], block)
