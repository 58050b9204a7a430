"""The forward capture shared by the engine and the predictive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace._compat import has_module_hooks
from ekfac_laplace.capture import ForwardCapture, ReusedModuleError
from ekfac_laplace.layout import ParameterLayout
from tests.test_layout import _mixed


def test_capture_records_inputs_calls_and_gradients_then_removes_its_hooks():
    model = _mixed()
    layout = ParameterLayout(model, list(model.parameters()))
    x = torch.randn(3, 2, 4, 4)
    with ForwardCapture(layout) as capture:
        f = model(x)
    assert not any(has_module_hooks(module) for module in model.modules())
    assert torch.equal(capture.inputs["0"], x)
    assert capture.outputs["4"][0] is f
    call = capture.calls["3"]
    (norm_input,) = call.args
    assert norm_input.shape == (3, 5) and call.kwargs == {}
    assert not norm_input.requires_grad and call.single
    assert call.arg_dims == (0,) and call.output_dims == (0,)
    v = torch.randn_like(f)
    torch.autograd.grad((f * v).sum(), layout.backprop_targets())
    hidden = model[:4](x)
    (expected,) = torch.autograd.grad((model[4](hidden) * v).sum(), hidden)
    [(gradient,)] = capture.take_gradients("3")
    assert torch.allclose(gradient, expected)
    assert capture.take_gradients("3") == []
    # Without the diagonal modules, their calls are not recorded.
    with ForwardCapture(layout, diagonal=False) as capture:
        model(x)
    assert "3" not in capture.calls and "0" in capture.inputs


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(torch.tanh(self.inner(x)))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale, x


def test_capture_refuses_reuse_and_still_removes_its_hooks():
    model = _Reused()
    capture = ForwardCapture(ParameterLayout(model, list(model.parameters())))
    with capture:
        f = model(torch.randn(2, 3))
    assert not has_module_hooks(model.inner)
    assert capture.repeated_modules == ["inner"]
    with pytest.raises(
        ReusedModuleError,
        match="'inner' runs 2 times per forward pass and each of these calls "
        "reaches the outputs",
    ):
        capture.settle_calls(f)
    assert issubclass(ReusedModuleError, ValueError)


class _WeightNormed(nn.Module):
    """Calls ``inner`` on an identity matrix for a norm it detaches (as peft's DoRA
    does), then on the data: only the second call reaches the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.norm = nn.Linear(3, 2)

    def forward(self, x):
        scale = self.inner(torch.eye(3)).norm().detach()
        return self.norm(torch.tanh(self.inner(x)) / scale)


def test_the_one_call_that_reaches_the_outputs_is_kept():
    model = _WeightNormed()
    layout = ParameterLayout(model, list(model.parameters()))
    capture = ForwardCapture(layout)
    x = torch.randn(5, 3)
    with capture:
        f = model(x)
    assert capture.repeated_modules == ["inner"]
    capture.settle_calls(f)
    assert capture.repeated_modules == []
    torch.testing.assert_close(capture.take_input("inner"), x)
    output, _ = capture.outputs["inner"]
    torch.testing.assert_close(output, model.inner(x))


def test_tuple_outputs_get_a_gradient_per_tensor():
    pair = _Pair()
    x = torch.randn(2, 3)
    with ForwardCapture(ParameterLayout(pair, [pair.scale])) as capture:
        scaled, same = pair(x)
    assert not has_module_hooks(pair)
    assert capture.calls[""].output_dims == (0, 0)
    torch.autograd.grad((scaled * 2).sum() + same.sum(), pair.scale)
    [(g_scaled, g_same)] = capture.take_gradients("")
    assert torch.equal(g_scaled, torch.full((2, 3), 2.0)) and g_same is None


def test_outputs_without_grad_get_no_gradient_hook():
    model = nn.Linear(3, 2)
    layout = ParameterLayout(model, list(model.parameters()))
    with torch.no_grad(), ForwardCapture(layout) as capture:
        out = model(torch.randn(4, 3))
    assert not out.requires_grad and capture.take_gradients("") == []


def test_a_capture_without_outputs_leaves_them_to_autograd():
    """``keep_outputs=False`` (the GLM predictive) holds no output tensor: one that
    no backward function saves (here scaled by a constant) is freed after the
    forward pass, and its gradient still arrives."""
    import weakref

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    layout = ParameterLayout(model, list(model[2].parameters()))
    outputs = []
    model[2].register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    for keep in (True, False):
        outputs.clear()
        with ForwardCapture(layout, keep_outputs=keep) as capture:
            f = 2.0 * model(torch.randn(5, 3))
        assert (outputs[0]() is not None) is keep
        assert (capture.outputs["2"][0] is not None) is keep
        torch.autograd.grad(f.sum(), [model[2].weight])
        (gradient,) = capture.take_gradients("2")
        torch.testing.assert_close(gradient, torch.full((5, 2), 2.0))


def test_a_receiver_gets_each_gradient_batch_first_and_the_capture_keeps_none():
    """With :attr:`ForwardCapture.receiver` set, a layer's output gradient goes to
    it as autograd computes it, batch first, and nothing is kept to take later."""
    model = nn.Linear(3, 2)
    layout = ParameterLayout(model, list(model.parameters()))
    X = torch.randn(4, 5, 3)  # sequence first: (T, B, d), batch in dimension 1
    with ForwardCapture(layout, batch_dims={"": 1}) as capture:
        f = model(X)
    received = []
    capture.receiver = lambda name, gradient: received.append((name, gradient))
    torch.autograd.grad((f * torch.arange(5.0)[:, None]).sum(), [model.weight])
    ((name, gradient),) = received
    assert name == ""
    torch.testing.assert_close(
        gradient, torch.arange(5.0)[:, None, None].expand(5, 4, 2)
    )
    assert capture.take_gradients("") == []


def test_a_capture_does_not_outlive_its_forward_pass():
    """The hooks on the outputs live in autograd's graph: they must not keep the
    capture (and through it the batch's graph) alive once the caller drops it."""
    import gc
    import weakref

    model = _mixed()
    layout = ParameterLayout(model, list(model.parameters()))
    with ForwardCapture(layout) as capture:
        f = model(torch.randn(3, 2, 4, 4))
    reference = weakref.ref(capture)
    del capture
    gc.collect()
    assert reference() is None
    f.sum().backward()  # the graph still works; the hooks do nothing


class _Experts(nn.Module):
    """A mixture of experts as people write one: each expert an ``nn.Linear``
    called on the rows routed to it (top-1), or not at all (``skip``)."""

    def __init__(self, skip: bool, tokens: bool, mix: bool = False) -> None:
        super().__init__()
        self.skip, self.tokens, self.mix = skip, tokens, mix
        self.gate = nn.Linear(4, 3)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.out = nn.Linear(4, 3)
        for param in self.gate.parameters():
            param.requires_grad_(False)  # argmax: no gradient reaches the gate

    def forward(self, x):
        shape = x.shape
        rows_of_x = x.reshape(-1, 4)
        choice = self.gate(rows_of_x).argmax(-1)
        hidden = torch.zeros_like(rows_of_x)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero().squeeze(-1)
            if self.skip and not len(rows):
                continue
            out = expert(rows_of_x[rows])
            hidden = hidden.index_add(0, rows, out)
            if self.mix:  # every row of the expert reaches every example
                hidden = hidden + out.mean(0)
        hidden = torch.tanh(hidden).reshape(shape)
        return self.out(hidden.mean(1) if self.tokens else hidden)


@pytest.mark.parametrize("tokens", [False, True], ids=["examples", "tokens"])
@pytest.mark.parametrize("skip", [False, True], ids=["empty_calls", "skipped"])
def test_experts_called_on_routed_rows_are_exact(skip: bool, tokens: bool):
    """Each row's example is found per batch (an expert may get B rows by chance),
    an expert called on no row or not at all adds nothing, and one that never runs
    keeps its prior: every block and the GLM predictive equal the dense GGN's."""
    from ekfac_laplace import EKFACLaplace
    from ekfac_laplace.predictive import glm_predictive_variance
    from tests.cases import loader
    from tests.utils import (
        assert_close,
        blocks,
        corrected_eigenvalues,
        loop_ggn,
        loop_jacobians,
    )

    torch.manual_seed(0)
    model = _Experts(skip, tokens).double()
    X = torch.randn(10, 5, 4) if tokens else torch.randn(10, 4)
    X = X.double()
    if skip:  # expert 0 where x_0 > 0, else 2; 1 never; 2 not on the first batch
        with torch.no_grad():
            model.gate.weight.zero_()
            model.gate.weight[0, 0], model.gate.weight[2, 0] = 1.0, -1.0
            model.gate.bias.copy_(torch.tensor([0.0, -100.0, 0.0]))
        X[:5, ..., 0] = X[:5, ..., 0].abs()
        assert 2 not in model.gate(X[:5].reshape(-1, 4)).argmax(-1).tolist()
        assert 2 in model.gate(X[5:].reshape(-1, 4)).argmax(-1).tolist()
    y = torch.randint(0, 3, (10,))
    la = EKFACLaplace(model, "classification")
    la.fit(loader(X, y, batch_size=5))
    params = la._posterior_params()
    exact = blocks(
        loop_ggn(model, params, X, "classification"), [p.numel() for p in params]
    )
    for block, basis, values in zip(exact, la.H.eigenvectors, la.H.eigenvalues):
        assert_close(values.flatten(), corrected_eigenvalues(block, basis))
    J, _ = loop_jacobians(model, params, X[:4])
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    _, variance = glm_predictive_variance(
        model, params, la.posterior_precision, X[:4], la.fitted_layout
    )
    assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")


def test_rows_carrying_several_examples_are_refused():
    from ekfac_laplace import EKFACLaplace
    from tests.cases import loader

    torch.manual_seed(0)
    model = _Experts(True, False, mix=True).double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.raises(
        ValueError,
        match=r"Module 'experts\.\d' is called on \d+ rows for a batch of \d+ "
        "examples, and some of its rows carry gradient from several examples",
    ):
        EKFACLaplace(model, "classification").fit(loader(X, y, batch_size=5))
