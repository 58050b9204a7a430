"""The one module touching other libraries' private attributes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace import _compat


def test_set_kronecker_eigenbasis_fails_loudly_on_an_unknown_curvlinops():
    class Changed:
        pass

    with pytest.raises(RuntimeError, match="curvlinops-for-pytorch"):
        _compat.set_kronecker_eigenbasis(Changed(), {}, {})


def test_leftover_hooks_are_removed_on_failure_only():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    own = model[0].register_forward_hook(lambda *_: None)
    with pytest.raises(RuntimeError, match="mid-pass"):
        with _compat.removing_leftover_hooks(model):
            model[1].register_forward_hook(lambda *_: None)
            model[1].register_forward_pre_hook(lambda *_: None)
            raise RuntimeError("mid-pass")
    assert _compat.has_module_hooks(model[0])  # the user's hook stays
    assert not _compat.has_module_hooks(model[1])
    with _compat.removing_leftover_hooks(model):
        model[1].register_forward_hook(lambda *_: None)
    assert _compat.has_module_hooks(model[1])  # success: nothing removed
    own.remove()


def test_tensor_version_counts_in_place_changes():
    tensor = torch.zeros(3)
    before = _compat.tensor_version(tensor)
    tensor += 1
    assert _compat.tensor_version(tensor) == before + 1
    assert _compat.tensor_version(tensor + 1) == 0


def test_watching_functional_linear_sees_calls_and_restores_torch_s():
    from torch.nn import functional as F

    seen = []
    restore = _compat.watching_functional_linear(
        lambda x, w, b, out: seen.append(out.shape)
    )
    try:
        F.linear(torch.randn(2, 3), torch.randn(4, 3))
        with pytest.raises(RuntimeError, match="already replaced"):
            _compat.watching_functional_linear(lambda *args: None)
    finally:
        restore()
    restore()  # twice is harmless
    assert seen == [torch.Size([2, 4])]
    F.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert len(seen) == 1


def test_laplace_torch_has_every_private_member_we_read_or_override():
    _compat.check_laplace_torch()
    from ekfac_laplace import EKFACLaplace, EKFACLLLaplace

    for _, name in _compat.LAPLACE_TORCH_HOOKS:  # our classes do override them
        owner = EKFACLLLaplace if hasattr(EKFACLLLaplace, name) else EKFACLaplace
        assert getattr(owner, name).__module__.startswith("ekfac_laplace"), name


def test_a_laplace_torch_without_them_is_refused(monkeypatch):
    from laplace.baselaplace import BaseLaplace

    monkeypatch.delattr(BaseLaplace, "_H_factor")
    with pytest.raises(ImportError, match=r"BaseLaplace\._H_factor.*0\.3"):
        _compat.check_laplace_torch()
