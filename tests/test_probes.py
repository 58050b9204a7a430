"""The probing backward passes: each routed row's example, each module's batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace.capture import ForwardCapture
from ekfac_laplace.errors import CaptureError
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.probes import locate_batches, route_rows


class _SequenceFirst(nn.Module):
    """A linear layer on ``(T, B, d)`` with ``T`` a multiple of ``B``."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.mix = mix

    def forward(self, x):  # x: (B, T, 3)
        h = self.lin(x.transpose(0, 1))  # (T, B, 2)
        if self.mix:
            h = h + h.mean(1, keepdim=True)  # couples the examples
        return h.sum(0)


def _captured(model, X):
    layout = ParameterLayout(model, list(model.parameters()))
    capture = ForwardCapture(layout)
    with capture:
        f = model(X)
    return capture, f, layout.backprop_targets()


def test_a_sequence_first_layer_gets_its_batch_in_dimension_one():
    torch.manual_seed(0)
    capture, f, targets = _captured(_SequenceFirst(), torch.randn(2, 4, 3))
    locate_batches(capture, f, targets, check=True)
    assert capture.batch_dims == {"lin": 1}
    assert capture.take_input("lin").shape == (2, 4, 3)


def test_coupled_examples_are_refused_with_the_module_named():
    torch.manual_seed(0)
    capture, f, targets = _captured(_SequenceFirst(mix=True), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="Module 'lin' sees tensors of shape"):
        locate_batches(capture, f, targets, check=True)
    capture, f, targets = _captured(_SequenceFirst(mix=True), torch.randn(2, 4, 3))
    locate_batches(capture, f, targets, check=False)  # kept at 0, no refusal
    assert capture.batch_dims == {}


class _Routed(nn.Module):
    """An expert called on the rows routed to it: examples 0 and 2 of 3."""

    def __init__(self, share: bool = False) -> None:
        super().__init__()
        self.expert = nn.Linear(3, 2)
        self.share = share

    def forward(self, x):  # x: (3, 3)
        rows = torch.tensor([2, 0])  # out of order
        h = self.expert(x[rows])
        if self.share:
            h = h + h.sum(0)  # each row carries both examples' gradient
        out = torch.zeros(3, 2).index_add(0, rows, h)
        return out


def test_routed_rows_are_laid_out_per_example():
    torch.manual_seed(0)
    X = torch.randn(3, 3)
    capture, f, targets = _captured(_Routed(), X)
    assert route_rows(capture, f, targets)
    destinations, length = capture.routes["expert"]
    assert length == 3  # one row per example, example 1 a zero row
    assert destinations.tolist() == [2, 0]
    laid_out = capture.inputs["expert"]
    assert torch.equal(laid_out[0], X[0]) and torch.equal(laid_out[2], X[2])
    assert not laid_out[1].any()


def test_a_row_with_several_examples_gradient_is_refused():
    torch.manual_seed(0)
    capture, f, targets = _captured(_Routed(share=True), torch.randn(3, 3))
    with pytest.raises(CaptureError, match="carry gradient from several examples"):
        route_rows(capture, f, targets)


def test_unrouted_layers_cost_no_probe():
    model = nn.Sequential(nn.Linear(3, 2))
    capture, f, targets = _captured(model, torch.randn(4, 3))
    assert not route_rows(capture, f, targets)
    assert capture.routes == {}
