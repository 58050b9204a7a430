"""Batches: taking them apart, their size and device, the checks before a fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ekfac_laplace.batches import (
    LaplaceBatches,
    batch_size,
    dataset_size,
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
    with pytest.raises(ValueError, match=r"outputs of shape \(batch, outputs\)"):
        output_size(sequence, _batches(X, labels), "classification", CPU)
