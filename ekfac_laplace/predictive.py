r"""Jacobian-free GLM predictive covariance for EKFAC posteriors.

The GLM predictive covariance is ``J P⁻¹ Jᵀ`` with ``J`` the Jacobian of the outputs
``(B, K)`` w.r.t. the parameters; ``P⁻¹`` is block-diagonal, so the covariance is a
sum over blocks, and no block needs the ``(B, K, parameters)`` Jacobian. For a
``Linear`` or ``Conv2d`` weight the Jacobian factorises through the layer inputs
``a_{n,s}`` and the back-propagated output Jacobians ``g_{n,c,s}`` (``s`` runs over
the positions sharing the weight): ``∂f_{n,c}/∂W = Σ_s g_{n,c,s} a_{n,s}ᵀ``. In the
eigenbasis, with ``g̃ = Q_Gᵀ g``, ``ã = Q_Aᵀ a`` and ``S = 1/(hλ+δ)``,

$$
    \mathrm{Cov}[f_{n,c}, f_{m,c'}]_W = \sum_{i,j} \tilde J_{n,c,i,j}
    \tilde J_{m,c',i,j} S_{i,j}, \qquad
    \tilde J_{n,c} = \sum_s \tilde g_{n,c,s} \tilde a_{n,s}^\top ,
$$

which without weight sharing (one position) reduces to
``Σ_i g̃_{n,c,i} g̃_{m,c',i} Σ_j ã_{n,j} ã_{m,j} S_{i,j}``. A bias block contributes
``Σ_i (Σ_s g̃_{n,c,s,i}) (Σ_s g̃_{m,c',s,i}) S_i``, and a diagonal block (a parameter
KFAC cannot factorise) ``Σ_i J_{n,c,i} J_{m,c',i} S_i`` from the per-example
gradients of its module alone. Each backward pass (output ``c``) is reduced per
layer as it arrives to its rotated Jacobian rows (:class:`_LayerTerms`), so that no
more than one pass's raw gradients of a layer are held; the terms are formed per
input (``n = m``) or jointly over all inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace.capture import ForwardCapture
from ekfac_laplace.diagonal import ModuleCall, on_every_row, restricted_gradients
from ekfac_laplace.driver import BackwardPasses
from ekfac_laplace.fitted import FittedLayout
from ekfac_laplace.layer import KroneckerLayer, group_rows
from ekfac_laplace.layout import DiagonalModule, ParameterLayout
from ekfac_laplace.matrix import EKFACDecomposed
from ekfac_laplace.probes import locate_batches, route_rows


@torch.enable_grad()
def glm_predictive_variance(
    model: nn.Module,
    params: Sequence[Tensor],
    precision: EKFACDecomposed,
    X: Tensor | Mapping[str, Any],
    fitted: FittedLayout,
    joint: bool = False,
    batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """GLM predictive mean and covariance ``J P⁻¹ Jᵀ``, without Jacobians.

    A module that sees ``B·m`` rows (a reward model's pairs folded into the batch)
    has each input's ``m`` consecutive rows grouped as positions, as in the fit
    (:func:`~ekfac_laplace.layer.group_rows`).

    Args:
        model: The network (the modules owning ``params`` must run once per forward
            pass).
        params: The parameters of the posterior, in vector order.
        precision: The posterior precision over ``params``.
        X: A batch of inputs.
        fitted: The fit's layout (every block's structure; where it found each
            module's batch dimension: where it did not, found here, at the cost of
            two backward passes where a shape is ambiguous).
        joint: Return the joint covariance over all inputs and outputs.
        batch: The number of inputs (default: ``X.shape[0]`` for a tensor), so that
            a module whose one output row is shared by all inputs gets each input's
            gradient (see :class:`~ekfac_laplace.capture.ForwardCapture`).

    Token-level outputs ``(B, T, C)`` are one example per token: the outputs
    ``(t, c)`` of a sequence take one backward pass each (``T·C``), and each token
    is returned as a row, ``f`` of shape ``(B·T, C)`` with covariance
    ``(B·T, C, C)`` (laplace-torch's link functions take rows), or jointly over all
    ``B·T·C`` outputs.

    Returns:
        ``f`` of shape ``(B, K)`` and the covariance of shape ``(B, K, K)``, or
        with ``joint=True`` ``f.flatten()`` of shape ``(B·K,)`` and the covariance of
        shape ``(B·K, B·K)`` (ordered input-major, as laplace-torch).

    Raises:
        CaptureError: (a ``ValueError``) if a module runs more than once per forward
            pass, a diagonal module's examples cannot be told apart, or a module
            sees a number of rows that is not a multiple of the inputs; the caller
            can fall back to the dense Jacobian.
    """
    layout = ParameterLayout.from_fitted(model, params, fitted)
    if batch is None and isinstance(X, Tensor):
        batch = X.shape[0]
    # Back-propagating to parameters, the predictive needs no output tensor: left to
    # autograd, the outputs no backward function saves are freed after the forward
    # pass (a 12-layer GPT-2's LoRA products, (B, T, out) each).
    capture = ForwardCapture(
        layout, batch=batch, batch_dims=fitted.batch_dims, keep_outputs=False
    )
    with capture:
        f = model(X)
    capture.settle_calls(f)
    tokens = f.shape[1:] if f.ndim == 3 else None
    if f.shape[0] == 0:  # no inputs: empty results of the right shapes
        return _empty(f.detach(), joint)
    f = f.flatten(start_dim=1)
    B, K = f.shape
    targets = layout.backprop_targets()
    route_rows(capture, f, targets)
    if fitted.batch_dims is None:
        locate_batches(capture, f, targets, check=False)
    # One pass per output; each layer's output gradient is reduced as autograd
    # computes it (see _LayerTerms), so that autograd frees it during the pass: no
    # pass holds all layers' (a 12-layer GPT-2's LoRA layers at 512 tokens, 1.3 GiB
    # for 8 sequences). A module a pass does not reach has a zero row there.
    receiver = _PredictiveTerms(precision, capture, B, K)
    BackwardPasses(capture, layout.layers, layout.diagonal_modules, targets).run(
        K, lambda c: f[:, c].sum(), receiver
    )
    zero = f.new_zeros(B, K, B, K) if joint else f.new_zeros(B, K, K)
    variance = receiver.variance(layout, zero, joint)
    if joint:
        return f.detach().flatten(), variance.reshape(B * K, B * K)
    if tokens is not None:  # each token's (C, C) block, one row per token
        T, C = tokens
        blocks = variance.reshape(B, T, C, T, C).diagonal(dim1=1, dim2=3)
        variance = blocks.permute(0, 3, 1, 2).reshape(B * T, C, C)
        return f.detach().reshape(B * T, C), variance
    return f.detach(), variance


class _PredictiveTerms:
    """The predictive's :class:`~ekfac_laplace.driver.PassReceiver`: its terms.

    A Kronecker or exact block of a layer is reduced per pass by its
    :class:`_LayerTerms`; a diagonal module's gradients are kept per pass and
    turned into Jacobian rows at the end (a tied parameter's summed over its uses).

    Args:
        precision: The posterior precision.
        capture: The forward pass's capture (the layers' inputs, the calls).
        batch: The number of inputs ``B``.
        passes: The number of passes ``K`` (outputs).
    """

    def __init__(
        self,
        precision: EKFACDecomposed,
        capture: ForwardCapture,
        batch: int,
        passes: int,
    ) -> None:
        self.precision, self.capture = precision, capture
        self.batch, self.passes = batch, passes
        self.terms: dict[str, _LayerTerms] = {}
        self.modules: dict[str, dict[int, Any]] = {}

    def layer_gradient(self, layer: KroneckerLayer, gradient: Tensor, k: int) -> None:
        """Reduce a layer's output gradient to its rotated Jacobian rows."""
        if layer.name not in self.terms:
            a = layer.inputs(self.capture.take_input(layer.name))
            a = group_rows(a, self.batch, layer.name)
            self.terms[layer.name] = _LayerTerms(layer, self.precision, a, self.passes)
        self.terms[layer.name].add(gradient, k)

    def module_gradients(self, entry: DiagonalModule, gradients: Any, k: int) -> None:
        """Keep a diagonal module's output gradients of pass ``k``."""
        self.modules.setdefault(entry.name, {})[k] = gradients

    def end_pass(self, k: int) -> None:
        """Nothing waits for the end of a pass."""

    def variance(self, layout: ParameterLayout, zero: Tensor, joint: bool) -> Tensor:
        """The covariance ``J P⁻¹ Jᵀ``, summed over every block.

        Args:
            layout: The layout (its diagonal modules, its tied parameters).
            zero: Zeros of the result's shape, dtype and device.
            joint: Over all pairs of inputs, or per input.

        Returns:
            ``(B, K, B, K)`` or ``(B, K, K)``.
        """
        B, K, precision = self.batch, self.passes, self.precision
        variance = zero
        for layer_terms in self.terms.values():
            variance = variance + layer_terms.variance(joint)
        tied: dict[int, Tensor] = {}  # a tied parameter's rows, summed over its uses
        for entry in layout.diagonal_modules:
            passes = self.modules.get(entry.name)
            if not passes:
                continue  # the module does not influence the outputs
            call = self.capture.calls[entry.name]
            for name, index in zip(entry.param_names, entry.indices):
                if index in layout.tied:
                    rows = _diagonal_rows(entry.module, name, call, passes, K, B)
                    tied[index] = rows if index not in tied else tied[index] + rows
                    continue
                variance = variance + _diagonal_term(
                    entry.module, name, call, passes, K, precision, index, B, joint
                )
        for index, J in tied.items():
            inverse = precision.powered_eigenvalues(index, -1).flatten()
            variance = variance + _squared(
                J.flatten(start_dim=2).to(inverse.dtype), inverse, joint
            )
        return variance


def _empty(f: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
    """The predictive of no inputs: ``(0, K)`` and ``(0, K, K)`` (joint: ``(0, 0)``)."""
    K = f.shape[-1]
    if joint:
        return f.reshape(0), f.new_zeros(0, 0)
    return f.reshape(0, K), f.new_zeros(0, K, K)


class _LayerTerms:
    """One layer's share of the covariance, one backward pass (output ``c``) at a time.

    Each pass's output Jacobian is reduced as autograd computes it to what the
    covariance needs, and released: no raw gradient outlives its layer's step of the
    backward pass (a 12-layer GPT-2's LoRA layers at 512 tokens held every pass's,
    14.8 GiB for 8 sequences; then one pass's, 10.6 GiB; now 8.9). Per pass ``c``
    it keeps

    * the rotated per-example Jacobian of the weight, ``J̃_{n,c} = Q_Gᵀ (Σ_s g_{n,c,s}
      a_{n,s}ᵀ) Q_A`` (per group for a grouped layer; at one position only
      ``g̃_{n,c} = Q_Gᵀ g_{n,c}``, against the rotated inputs);
    * the rotated bias rows ``Q_Gᵀ Σ_s g_{n,c,s}`` (or those of a bias with a factor
      of its own);
    * an exact block's Jacobian rows, in the parameter's own layout.

    :meth:`variance` squares them against ``S = 1/(hλ+δ)`` over all passes.

    Args:
        layer: The layer.
        precision: The posterior precision.
        a: Its inputs, ``(B, S, in)``.
        passes: The number ``K`` of backward passes (it decides the order of the
            weight's rotations, see :func:`_rotate_positions`).
    """

    def __init__(
        self,
        layer: KroneckerLayer,
        precision: EKFACDecomposed,
        a: Tensor,
        passes: int,
    ) -> None:
        self.layer, self.precision, self.a, self.passes = layer, precision, a, passes
        self.pieces: dict[str, dict[int, Tensor]] = {}  # per kind, per pass
        # The weight's Q_G, Q_A (None at one position), S, the inputs as the
        # rotation needs them (rotated where already due) and the order.
        self._weight: tuple[Tensor, Tensor | None, Tensor, Tensor, bool] | None = None
        if layer.weight_index is not None:
            q_g, q_a, inverse = layer.factor_block(
                precision.eigenvectors[layer.weight_index],
                precision.powered_eigenvalues(layer.weight_index, -1),
            )
            a = a.to(q_a.dtype)
            if layer.groups == 1 and a.shape[1] == 1:  # one position
                self._weight = (q_g, None, inverse, a[:, 0] @ q_a, False)
            else:
                if layer.groups == 1:
                    q_g, q_a, inverse = q_g[None], q_a[None], inverse[None]
                a = a.reshape(*a.shape[:2], layer.groups, -1)  # (B, S, G, in)
                B, S, _, width = a.shape
                per_position = _rotate_positions(B, passes, S, q_g.shape[-1], width)
                if per_position:  # the inputs rotated once for all passes
                    a = torch.einsum("bsgi,gij->bsgj", a, q_a)
                self._weight = (q_g, q_a, inverse, a, per_position)

    def add(self, gradient: Tensor, c: int) -> None:
        """Reduce one backward pass's gradient at the layer's output.

        Args:
            gradient: The gradient captured at the layer's output tensor.
            c: The pass (the output it back-propagates).
        """
        layer, B = self.layer, self.a.shape[0]
        g = bias_rows = None  # (B, S, d) each
        if layer.shares_weight or layer.dense_needs_rows:
            g = group_rows(layer.output_gradients(gradient), B, layer.name)
        if layer.separate_bias or layer.dense_needs_bias_rows:
            bias_rows = group_rows(layer.bias_gradients(gradient), B, layer.name)
        bias_rows = g if bias_rows is None else bias_rows
        G = layer.groups
        if layer.bias_index is not None:
            (q_b,) = self.precision.eigenvectors[layer.bias_index]
            summed = bias_rows.sum(1).to(q_b.dtype)  # (B, G·out): Σ_s first
            if q_b.ndim == 3:  # per group (a bias that shares G)
                grouped = summed.reshape(B, G, -1)
                rotated = torch.einsum("bgo,gop->bgp", grouped, q_b).flatten(1)
            else:
                rotated = summed @ q_b
            self._keep("bias", c, rotated)
        if self._weight is not None:
            q_g, q_a, _, a, per_position = self._weight
            g_w = g.to(q_g.dtype)
            if q_a is None:  # one position: the rotated output Jacobian
                self._keep("weight", c, g_w[:, 0] @ q_g)
            else:
                g_w = g_w.reshape(*g_w.shape[:2], G, -1)  # (B, S, G, out)
                J = _rotated_jacobian(g_w, a, q_g, q_a, per_position)
                self._keep("weight", c, J.flatten(1))
        if layer.dense_weight_index is not None:
            per_example = torch.einsum(
                "bsgo,bsgi->bgoi",
                g.reshape(*g.shape[:2], G, -1),
                self.a.to(g.dtype).reshape(*self.a.shape[:2], G, -1),
            )
            J = layer.kind.from_groups(per_example, layer.weight.shape).flatten(1)
            self._keep("dense_weight", c, J)
        if layer.dense_bias_index is not None:
            self._keep("dense_bias", c, bias_rows.sum(1))

    def variance(self, joint: bool) -> Tensor:
        """The layer's covariance terms over all passes.

        Args:
            joint: Over all pairs of inputs, or per input.

        Returns:
            ``(B, K, B, K)`` or ``(B, K, K)``.
        """
        layer, precision = self.layer, self.precision
        pieces = {key: _by_pass(kept, self.passes) for key, kept in self.pieces.items()}
        term = 0
        if "bias" in pieces:
            inverse = precision.powered_eigenvalues(layer.bias_index, -1).flatten()
            term = term + _squared(pieces["bias"], inverse, joint)
            W = precision.inverse_correction(layer.bias_index)
            if W is not None:  # − (J̃ W)(J̃ W)ᵀ
                term = term - _squared(pieces["bias"] @ W, W.new_ones(()), joint)
        if "weight" in pieces:
            _, q_a, inverse, a_rot, _ = self._weight
            if q_a is None:
                term = term + _weight_term(pieces["weight"], a_rot, inverse, joint)
            else:
                term = term + _squared(pieces["weight"], inverse.flatten(), joint)
            rows = self._corrected_rows(pieces["weight"])
            if rows is not None:
                term = term - _squared(rows, rows.new_ones(()), joint)
        for key, index in (
            ("dense_weight", layer.dense_weight_index),
            ("dense_bias", layer.dense_bias_index),
        ):
            if key in pieces:
                term = term + _dense_term(pieces[key], precision, index, joint)
        return term

    def _corrected_rows(self, J: Tensor) -> Tensor | None:
        """``J̃ W`` ``(B, K, k)`` of a corrected weight block (``None`` without one).

        ``J`` holds the rotated Jacobian rows, or at one position the rotated
        output Jacobians ``g̃`` (then ``J̃ = g̃ ⊗ ã``: ``Σ_{o,i} g̃_o W_{o,i} ã_i``).
        """
        index = self.layer.weight_index
        W = self.precision.inverse_correction(index)
        if W is None:
            return None
        shape = self.precision.eigenvalues[index].shape
        columns = W.mT.reshape(W.shape[1], *shape)
        _, _, columns = self.layer.factor_block(
            self.precision.eigenvectors[index], columns
        )  # (k, [G,] d_out, d_in)
        _, q_a, _, a_rot, _ = self._weight
        if q_a is None:  # one product: (k·d_out × d_in)(d_in × B)
            k, d_out, d_in = columns.shape
            weighted = (columns.reshape(k * d_out, d_in) @ a_rot.mT).view(k, d_out, -1)
            return torch.einsum("bco,kob->bck", J, weighted)
        return J @ columns.reshape(W.shape[1], -1).mT

    def _keep(self, key: str, c: int, piece: Tensor) -> None:
        self.pieces.setdefault(key, {})[c] = piece


def _by_pass(pieces: Mapping[int, Tensor], passes: int) -> Tensor:
    """Per-pass rows ``(B, ...)`` stacked as ``(B, K, ...)``; zero where none came."""
    zero = torch.zeros_like(next(iter(pieces.values())))
    return torch.stack([pieces.get(c, zero) for c in range(passes)], dim=1)


def _rotate_positions(
    batch: int, passes: int, positions: int, out: int, width: int
) -> bool:
    """Whether rotating at every position is cheaper than summing over them first.

    ``J̃_{n,c} = Q_Gᵀ (Σ_s g_{n,c,s} a_{n,s}ᵀ) Q_A``: rotating every position first
    costs ``B·K·S·out² + B·S·in²`` multiply-adds, summing over the positions first
    ``B·K·(out²·in + out·in²)`` (both plus the ``B·K·S·out·in`` of the sum). A LoRA
    factor of rank ``r`` (``in = r`` or ``out = r``) over ``S`` tokens is far cheaper
    summed first, a convolution over few positions rotated first.

    Args:
        batch: ``B``.
        passes: ``K``.
        positions: ``S``.
        out: Output features (per group).
        width: Input features (per group).

    Returns:
        ``True`` to rotate at every position.
    """
    B, K, S = batch, passes, positions
    per_position = B * K * S * out * out + B * S * width * width
    per_sequence = B * K * (out * out * width + out * width * width)
    return per_position <= per_sequence


def _rotated_jacobian(
    g: Tensor, a: Tensor, q_g: Tensor, q_a: Tensor, per_position: bool
) -> Tensor:
    """``J̃_{n,g} = Q_G^gᵀ (Σ_s g_{n,s,g} a_{n,s,g}ᵀ) Q_A^g`` of one backward pass.

    Args:
        g: Output Jacobians, ``(B, S, G, out)``.
        a: Inputs, ``(B, S, G, in)``: already rotated (``Q_A^gᵀ a``) if
            ``per_position``.
        q_g: Per group, ``Q_G``, ``(G, out, out)``.
        q_a: Per group, ``Q_A``, ``(G, in, in)``.
        per_position: Rotate ``g`` at every position (see
            :func:`_rotate_positions`), else sum over the positions first.

    Returns:
        ``(B, G, out, in)``.
    """
    if per_position:
        g = torch.einsum("bsgo,gop->bsgp", g, q_g)
        return torch.einsum("bsgo,bsgi->bgoi", g, a)
    J = torch.einsum("bsgo,bsgi->bgoi", g, a)
    J = torch.einsum("gop,bgoi->bgpi", q_g, J)  # one product per group, not a
    return torch.einsum("bgpi,giq->bgpq", J, q_a)  # broadcast batch of them


def _squared(rotated: Tensor, inverse: Tensor, joint: bool) -> Tensor:
    """``Σ_i R_{n,c,i} R_{m,c',i} S_i``: rotated Jacobian rows against ``S``.

    Args:
        rotated: Jacobian rows in the block's eigenbasis, ``(B, K, n)``.
        inverse: ``S = 1/(hλ+δ)``, ``(n,)``.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    scaled = rotated * inverse
    if joint:
        B, K, n = rotated.shape
        return (scaled.reshape(B * K, n) @ rotated.reshape(B * K, n).T).reshape(
            B, K, B, K
        )
    return scaled @ rotated.mT


def _weight_term(g_rot: Tensor, a_rot: Tensor, inverse: Tensor, joint: bool) -> Tensor:
    """A weight without sharing: ``Σ_i g̃_{n,c,i} g̃_{m,c',i} Σ_j ã_{n,j} ã_{m,j} S_ij``.

    Args:
        g_rot: Rotated output Jacobians, ``(B, K, out)``.
        a_rot: Rotated inputs, ``(B, in)``.
        inverse: ``S``, ``(out, in)``.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    if joint:
        weights = torch.einsum("bj,cj,ij->bci", a_rot, a_rot, inverse)
        return torch.einsum("bki,cli,bci->bkcl", g_rot, g_rot, weights)
    weights = a_rot.square() @ inverse.T  # (B, out)
    return torch.einsum("bki,bli,bi->bkl", g_rot, g_rot, weights)


def _dense_term(
    J: Tensor, precision: EKFACDecomposed, index: int, joint: bool
) -> Tensor:
    """An exact block: ``Σ_i (J Q)_{n,c,i} (J Q)_{m,c',i} S_i``.

    Args:
        J: Jacobian rows of the block's parameter, ``(B, K, n)``.
        precision: The posterior precision.
        index: The block.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    basis = precision.eigenvectors[index]
    inverse = precision.powered_eigenvalues(index, -1).flatten()
    J = J.to(inverse.dtype)
    return _squared(J @ basis[0] if basis else J, inverse, joint)


def _diagonal_rows(
    module: nn.Module,
    name: str,
    call: ModuleCall,
    passes: Mapping[int, tuple[Tensor | None, ...]],
    count: int,
    batch: int,
) -> Tensor:
    """A parameter's per-example Jacobian rows through one module, every entry.

    Returns:
        ``(B, K, *parameter.shape)`` (an embedding's unused rows: zero).
    """
    shape = module.get_parameter(name).shape
    rows_of = {}
    for c, gradients in passes.items():
        rows, grad = restricted_gradients(module, [name], call, gradients)[0]
        grad = group_rows(grad.unsqueeze(1), batch, call.name).sum(1)
        rows_of[c] = on_every_row(rows, grad, shape)
    return _by_pass(rows_of, count)


def _diagonal_term(
    module: nn.Module,
    name: str,
    call: ModuleCall,
    passes: Mapping[int, tuple[Tensor | None, ...]],
    count: int,
    precision: EKFACDecomposed,
    index: int,
    batch: int,
    joint: bool,
) -> Tensor:
    """A diagonal block, ``Σ_i J_{n,c,i} J_{m,c',i} S_i``, or an exact one.

    Args:
        module: The owning module.
        name: The parameter's name in it.
        call: The module's forward call.
        passes: Per output ``c`` that reached the module, the gradients at its
            output tensors.
        count: The number ``K`` of outputs (passes).
        precision: The posterior precision.
        index: The parameter's block (diagonal, or exact: ``(Q,)``).
        batch: The number of inputs ``B`` (rows folded into it are summed).
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    dense = bool(precision.eigenvectors[index])
    inverse = precision.powered_eigenvalues(index, -1)
    restricted = {
        c: restricted_gradients(module, [name], call, gradients)[0]
        for c, gradients in passes.items()
    }
    rows = next(iter(restricted.values()))[0]
    # Per-example Jacobian rows: (B, K, numel), or (B, K, R·D) on the used rows.
    J = _by_pass(
        {
            c: group_rows(grad.unsqueeze(1), batch, call.name).sum(1)
            for c, (_, grad) in restricted.items()
        },
        count,
    )
    if dense:  # every entry's row (an embedding's unused rows: zero)
        if rows is not None:
            shape = module.get_parameter(name).shape
            J = J.new_zeros(*J.shape[:2], *shape).index_add_(2, rows, J)
        return _dense_term(J.flatten(start_dim=2), precision, index, joint)
    J = J.flatten(start_dim=2)
    inverse = (inverse if rows is None else inverse[rows]).flatten()
    return _squared(J.to(inverse.dtype), inverse, joint)
