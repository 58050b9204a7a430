"""No host synchronisation inside the fit's inner loop (checked on the CPU build).

A GPU fit stalls whenever Python needs a tensor's value (``item``, ``bool``,
``int``, ``float``, ``tolist``) or an operator's output shape depends on values
(``nonzero``, ``unique``). Both can be counted on the CPU build: the first by
wrapping those ``Tensor`` methods, the second with torch's profiler. Per batch their
number must not depend on the number of backward passes, and the predictive and
sampling need a fixed number of them. (On the CPU build ``torch.multinomial``, the
Monte-Carlo label sampler, also validates its input on the host; its CUDA kernel
does not, and it is not counted here.)
"""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

import ekfac_laplace  # noqa: F401

#: Operators whose output shape depends on the values of their input.
SHAPE_SYNCS = ("aten::nonzero", "aten::_unique2", "aten::unique_dim")
#: Tensor methods that read a value on the host.
READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")


def _syncs(action, monkeypatch) -> int:
    reads = []
    for name in READS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, **kwargs):
            reads.append(1)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        action()
    monkeypatch.undo()
    shaped = sum(e.count for e in prof.key_averages() if e.key in SHAPE_SYNCS)
    return len(reads) + shaped


class _Bag(nn.Module):
    """Token embeddings (a diagonal block), their mean, a head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))


def _laplace(
    classes: int, batches: int, fisher_type: str = "type2", tokens: bool = False
):
    torch.manual_seed(0)
    if tokens:
        model = _Bag(classes)
        X = torch.randint(0, 20, (8 * batches, 5))
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 8),
            nn.LayerNorm(8),
            nn.Linear(8, classes),
        )
        X = torch.randn(8 * batches, 1, 6, 6)
    y = torch.randint(0, classes, (8 * batches,))
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="ekfac",
        backend_kwargs={"stochastic": fisher_type == "mc"},
        cache_budget_bytes=0,
    )
    return la, loader, X


@pytest.mark.parametrize(
    ("fisher_type", "tokens"), [("type2", False), ("mc", False), ("type2", True)]
)
def test_fit_syncs_once_per_batch_whatever_the_backward_passes(
    fisher_type, tokens, monkeypatch
):
    """Also with an embedding's diagonal block (its rows found once per batch)."""
    per_batch = {}
    for classes in (3, 10):
        counts = []
        for batches in (2, 4):
            la, loader, _ = _laplace(classes, batches, fisher_type, tokens)
            la.fit(loader)  # the first batch's probe is outside the comparison
            fit = lambda la=la, loader=loader: la.fit(loader)  # noqa: E731
            counts.append(_syncs(fit, monkeypatch))
        per_batch[classes] = (counts[1] - counts[0]) / 2
    # Two passes over the data, each reading the labels' range once per batch;
    # an embedding's rows: one unique in the pass that computes diagonal blocks.
    assert per_batch[3] == per_batch[10] == (3 if tokens else 2)


def test_predictive_and_sampling_sync_a_fixed_number_of_times(monkeypatch):
    la, loader, X = _laplace(10, 2)
    la.fit(loader)
    small = _syncs(
        lambda: la(X[:4], pred_type="glm", link_approx="probit"), monkeypatch
    )
    large = _syncs(
        lambda: la(X[:16], pred_type="glm", link_approx="probit"), monkeypatch
    )
    assert small == large
    few = _syncs(lambda: la.sample(10), monkeypatch)
    assert few == _syncs(lambda: la.sample(100), monkeypatch)


class _GPT2Classifier(nn.Module):
    """A tiny GPT-2 sequence classifier with LoRA adapters: a dict batch in."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        import peft
        import transformers

        config = transformers.GPT2Config(
            vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=8,
            num_labels=classes, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        )  # fmt: skip
        lora = peft.LoraConfig(
            r=2, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        )
        base = transformers.GPT2ForSequenceClassification(config)
        self.model = peft.get_peft_model(base, lora)

    def forward(self, batch):
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


def test_a_gpt2_lora_fit_syncs_a_fixed_number_of_times_per_batch(monkeypatch):
    """Padding masks (their tokens selected once per batch), LoRA layers, attention:
    the syncs per batch do not grow with the backward passes (3 or 10 classes)."""
    per_batch = {}
    for classes in (3, 10):
        counts = []
        for batches in (2, 4):
            torch.manual_seed(0)
            model = _GPT2Classifier(classes).eval()
            lengths = torch.randint(3, 7, (8 * batches, 1))
            mask = (torch.arange(6) < lengths).long()
            examples = [
                {"input_ids": ids, "attention_mask": m, "labels": label}
                for ids, m, label in zip(
                    torch.randint(1, 20, (8 * batches, 6)) * mask,
                    mask,
                    torch.randint(0, classes, (8 * batches,)),
                )
            ]
            loader = DataLoader(examples, batch_size=8)
            la = Laplace(
                model,
                "classification",
                subset_of_weights="all",
                hessian_structure="ekfac",
                cache_budget_bytes=0,
            )
            la.fit(loader)  # the first batch's probes are outside the comparison
            fit = lambda la=la, loader=loader: la.fit(loader)  # noqa: E731
            counts.append(_syncs(fit, monkeypatch))
        per_batch[classes] = (counts[1] - counts[0]) / 2
    assert per_batch[3] == per_batch[10]
