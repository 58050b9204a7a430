"""Hugging Face LLaMA, GPT-2 and BERT classifiers: all weights, LoRA, last layer.

Small random-init models built from configs (no download), dict batches with a
padding ``attention_mask``, in float64. Every block is checked against the dense
GGN and the GLM predictive against the dense Jacobians, as for torch's own layers
(:mod:`tests.test_architectures`).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ekfac_laplace import EKFACLaplace, EKFACLLLaplace
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.predictive import glm_predictive_variance
from tests.test_architectures import CLASSES, VOCABULARY, _loader, token_batch
from tests.utils import (
    assert_close,
    blocks,
    corrected_eigenvalues,
    loop_ggn,
    loop_jacobians,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class Classifier(nn.Module):
    """A Hugging Face model as laplace-torch expects it: a dict batch in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


def llama_like(family: str = "Llama", **extra) -> nn.Module:
    """A one-layer LLaMA-family classifier (``Llama``, ``Mistral``, ``Mixtral``)."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCABULARY,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        num_labels=CLASSES,
        pad_token_id=0,
        **extra,
    )
    return getattr(transformers, f"{family}ForSequenceClassification")(config)


def llama() -> nn.Module:
    return llama_like("Llama")


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCABULARY,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=16,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return transformers.GPT2ForSequenceClassification(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCABULARY,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=CLASSES,
    )
    return transformers.BertForSequenceClassification(config)


FAMILIES = {
    # name: (builder, LoRA target modules, kinds of the Kronecker layers)
    "llama": (llama, ["q_proj", "v_proj"], {"linear"}),
    "gpt2": (gpt2, ["c_attn"], {"gpt2_conv1d", "linear"}),
    "bert": (bert, ["query", "value"], {"linear"}),
}


def _make(name: str, lora: bool = False, n: int = 7, seed: int = 0):
    build, targets, _ = FAMILIES[name]
    torch.manual_seed(seed)
    model = build()
    if lora:
        config = peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=targets,
            fan_in_fan_out=name == "gpt2",  # GPT-2's Conv1D stores W transposed
        )
        model = peft.get_peft_model(model, config)
        for module in model.modules():  # LoRA's B starts at zero: move it away
            if isinstance(module, nn.Linear) and module.weight.shape[1] == 2:
                nn.init.normal_(module.weight, std=0.3)
    model = Classifier(model).double().eval()
    X = token_batch(n, seed=seed)
    y = torch.randint(0, CLASSES, (n,))
    return model, X, y


def _tolerance(model: nn.Module) -> str:
    """LLaMA's RMSNorm computes in float32 even in a float64 model (as the library
    does on purpose): agreement to about 1e-6 there, 1e-10 elsewhere."""
    llama = any(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    return "float32_internals" if llama else "float64"


def _check_blocks(model: nn.Module, la, X, kind: str | None = None) -> None:
    params = la._posterior_params()
    kind = _tolerance(model) if kind is None else kind
    exact = blocks(
        loop_ggn(model, params, X, "classification"), [p.numel() for p in params]
    )
    for block, basis, values in zip(exact, la.H.eigenvectors, la.H.eigenvalues):
        if not basis:
            assert_close(values.flatten(), torch.diagonal(block), kind)
        else:
            assert_close(values.flatten(), corrected_eigenvalues(block, basis), kind)


def _check_predictive(model: nn.Module, la, seed: int = 1) -> None:
    X_test = token_batch(4, seed=seed)
    params = la._posterior_params()
    J, f = loop_jacobians(model, params, X_test)
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    kind = "float32_internals" if _tolerance(model) != "float64" else "float64_loose"
    for joint in (False, True):
        mean, variance = glm_predictive_variance(
            model,
            params,
            la.posterior_precision,
            X_test,
            la.fitted_layout,
            joint=joint,
            batch=4,
        )
        if joint:
            flat = J.reshape(-1, J.shape[-1])
            assert_close(variance, flat @ covariance @ flat.T, kind)
        else:
            assert_close(mean, f)
            assert_close(variance, J @ covariance @ J.transpose(1, 2), kind)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_all_weights_match_the_dense_ggn_and_jacobians(name: str):
    model, X, y = _make(name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()  # the fit puts the model in eval mode (dropout off)
    la = EKFACLaplace(model, "classification", prior_precision=0.5)
    la.fit(_loader(X, y))
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    layout = ParameterLayout(model, la._posterior_params())
    assert {layer.kind.name for layer in layout.layers} == FAMILIES[name][2]
    _check_blocks(model, la, X)
    _check_predictive(model, la)
    assert not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lora_adapters_match_the_dense_ggn_and_jacobians(name: str):
    model, X, y = _make(name, lora=True)
    la = EKFACLaplace(model, "classification", prior_precision=0.5)
    la.fit(_loader(X, y))
    names = {id(p): n for n, p in model.named_parameters()}
    trained = [names[id(p)] for p in la._posterior_params()]
    assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
    assert all("lora_" in n or "modules_to_save" in n for n in trained)
    layout = ParameterLayout(model, la._posterior_params())
    assert not layout.has_diagonal  # adapters and the head: all Kronecker
    _check_blocks(model, la, X)
    _check_predictive(model, la)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_last_layer_matches_the_dense_ggn_and_jacobians(name: str):
    model, X, y = _make(name)
    la = EKFACLLLaplace(model, "classification", prior_precision=0.5)
    la.fit(_loader(X, y))
    head = "classifier" if name == "bert" else "score"
    assert torch.equal(
        la.model.last_layer.weight, model.model.get_submodule(head).weight
    )
    copy = la.model.model  # laplace-torch's last-layer classes work on a copy
    _check_blocks(copy, la, X)
    _check_predictive(copy, la)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lora_fast_and_curvlinops_engines_agree(name: str):
    """LoRA adapters are nn.Linear layers, which curvlinops supports: both engines
    give the same posterior (without padding, which curvlinops would count in A)."""
    model, X, y = _make(name, lora=True)
    X["attention_mask"] = torch.ones_like(X["attention_mask"])
    precisions = []
    for engine in ("fast", "curvlinops"):
        la = EKFACLaplace(model, "classification", prior_precision=0.5, engine=engine)
        la.fit(_loader(X, y))
        precisions.append(la.posterior_precision.to_matrix())
    assert_close(*precisions, _tolerance(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_lora_gpt2_matches_its_float32_fit(dtype):
    """A GPT-2's LoRA posterior in bf16 / fp16: accumulated in float32 (``H``),
    returned in the model's dtype, and equal to the float32 fit of the same weights
    to what half precision allows (the evidence, the GLM predictive's mean and
    variance, and its probabilities)."""
    import copy

    model, X, y = _make("gpt2", lora=True, n=12)
    X_test = token_batch(4, seed=1)
    results = {}
    for precision in (torch.float32, dtype):
        network = copy.deepcopy(model).to(precision)
        la = EKFACLaplace(network, "classification", prior_precision=1.0)
        la.fit(_loader(X, y))
        assert all(values.dtype == torch.float32 for values in la.H.eigenvalues)
        evidence = la.log_marginal_likelihood()
        mean, variance = la._glm_predictive_distribution(X_test)
        probs = la(X_test, link_approx="probit")
        for value in (evidence, mean, variance, probs):
            assert value.dtype == precision
        results[precision] = [v.float() for v in (evidence, mean, variance, probs)]
    rtol = 2e-2 if dtype == torch.float16 else 6e-2  # 11 and 8 significant bits
    for full, half in zip(results[torch.float32], results[dtype]):
        atol = rtol * float(full.abs().max())
        torch.testing.assert_close(half, full, rtol=rtol, atol=atol)
