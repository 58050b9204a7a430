"""The parameter layout: which block each parameter gets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace import EKFACOptions
from ekfac_laplace.layout import ParameterBlock, ParameterLayout

RAISE = EKFACOptions(unsupported_layers="raise")


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),  # 0: Kronecker
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5, bias=False),  # 2: Kronecker, weight only
        nn.LayerNorm(5),  # 3: diagonal
        nn.Linear(5, 2),  # 4: Kronecker
    )


def test_layout_assigns_blocks_and_groups_modules():
    model = _mixed()
    layout = ParameterLayout(model, list(model.parameters()))
    assert layout.blocks == [
        ParameterBlock("0", "weight", False),
        ParameterBlock("0", "bias", False),
        ParameterBlock("2", "weight", False),
        ParameterBlock("3", "weight", True),
        ParameterBlock("3", "bias", True),
        ParameterBlock("4", "weight", False),
        ParameterBlock("4", "bias", False),
    ]
    assert len(layout) == 7 and layout.has_diagonal
    assert [
        (layer.name, layer.weight_index, layer.bias_index) for layer in layout.layers
    ] == [
        ("0", 0, 1),
        ("2", 2, None),
        ("4", 5, 6),
    ]
    assert [layer.out_features for layer in layout.layers] == [3, 5, 2]
    (norm,) = layout.diagonal_modules
    assert (norm.name, norm.param_names, norm.indices) == (
        "3",
        ["weight", "bias"],
        [3, 4],
    )
    assert layout.first_diagonal() == ParameterBlock("3", "weight", True)
    # One back-propagation target per module: the bias where there is one.
    targets = layout.backprop_targets()
    assert targets[0] is model[0].bias and targets[1] is model[2].weight
    assert targets[2] is model[4].bias and targets[3] is model[3].weight


def test_layout_of_a_subset_and_its_refusals():
    model = _mixed()
    last = ParameterLayout(model, [model[4].weight])
    assert [layer.name for layer in last.layers] == ["4"] and not last.has_diagonal
    with pytest.raises(ValueError, match="not a parameter of the model"):
        ParameterLayout(model, [nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="no parameters"):
        ParameterLayout(model, [])
    with pytest.raises(ValueError, match=r"'3.weight' belongs to a LayerNorm"):
        ParameterLayout(model, list(model.parameters()), RAISE)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="weight tying"):
        ParameterLayout(tied, list(tied.parameters()), RAISE)
    shared = ParameterLayout(tied, list(tied.parameters()))  # a diagonal block
    assert [(name, param) for name, param, _ in shared.tied[0]] == [
        ("0", "weight"),
        ("1", "weight"),
    ]
    assert shared.blocks[0].diagonal and not shared.layers  # both on diagonal blocks
    norm = nn.BatchNorm1d(3).train()
    with pytest.raises(ValueError, match="training mode"):
        ParameterLayout(norm, list(norm.parameters()))


def test_layer_bases_regroup_the_block_eigenbases_per_layer():
    model = _mixed()
    params = [p for p in model.parameters()]
    layout = ParameterLayout(model, params[1:])  # layer '0' without its weight
    eigenbasis = [
        tuple(torch.eye(n) * (i + 1) for n in shape)
        for i, shape in enumerate([(3,), (5, 48), (5,), (5,), (2, 5), (2,)])
    ]
    bases = layout.layer_bases(eigenbasis)
    assert list(bases) == ["0", "2", "4"]
    assert bases["0"].input is None and bases["0"].gradient is eigenbasis[0][0]
    assert bases["0"].for_bias is eigenbasis[0][0]
    assert bases["2"][:2] == eigenbasis[1] and bases["2"].bias is None
    assert bases["4"][:2] == eigenbasis[4]  # the weight's pair, shared by the bias
