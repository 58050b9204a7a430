"""Batches: taking them apart, their size and device, the checks before a fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ekfac_laplace._compat import has_module_hooks
from ekfac_laplace.batches import (
    LaplaceBatches,
    batch_size,
    check_inputs,
    check_targets,
    dataset_size,
    module_device,
    naming_failing_module,
    output_size,
    split_batch,
    to_device,
)
from tests.cases import DictDataset

CPU = torch.device("cpu")


def test_split_batch_tuples_lists_and_dicts():
    X, y = torch.randn(3, 2), torch.arange(3)
    assert split_batch((X, y))[0] is X
    assert split_batch([X, y, "extra"])[1] is y
    batch = {"input_ids": X, "labels": y}
    inputs, targets = split_batch(batch)
    assert inputs is batch and targets is y
    assert split_batch({"x": X, "t": y}, dict_key_y="t")[1] is y
    with pytest.raises(KeyError, match=r"no target key 'labels' \(keys: \['x'\]"):
        split_batch({"x": X})
    with pytest.raises(KeyError, match=r"no input key 'input_ids'.*set dict_key_x"):
        split_batch({"x": X, "labels": y}, dict_key_x="input_ids")
    assert split_batch({"x": X, "labels": y}, dict_key_x="x")[1] is y
    with pytest.raises(ValueError, match=r"\(x, y\) tuples/lists or dicts"):
        split_batch(X)


def test_batch_size_and_device():
    X = torch.randn(4, 2)
    assert batch_size(X) == 4
    assert batch_size({"input_ids": X[:3], "mask": X}) == 3
    assert batch_size({"x": X[:2]}, dict_key_x="x") == 2
    batch = {"input_ids": X, "n": 7}
    assert to_device(batch, CPU) is batch  # already there: kept whole
    assert to_device(X, CPU).device == CPU
    assert to_device("text", CPU) == "text"


def test_laplace_batches_are_re_iterable_and_remember_the_targets():
    X, y = torch.randn(7, 2), torch.arange(7)
    batches = LaplaceBatches(DataLoader(TensorDataset(X, y), batch_size=3))
    assert [len(t) for _, t in batches] == [3, 3, 1]
    assert torch.equal(batches.current_targets, y[6:])
    assert [len(t) for _, t in batches] == [3, 3, 1]  # again
    first_X, first_y = batches.first()
    assert torch.equal(first_X, X[:3]) and torch.equal(first_y, y[:3])
    dicts = LaplaceBatches(DataLoader(DictDataset(X, y), batch_size=4))
    assert torch.equal(dicts.first()[0]["input_ids"], X[:4])
    empty = LaplaceBatches(
        DataLoader(TensorDataset(X[:2], y[:2]), batch_size=3, drop_last=True)
    )
    with pytest.raises(ValueError, match="yields no batches"):
        empty.first()


class _NoLength(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), torch.tensor(0)


def test_dataset_size():
    X, y = torch.randn(5, 2), torch.arange(5)
    assert dataset_size(DataLoader(TensorDataset(X, y), batch_size=2)) == 5
    with pytest.raises(ValueError, match="dataset with a length"):
        dataset_size(DataLoader(_NoLength(), batch_size=1))
    with pytest.raises(ValueError, match="empty training set"):
        dataset_size(DataLoader(TensorDataset(X[:0], y[:0]), batch_size=2))


def _batches(X, y):
    return LaplaceBatches(DataLoader(TensorDataset(X, y), batch_size=4))


def test_output_size_checks_the_first_batch():
    model = nn.Linear(2, 3)
    X = torch.randn(6, 2)
    labels = torch.randint(0, 3, (6,))
    assert output_size(model, _batches(X, labels), "classification", CPU) == 3
    soft = torch.softmax(torch.randn(6, 3), -1)
    assert output_size(model, _batches(X, soft), "classification", CPU) == 3
    assert output_size(model, _batches(X, torch.randn(6, 3)), "regression", CPU) == 3
    with pytest.raises(ValueError, match=r"Regression targets have shape \(4,\)"):
        output_size(model, _batches(X, torch.randn(6)), "regression", CPU)
    with pytest.raises(ValueError, match="Classification targets must be"):
        output_size(model, _batches(X, labels[:, None].float()), "classification", CPU)
    sequence = nn.Sequential(nn.Linear(2, 3), nn.Unflatten(1, (1, 3)))
    with pytest.raises(ValueError, match=r"need integer labels of shape \(4, 1\)"):
        output_size(sequence, _batches(X, labels), "classification", CPU)
    assert output_size(sequence, _batches(X, labels[:, None]), "classification", CPU)
    assert output_size(sequence, _batches(X, torch.randn(6, 1, 3)), "regression", CPU)
    with pytest.raises(ValueError, match="need regression targets of the same shape"):
        output_size(sequence, _batches(X, torch.randn(6, 3)), "regression", CPU)
    volume = nn.Sequential(nn.Linear(2, 6), nn.Unflatten(1, (1, 2, 3)))
    with pytest.raises(ValueError, match=r"\(batch, tokens, classes\), got \(4, 1"):
        output_size(volume, _batches(X, labels), "classification", CPU)


def test_check_inputs_refuses_another_floating_dtype():
    check_inputs(torch.randn(3, 2), torch.float32)
    check_inputs(torch.arange(3), torch.float32)  # token ids are not checked
    with pytest.raises(ValueError, match=r"inputs are torch.float64 but.*float32"):
        check_inputs(torch.randn(3, 2, dtype=torch.float64), torch.float32)
    batch = {"input_ids": torch.arange(3), "pixels": torch.randn(3, 2).half()}
    with pytest.raises(ValueError, match=r"batch's 'pixels' are torch.float16"):
        check_inputs(batch, torch.float32)


@pytest.mark.parametrize(
    ("y", "likelihood", "match"),
    [
        (torch.tensor([0.0, 1.0, 2.0]), "classification", r"integer.*y\.long\(\)"),
        (torch.tensor([True, False, True]), "classification", "integer class"),
        (torch.tensor([0, 1, 7]), "classification", r"\[0, 3\).*from 0 to 7"),
        (torch.tensor([-1, 1, 2]), "classification", "from -1 to 2"),
        (torch.zeros(3, 3, dtype=torch.long), "regression", r"floating point.*float"),
    ],
)
def test_check_targets_says_what_to_do(y, likelihood, match):
    with pytest.raises(ValueError, match=match):
        check_targets(torch.randn(3, 3), y, likelihood)


def test_a_forward_error_names_the_module():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(3, 1))
    with pytest.raises(RuntimeError, match=r"shapes cannot.*in module '2', Linear"):
        with naming_failing_module(model):
            model(torch.randn(5, 2))
    assert not any(has_module_hooks(m) for m in model.modules())


def test_one_shot_iterators_are_refused_and_re_iterables_pass():
    from ekfac_laplace.batches import check_reiterable

    X, y = torch.randn(4, 2), torch.arange(4)
    batches = [(X[:2], y[:2]), (X[2:], y[2:])]
    check_reiterable(batches)
    check_reiterable(DataLoader(TensorDataset(X, y), batch_size=2))
    check_reiterable(LaplaceBatches(batches))
    for one_shot in (iter(batches), (batch for batch in batches)):
        with pytest.raises(ValueError, match="one-shot iterator"):
            check_reiterable(one_shot)


def test_every_pass_must_yield_the_data_of_the_first():
    X, y = torch.randn(6, 2), torch.arange(6)
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    batches = LaplaceBatches(data)
    batches.first()  # a partial pass is not counted
    assert sum(len(b) for _, b in batches) == 6 and batches.first_pass == (2, 6)
    assert sum(len(b) for _, b in batches) == 6
    data.pop()
    with pytest.raises(ValueError, match=r"Pass 3 .* yielded 3 examples in 1 batches"):
        list(batches)


def test_labels_of_any_integer_width_become_int64():
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.int64):
        batches = LaplaceBatches(
            [(torch.randn(2, 2), torch.tensor([0, 1], dtype=dtype))]
        )
        ((_, y),) = list(batches)
        assert y.dtype == torch.int64
    floats = LaplaceBatches([(torch.randn(2, 2), torch.randn(2))])
    assert next(iter(floats))[1].dtype == torch.float32


def test_targets_must_be_finite_and_a_batch_may_have_none():
    f = torch.randn(3, 3)
    check_targets(f[:0], torch.zeros(0, dtype=torch.long), "classification")
    for y, likelihood in (
        (torch.tensor([[0.2, float("nan"), 0.8]] * 3), "classification"),
        (torch.full((3, 3), float("inf")), "regression"),
    ):
        with pytest.raises(ValueError, match="targets of batch 4 contain NaN or Inf"):
            check_targets(f, y, likelihood, batch=4)


def test_a_model_must_return_one_tensor():
    from ekfac_laplace.batches import check_outputs

    out = torch.randn(2, 3)
    assert check_outputs(out) is out
    for bad, name in (((out, out), "tuple"), ({"logits": out}, "dict")):
        with pytest.raises(
            ValueError, match=f"returns a {name}; .*model\\(x\\)\\[0\\]"
        ):
            check_outputs(bad)


def test_module_device_is_the_first_parameters_device_or_the_cpu():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    meta = torch.nn.Linear(2, 2, device="meta")
    assert module_device(meta) == torch.device("meta")
