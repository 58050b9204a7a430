"""A Kronecker layer: which parameters it claims, its block shapes, its rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace.layer import KroneckerLayer, LayerBasis, RowGroupingError, group_rows


def test_group_rows_gathers_each_examples_consecutive_rows():
    rows = torch.arange(12.0).reshape(6, 1, 2)  # 3 examples, 2 rows each
    grouped = group_rows(rows, 3, "layer")
    assert grouped.shape == (3, 2, 2)
    assert torch.equal(grouped[1], rows[2:4, 0])
    assert group_rows(rows, 6, "layer") is rows
    with pytest.raises(
        RowGroupingError,
        match=r"'layer' sees 6 rows for a batch of 4 examples, not a multiple.*"
        "a mixture-of-experts expert called on the tokens routed to it, x\\[rows\\]"
        r"\) is supported as an nn.Linear or GPT-2 Conv1D called on 2-D",
    ):
        group_rows(rows, 4, "layer")
    # No row at all (an expert that no example was routed to): no position.
    assert group_rows(rows[:0], 4, "layer").shape == (4, 0, 2)


def test_a_registered_kind_claims_a_layer_and_a_norm_is_left_diagonal():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    layer = KroneckerLayer.owning(model, "0", model[0], "weight")
    assert layer is not None and layer.name == "0" and layer.module is model[0]
    assert layer.kind.description == "an nn.Linear"
    assert KroneckerLayer.owning(model, "1", model[1], "weight") is None


def test_only_a_plain_weight_and_bias_are_kronecker():
    model = nn.Sequential(nn.Linear(3, 4))
    layer = KroneckerLayer.owning(model, "0", model[0], "weight")
    assert layer.not_plain_reason({"weight", "bias"}) is None
    reason = layer.not_plain_reason({"weight_orig", "bias"})
    assert "not a plain 'weight' and 'bias'" in reason
    assert "'0' cannot have Kronecker blocks (why)" in layer.functional_refusal("why")


@pytest.mark.parametrize("groups", [1, 2])
def test_block_shapes_are_those_of_the_fitted_factors(groups):
    conv = nn.Conv2d(4, 6, 3, groups=groups)
    layer = KroneckerLayer.owning(conv, "", conv, "weight")
    layer.weight_index, layer.bias_index = 0, 1
    d_out, d_in = 6 // groups, 4 // groups * 9
    lead = () if groups == 1 else (groups,)
    assert layer.block_shapes(0) == (
        (*lead, d_out, d_in),
        [(*lead, d_out, d_out), (*lead, d_in, d_in)],
    )
    assert layer.block_shapes(1) == ((*lead, d_out), [(*lead, d_out, d_out)])
    q_g, q_a = torch.randn(*lead, d_out, d_out), torch.randn(*lead, d_in, d_in)
    basis = LayerBasis.of(layer, [q_g, q_a])
    assert basis.gradient is q_g and basis.input is q_a and basis.for_bias is q_g
    assert LayerBasis.of(layer, basis.tensors()) == basis
