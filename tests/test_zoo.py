"""The models people bring, as they bring them: each fits, none is refused.

torchvision's ResNet-18, MobileNetV3-small, EfficientNet-B0 and a small ViT (float32,
random weights, a few 32 × 32 images: a fit, a GLM predictive and samples); Hugging
Face BERT, GPT-2, LLaMA, Mistral, Mixtral (top-1 and top-2 routing) and peft LoRA and
DoRA adapters (float64, configurations built in code, checked against the dense GGN).
Nothing is downloaded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from ekfac_laplace import EKFACLaplace
from tests.test_architectures import CLASSES, VOCABULARY, _loader, token_batch, vit
from tests.test_hugging_face import Classifier, _check_blocks, llama_like

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


VISION = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=CLASSES),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(
        num_classes=CLASSES
    ),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=CLASSES),
    "vit": lambda: vit(image_size=32, patch_size=16),
}


@pytest.mark.parametrize("name", sorted(VISION))
def test_torchvision_models_fit_predict_and_sample(name: str):
    torch.manual_seed(0)
    model = VISION[name]().eval()
    X = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, CLASSES, (4,))
    la = EKFACLaplace(model, "classification", prior_precision=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        la.fit(_loader(X, y, batch_size=4))
    for values in la.H.eigenvalues:
        assert bool(torch.isfinite(values).all()) and bool((values >= 0).all())
    probs = la(X[:2], pred_type="glm", link_approx="probit")
    assert probs.shape == (2, CLASSES) and bool(torch.isfinite(probs).all())
    assert la.sample(2).shape == (2, la.n_params)


def _dora() -> nn.Module:
    model = peft.get_peft_model(
        llama_like(),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: move it away
            nn.init.normal_(param, std=0.3)
    return model


class LastToken(Classifier):
    """A language model's next-token logits at the last position."""

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return super().forward(batch)[:, -1, :]


def _gpt2_lm() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCABULARY, n_embd=8, n_layer=1, n_head=2, n_positions=16
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


LANGUAGE = {
    "mistral": lambda: Classifier(llama_like("Mistral")),
    "llama_dora": lambda: Classifier(_dora()),
    "gpt2_lm_tied": lambda: LastToken(_gpt2_lm()),
}


@pytest.mark.parametrize("name", sorted(LANGUAGE))
def test_hugging_face_models_match_the_dense_ggn(name: str):
    """DoRA calls its adapters on an identity matrix too, for the weight norm it
    detaches: only the call on the data counts, and gets Kronecker blocks. GPT-2's
    language-model head is tied to its token embedding: one exact diagonal block,
    with a warning saying so."""
    torch.manual_seed(0)
    model = LANGUAGE[name]().double().eval()
    X = token_batch(6)
    y = torch.randint(0, model(X).shape[-1], (6,))
    la = EKFACLaplace(model, "classification", prior_precision=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.fit(_loader(X, y))
    expected = ["weight tying"] if name == "gpt2_lm_tied" else []
    assert [m for m in expected if any(m in str(w.message) for w in caught)] == (
        expected
    )
    assert len(caught) == len(expected), [str(w.message) for w in caught]
    _check_blocks(model, la, X)


@pytest.mark.parametrize("top_k", [1, 2])
def test_mixtral_matches_the_dense_ggn(top_k: int):
    """The router returns logits it also uses itself (its outputs are aliased, so
    that each gets only the caller's gradient); the experts are one module with
    data-dependent routing (exact diagonal blocks). Transformers' grouped expert
    product has no float64 kernel: float32, at float32's tolerance."""
    torch.manual_seed(0)
    model = llama_like("Mixtral", num_local_experts=3, num_experts_per_tok=top_k)
    model = Classifier(model).eval()
    X = token_batch(6)
    y = torch.randint(0, CLASSES, (6,))
    la = EKFACLaplace(model, "classification", prior_precision=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.fit(_loader(X, y))
    experts = [m for m in model.modules() if type(m).__name__ == "MixtralExperts"]
    assert experts and all(p.requires_grad for m in experts for p in m.parameters())
    _check_blocks(model, la, X, kind="float32")
