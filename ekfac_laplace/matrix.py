"""The structured EKFAC matrix: Kronecker eigenbases and corrected eigenvalues.

``EKFACDecomposed`` has the interface of laplace-torch's
``laplace.utils.matrix.KronDecomposed`` (``+ deltas``, ``* scalar``, ``len``,
``logdet``, ``bmm``, ``inv_square_form``, ``diag``, ``to_matrix``, ``detach``), so every
code path of laplace-torch that works with a decomposed Kronecker posterior
precision works with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ekfac_laplace import lowrank

_Scalar = float | int | Tensor

#: Dense helpers (:meth:`EKFACDecomposed.to_matrix`, a Laplace object's
#: ``posterior_covariance`` and joint predictive covariance) refuse results larger
#: than this unless the caller passes ``max_bytes=None`` (or a larger limit).
DENSE_LIMIT_BYTES = 2**31


def check_dense_size(
    shape: tuple[int, ...], dtype: torch.dtype, what: str, max_bytes: int | None
) -> None:
    """Refuse a dense result that would exceed ``max_bytes``.

    Args:
        shape: Shape of the dense result.
        dtype: Its dtype.
        what: What it is, for the message.
        max_bytes: The limit; ``None`` disables the check.

    Raises:
        MemoryError: If the result would be larger than ``max_bytes``.
    """
    if max_bytes is None:
        return
    numbers = 1
    for size in shape:
        numbers *= int(size)
    nbytes = numbers * torch.empty((), dtype=dtype).element_size()
    if nbytes > max_bytes:
        raise MemoryError(
            f"The dense {what} of shape {tuple(shape)} would take "
            f"{nbytes / 2**30:.1f} GiB (limit {max_bytes / 2**30:.1f} GiB). Use the "
            "structured operations instead (bmm, diag, posterior_variance, the "
            "per-input predictive), or pass max_bytes=None / raise the limit if you "
            "really want it."
        )


class _LogDet(torch.autograd.Function):
    r"""``Σ_b Σ_i log(s λ_{b,i} + δ_b)`` as one autograd node (marginal likelihood).

    Its gradients are closed-form sums computed with the value,
    ``∂/∂δ_b = Σ_i 1/(s λ_{b,i} + δ_b)`` and ``∂/∂s = Σ_{b,i} λ_{b,i}/(s λ_{b,i} +
    δ_b)``, so a marginal-likelihood step builds no per-block graph. Also returns
    whether every damped eigenvalue is positive (a tensor: no host sync here).
    """

    @staticmethod
    def forward(ctx, deltas, scale, *eigenvalues):  # noqa: D102
        total = deltas.new_zeros(())
        needs_delta, needs_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        delta_grads, scale_grad = [], deltas.new_zeros(())
        for values, delta in zip(eigenvalues, deltas):
            damped = (
                values + delta if scale is None else torch.addcmul(delta, values, scale)
            )
            total = total + torch.log(damped).sum()
            if needs_delta or needs_scale:
                inverse = damped.reciprocal()
                delta_grads.append(inverse.sum())
                if needs_scale:
                    scale_grad = scale_grad + (values * inverse).sum()
        # The eigenvalues are finite, so the sum is finite exactly when every
        # damped eigenvalue is positive (log gives -inf at 0, NaN below).
        positive = torch.isfinite(total)
        grads = torch.stack(delta_grads) if delta_grads else deltas.new_zeros(0)
        ctx.save_for_backward(grads, scale_grad)
        ctx.has_scale = scale is not None
        ctx.mark_non_differentiable(positive)
        return total, positive

    @staticmethod
    def backward(ctx, grad_total, _grad_positive):  # noqa: D102
        delta_grads, scale_grad = ctx.saved_tensors
        grad_scale = grad_total * scale_grad if ctx.has_scale else None
        n = len(ctx.needs_input_grad) - 2
        return (grad_total * delta_grads, grad_scale, *([None] * n))


class EKFACDecomposed:
    r"""Block-diagonal matrix in a Kronecker-factored eigenbasis with free eigenvalues.

    There is one block per parameter tensor, in the order of the parameter vector.
    A weight block of shape ``(out, in)`` (for ``Conv2d``, ``in = c_in * kh * kw``) has
    eigenvectors ``(Q_G, Q_A)`` and eigenvalues ``λ`` of shape ``(out, in)``; a bias
    block of size ``out`` has eigenvectors ``(Q_G,)`` and eigenvalues of shape
    ``(out,)``; a diagonal block (a parameter KFAC cannot factorise) has eigenvectors
    ``()`` — the identity basis — and eigenvalues of any shape. A grouped layer's
    blocks (a grouped convolution: ``G`` independent maps) stack ``G`` bases,
    eigenvectors ``(G, out, out)`` and ``(G, in, in)`` with eigenvalues
    ``(G, out, in)`` (``(G, out)`` for its bias): the block is
    ``⊕_g Q_G^g ⊗ Q_A^g``. With the additive ``δ_b`` (e.g. a prior precision) of
    block ``b``,

    $$
        M_b = (Q_G \otimes Q_A) \, \mathrm{diag}(\mathrm{vec}(λ_b) + δ_b) \,
        (Q_G \otimes Q_A)^\top ,
    $$

    where ``vec`` is row-major, matching ``torch.nn.utils.parameters_to_vector``. This
    is the form of the EKFAC approximation of George et al. (2018), "Fast Approximate
    Natural Gradient Descent in a Kronecker-factored Eigenbasis", with damping.
    Multiplying by a scalar ``c`` is kept lazy (``scale``): the matrix is
    ``Q diag(c λ + c δ) Qᵀ`` without copying the eigenvalues.

    Args:
        eigenvectors: Per block, ``(Q_G, Q_A)`` for a weight, ``(Q_G,)`` for a bias
            (orthogonal matrices of shapes ``(out, out)`` and ``(in, in)``), or ``()``
            for the identity basis.
        eigenvalues: Per block, the eigenvalues in the eigenbasis, shape ``(out, in)``
            for a weight, ``(out,)`` for a bias, any shape for the identity basis.
        deltas: Additive constant per block, shape ``()``, ``(1,)`` or
            ``(len(eigenvalues),)``; zero if ``None``.
        scale: Factor applied to ``eigenvalues`` (not to ``deltas``); ``None`` is 1.
        corrections: Per block ``None`` or a low-rank correction ``(U, S)`` in its
            eigenbasis: orthonormal ``U`` ``(n_b, k)`` over the block's row-major
            eigenvalues and ``S ≥ 0`` ``(k,)``. The block is then
            ``Q (diag(scale·λ + δ) + scale·U diag(S) Uᵀ) Qᵀ``, its eigenvalues
            ``λ`` the diagonal left beside the correction
            (:mod:`ekfac_laplace.lowrank`); powers ``1``, ``-1`` and the sampling
            factor of ``-1/2`` are exact.

    Raises:
        ValueError: If the blocks are empty or their shapes do not fit together.
    """

    def __init__(
        self,
        eigenvectors: Sequence[tuple[Tensor, ...]],
        eigenvalues: Sequence[Tensor],
        deltas: Tensor | None = None,
        scale: Tensor | float | None = None,
        corrections: Sequence[tuple[Tensor, Tensor] | None] | None = None,
    ) -> None:
        if len(eigenvectors) == 0:
            raise ValueError("EKFACDecomposed needs at least one block, got none.")
        if len(eigenvectors) != len(eigenvalues):
            raise ValueError(
                f"Got {len(eigenvectors)} eigenvector tuples but {len(eigenvalues)} "
                "eigenvalue tensors; pass one of each per parameter block."
            )
        for index, (basis, values) in enumerate(zip(eigenvectors, eigenvalues)):
            groups = {tuple(q.shape[:-2]) for q in basis}
            expected = (*next(iter(groups), ()), *(q.shape[-1] for q in basis))
            if (
                len(basis) not in (0, 1, 2)
                or len(groups) > 1
                or any(
                    q.ndim not in (2, 3) or q.shape[-2] != q.shape[-1] for q in basis
                )
            ):
                raise ValueError(
                    f"Block {index}: eigenvectors must be () (identity basis), (Q_G,) "
                    f"or (Q_G, Q_A) with square matrices (or G stacked square "
                    f"matrices each, for G groups), got shapes "
                    f"{[tuple(q.shape) for q in basis]}."
                )
            if basis and tuple(values.shape) != expected:
                raise ValueError(
                    f"Block {index}: eigenvalues have shape {tuple(values.shape)} but "
                    f"the eigenbasis needs {expected}."
                )
        self.eigenvectors: list[tuple[Tensor, ...]] = [tuple(b) for b in eigenvectors]
        self.eigenvalues: list[Tensor] = list(eigenvalues)
        reference = self.eigenvalues[0]
        if deltas is None:
            deltas = torch.zeros(
                len(self), device=reference.device, dtype=reference.dtype
            )
        self.deltas: Tensor = self._broadcast_deltas(deltas)
        self.scale: Tensor | float | None = scale
        self.corrections: list[tuple[Tensor, Tensor] | None] = self._checked(
            corrections
        )
        # What a corrected block derives once (Woodbury and sampling factors).
        self._inverse_corrections: dict[Any, Any] = {}

    def _checked(
        self, corrections: Sequence[tuple[Tensor, Tensor] | None] | None
    ) -> list[tuple[Tensor, Tensor] | None]:
        """One correction or ``None`` per block, shapes checked."""
        if corrections is None:
            return [None] * len(self)
        if len(corrections) != len(self):
            raise ValueError(
                f"Got {len(corrections)} corrections for {len(self)} blocks; pass "
                "one (or None) per block."
            )
        for index, correction in enumerate(corrections):
            if correction is None:
                continue
            U, S = correction
            n = self.eigenvalues[index].numel()
            if U.ndim != 2 or U.shape[0] != n or S.shape != (U.shape[1],):
                raise ValueError(
                    f"Block {index}: a correction needs U of shape (n, k) with n = "
                    f"{n} and S of shape (k,), got {tuple(U.shape)} and "
                    f"{tuple(S.shape)}."
                )
        return list(corrections)

    def _derived(self, deltas: Tensor, scale: Tensor | float | None) -> EKFACDecomposed:
        """The same blocks with other deltas and scale, without re-checking them."""
        derived = object.__new__(EKFACDecomposed)
        derived.eigenvectors = self.eigenvectors
        derived.eigenvalues = self.eigenvalues
        derived.deltas = deltas
        derived.scale = scale
        derived.corrections = self.corrections
        derived._inverse_corrections = {}
        return derived

    # ------------------------------------------------------------------ structure
    def __len__(self) -> int:
        return len(self.eigenvalues)

    @property
    def block_sizes(self) -> list[int]:
        """Number of parameters of each block."""
        return [values.numel() for values in self.eigenvalues]

    @property
    def n_params(self) -> int:
        """Total number of parameters (the matrix is ``n_params × n_params``)."""
        return sum(self.block_sizes)

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return self.eigenvalues[0].device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the stored tensors."""
        return self.eigenvalues[0].dtype

    def _broadcast_deltas(self, deltas: Tensor) -> Tensor:
        if not isinstance(deltas, Tensor):
            raise ValueError(
                f"deltas must be a torch.Tensor, got {type(deltas).__name__}; wrap it "
                "with torch.as_tensor(...)."
            )
        if deltas.ndim == 0 or (deltas.ndim == 1 and len(deltas) == 1):
            return deltas.reshape(1).expand(len(self))
        if deltas.ndim == 1 and len(deltas) == len(self):
            return deltas
        raise ValueError(
            f"deltas must be a scalar or have one entry per block ({len(self)}), "
            f"got shape {tuple(deltas.shape)}."
        )

    def to_state(self) -> list[tuple[Tensor, ...]]:
        """The curvature as plain tensors: one ``(λ, *eigenvectors)`` per block.

        Deltas and the lazy scale are not saved: a Laplace object stores the
        curvature without prior (``H``) and rebuilds its posterior from it.

        Returns:
            A list of tuples of tensors, which ``torch.save`` stores without pickling
            any class.

        Raises:
            ValueError: For a matrix with low-rank corrections (not saved yet).
        """
        if any(c is not None for c in self.corrections):
            raise ValueError(
                "A matrix with low-rank corrections cannot be saved as an EKFAC state "
                "yet: its corrections would be lost."
            )
        return [
            (values, *basis)
            for basis, values in zip(self.eigenvectors, self.eigenvalues)
        ]

    @classmethod
    def from_state(cls, state: Any) -> EKFACDecomposed:
        """Rebuild a matrix (zero deltas) from :meth:`to_state`.

        Args:
            state: A list of ``(eigenvalues, *eigenvectors)`` tuples.

        Returns:
            The matrix.

        Raises:
            ValueError: If ``state`` is not such a list or its shapes do not fit.
        """
        if (
            not isinstance(state, (list, tuple))
            or not state
            or not all(
                isinstance(block, (list, tuple))
                and 1 <= len(block) <= 3
                and all(isinstance(t, Tensor) for t in block)
                for block in state
            )
        ):
            raise ValueError(
                "The state has no EKFAC eigenvectors and eigenvalues: 'H' must be a "
                "list of (eigenvalues, *eigenvectors) tuples of tensors, as "
                "EKFACLaplace.state_dict() writes it."
            )
        return cls([tuple(block[1:]) for block in state], [block[0] for block in state])

    def detach(self) -> EKFACDecomposed:
        """Detach eigenvalues and deltas from the autograd graph (in place).

        Returns:
            ``self``.
        """
        self.eigenvalues = [values.detach() for values in self.eigenvalues]
        self.deltas = self.deltas.detach()
        if isinstance(self.scale, Tensor):
            self.scale = self.scale.detach()
        return self

    def __add__(self, deltas: Tensor | float) -> EKFACDecomposed:
        """Add a scalar or one scalar per block to the diagonal: ``M + δ I``.

        Args:
            deltas: Scalar, or a tensor of shape ``(1,)`` or ``(len(self),)``.

        Returns:
            A new matrix sharing the eigenbasis.
        """
        if not isinstance(deltas, Tensor):
            if not isinstance(deltas, (float, int)):
                raise ValueError(
                    "Can only add a scalar or a tensor of per-block scalars to "
                    f"EKFACDecomposed, got {type(deltas).__name__}."
                )
            deltas = torch.as_tensor(deltas, device=self.device, dtype=self.dtype)
        return self._derived(self.deltas + self._broadcast_deltas(deltas), self.scale)

    def __mul__(self, scalar: _Scalar) -> EKFACDecomposed:
        """Multiply the matrix by a positive scalar: ``c M`` (eigenvalues and deltas).

        Args:
            scalar: A Python number or a tensor with one element (may require grad).

        Returns:
            A new matrix sharing the eigenbasis.

        Raises:
            ValueError: If ``scalar`` is not a single number.
        """
        if isinstance(scalar, Tensor):
            if scalar.numel() != 1:
                raise ValueError(
                    f"Can only multiply EKFACDecomposed by a scalar, got a tensor of "
                    f"shape {tuple(scalar.shape)}."
                )
            scalar = scalar.reshape(())
        elif not isinstance(scalar, (float, int)):
            raise ValueError(
                "Can only multiply EKFACDecomposed by a scalar, got "
                f"{type(scalar).__name__}."
            )
        scale = scalar if self.scale is None else self.scale * scalar
        return self._derived(self.deltas * scalar, scale)

    __radd__ = __add__
    __rmul__ = __mul__

    # ----------------------------------------------------------------- spectrum
    def damped_eigenvalues(self, index: int) -> Tensor:
        """Eigenvalues of block ``index`` of the matrix: ``scale·λ + δ``.

        Args:
            index: Block index.

        Returns:
            Shape of the block's eigenvalues.
        """
        values, delta = self.eigenvalues[index], self.deltas[index]
        if self.scale is None:
            return values + delta
        # A Python float scale must not pass through float32 (torch's default).
        scale = torch.as_tensor(self.scale, dtype=values.dtype, device=values.device)
        return torch.addcmul(delta, values, scale)

    def powered_eigenvalues(self, index: int, exponent: float) -> Tensor:
        """``(scale·λ + δ)^exponent`` of block ``index``, refusing singular blocks.

        Args:
            index: Block index.
            exponent: Real exponent.

        Returns:
            Shape of the block's eigenvalues.

        Raises:
            ValueError: For a negative or fractional power of a singular block.
        """
        damped = self.damped_eigenvalues(index)
        if exponent == 1:
            return damped
        if exponent < 0 or exponent != int(exponent):
            self._check_positive(index, damped, f"a power {exponent:g}")
        return torch.pow(damped, exponent)

    def _check_positive(self, index: int, damped: Tensor, what: str) -> None:
        """Refuse ``what`` of a singular (or indefinite) block."""
        bad = int((damped <= 0).sum()) if not torch.isnan(damped).any() else -1
        if bad:
            detail = "NaN" if bad < 0 else f"{bad} non-positive"
            raise ValueError(
                f"Cannot compute {what} of a singular matrix: block {index} has "
                f"{detail} eigenvalue(s) (directions with zero curvature and zero "
                "delta). Use a positive prior precision (delta)."
            )

    def _low_rank(self, index: int) -> Tensor | None:
        """``V = U (scale·S)^{1/2}`` of a corrected block (``None`` otherwise)."""
        correction = self.corrections[index]
        if correction is None:
            return None
        U, S = correction
        # S is data: no gradient through sqrt(0); one pass over U.
        if self.scale is None:
            return U * S.sqrt()
        scale = torch.as_tensor(self.scale, dtype=U.dtype, device=U.device)
        return U * (S.sqrt() * scale.sqrt())

    def inverse_correction(self, index: int) -> Tensor | None:
        """``W`` with ``M_b⁻¹ = Q (Λ⁻¹ − W Wᵀ) Qᵀ`` of a corrected block (Woodbury).

        Args:
            index: Block index.

        Returns:
            ``(n_b, k)`` over the block's row-major eigenvalues, or ``None`` for a
            block without a correction.
        """
        if index in self._inverse_corrections:
            return self._inverse_corrections[index]
        V = self._low_rank(index)
        if V is None:
            return None
        lam = self.damped_eigenvalues(index).flatten()
        self._check_positive(index, lam, "the inverse")
        # Kept as (k, n): the predictive reads its columns laid out as the block.
        W = lowrank.whitened_inverse(lam, V).mT.contiguous().mT
        if not (torch.is_grad_enabled() and (W.requires_grad or lam.requires_grad)):
            self._inverse_corrections[index] = W  # the matrix does not change
        return W

    def _powered(self, index: int, rotated: Tensor, exponent: float) -> Tensor:
        """``M_b^exponent`` applied to rotated blocks ``(..., *shape)`` of ``index``.

        ``exponent = -0.5`` of a corrected block applies the sampling factor
        ``A`` (``A Aᵀ = M_b⁻¹``, :func:`~ekfac_laplace.lowrank.inverse_factor`).
        """
        V = self._low_rank(index)
        if V is None:
            return rotated * self.powered_eigenvalues(index, exponent)
        if exponent not in (1, -1, -0.5):
            raise ValueError(
                f"Block {index} has a low-rank correction: only the powers 1, -1 "
                f"and the sampling factor (-1/2) are exact, got {exponent:g}."
            )
        lam = self.damped_eigenvalues(index).flatten()
        if exponent < 0:
            self._check_positive(index, lam, f"a power {exponent:g}")
        rows = rotated.reshape(-1, lam.numel())  # in their own layout
        if exponent == 1:
            out = lowrank.matmul(lam, V, rows)
        elif exponent == -1:  # with the kept Woodbury factor
            W = self.inverse_correction(index)
            out = lowrank.whitened_inverse_matmul(lam, W, rows)
        else:
            basis, weights = self._sampling_factor(index, lam, V)
            out = lowrank.apply_inverse_factor(lam, basis, weights, rows)
        return out.reshape(rotated.shape)

    def _sampling_factor(
        self, index: int, lam: Tensor, V: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:func:`~ekfac_laplace.lowrank.inverse_factor` of a block, kept."""
        key = ("sampling", index)
        if key in self._inverse_corrections:
            return self._inverse_corrections[key]
        factor = lowrank.inverse_factor(lam, V)
        if not (torch.is_grad_enabled() and (lam.requires_grad or V.requires_grad)):
            self._inverse_corrections[key] = factor
        return factor

    def logdet(self) -> Tensor:
        r"""Log determinant ``Σ_b Σ_i log(λ_{b,i} + δ_b)``.

        Returns:
            Scalar tensor.

        Raises:
            ValueError: If the matrix is singular (a zero eigenvalue with zero delta).
        """
        scale = self.scale
        if isinstance(scale, (float, int)):
            scale = torch.as_tensor(scale, dtype=self.dtype, device=self.device)
        if any(values.requires_grad for values in self.eigenvalues):
            total: Tensor | int = 0
            for i in range(len(self)):
                damped = self.damped_eigenvalues(i)
                self._check_positive(i, damped, "the log determinant")
                total = total + torch.log(damped).sum()
            return total + self._capacitance_logdet()
        total, positive = _LogDet.apply(self.deltas, scale, *self.eigenvalues)
        if not bool(positive):  # one host sync; the blocks are named on failure
            for i in range(len(self)):
                self._check_positive(
                    i, self.damped_eigenvalues(i), "the log determinant"
                )
        return total + self._capacitance_logdet()

    def _capacitance_logdet(self) -> Tensor | int:
        """``Σ_b log det C_b`` of the corrected blocks (the determinant lemma)."""
        total: Tensor | int = 0
        for i in range(len(self)):
            V = self._low_rank(i)
            if V is not None:
                lam = self.damped_eigenvalues(i).flatten()
                total = total + lowrank.capacitance_logdet(lam, V)
        return total

    # -------------------------------------------------------------- rotations
    def _split(self, W: Tensor) -> list[Tensor]:
        """Split ``(..., P)`` into per-block ``(..., out[, in])`` views."""
        if W.shape[-1] != self.n_params:
            raise ValueError(
                f"Last dimension of W is {W.shape[-1]} but the matrix has "
                f"{self.n_params} parameters."
            )
        chunks = torch.split(W, self.block_sizes, dim=-1)
        return [
            chunk.reshape(*chunk.shape[:-1], *values.shape)
            for chunk, values in zip(chunks, self.eigenvalues)
        ]

    def _rotate_in(self, index: int, block: Tensor) -> Tensor:
        """``Q_G^T W Q_A`` (or ``Q_G^T w``) applied over leading batch dimensions."""
        basis = self.eigenvectors[index]
        if not basis:
            return block
        if len(basis) == 2:
            return basis[0].mT @ block @ basis[1]
        if basis[0].ndim == 3:  # one rotation per group
            return (block.unsqueeze(-2) @ basis[0]).squeeze(-2)
        return block @ basis[0]

    def _rotate_out(self, index: int, block: Tensor) -> Tensor:
        """``Q_G W Q_A^T`` (or ``Q_G w``): the inverse of :meth:`_rotate_in`."""
        basis = self.eigenvectors[index]
        if not basis:
            return block
        if len(basis) == 2:
            return basis[0] @ block @ basis[1].mT
        if basis[0].ndim == 3:
            return (block.unsqueeze(-2) @ basis[0].mT).squeeze(-2)
        return block @ basis[0].T

    def _join(self, blocks: list[Tensor], leading: torch.Size) -> Tensor:
        """Per-block ``(..., out[, in])`` back to ``(..., P)`` (also for no rows)."""
        return torch.cat([b.flatten(start_dim=len(leading)) for b in blocks], dim=-1)

    def _matmul(self, W: Tensor, exponent: float) -> Tensor:
        """``W M^exponent`` for ``W`` of shape ``(..., P)`` (``M`` is symmetric)."""
        blocks = self._split(W)
        out = [
            self._rotate_out(i, self._powered(i, self._rotate_in(i, block), exponent))
            for i, block in enumerate(blocks)
        ]
        return self._join(out, W.shape[:-1])

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """Multiply by a real power of the matrix: ``M^exponent w`` for each row ``w``.

        Args:
            W: Shape ``(P,)``, ``(B, P)`` or ``(B, K, P)``.
            exponent: Any real exponent (``1``, ``-1``, ``-1/2``, ``1/2`` are common).

        Returns:
            Tensor of the same shape as ``W``.

        Raises:
            ValueError: If ``W`` has another number of dimensions or a wrong width.
        """
        if W.ndim not in (1, 2, 3):
            raise ValueError(
                f"W must have shape (P,), (B, P) or (B, K, P), got {tuple(W.shape)}."
            )
        return self._matmul(W, exponent)

    def square_form(self, W: Tensor, exponent: float = 1) -> Tensor:
        """Batched quadratic form ``W M^exponent W^T`` without rotating back.

        Args:
            W: Shape ``(B, K, P)``.
            exponent: Real exponent of the matrix.

        Returns:
            Shape ``(B, K, K)``.
        """
        if W.ndim != 3:
            raise ValueError(f"W must have shape (B, K, P), got {tuple(W.shape)}.")
        result = W.new_zeros(W.shape[0], W.shape[1], W.shape[1])
        for i, block in enumerate(self._split(W)):
            rotated = self._rotate_in(i, block)
            scaled = self._powered(i, rotated, exponent).flatten(start_dim=2)
            result = result + scaled @ rotated.flatten(start_dim=2).transpose(1, 2)
        return result

    def inv_square_form(self, W: Tensor) -> Tensor:
        """``W M^{-1} W^T`` for ``W`` of shape ``(B, K, P)``; returns ``(B, K, K)``.

        Args:
            W: Shape ``(B, K, P)``, e.g. Jacobians.

        Returns:
            Shape ``(B, K, K)``.
        """
        return self.square_form(W, exponent=-1)

    def eigenbasis_matmul(self, Z: Tensor, exponent: float = -0.5) -> Tensor:
        r"""Map eigenbasis coordinates to parameters: ``Q diag((λ+δ)^exponent) z``.

        With ``z ~ N(0, I)`` and ``exponent = -1/2`` this draws from
        ``N(0, M^{-1})`` at the cost of one rotation per block (a corrected block
        applies its sampling factor ``A``, ``A Aᵀ = M_b⁻¹``, instead).

        Args:
            Z: Shape ``(..., P)``, coordinates in the eigenbasis (row-major per block).
            exponent: Real exponent.

        Returns:
            Shape ``(..., P)``.
        """
        blocks = self._split(Z)
        out = [
            self._rotate_out(i, self._powered(i, block, exponent))
            for i, block in enumerate(blocks)
        ]
        return self._join(out, Z.shape[:-1])

    def diag(self, exponent: float = 1) -> Tensor:
        """Diagonal of ``M^exponent``: ``(Q_G∘Q_G) (λ+δ)^p (Q_A∘Q_A)^T`` per block.

        Args:
            exponent: Real exponent.

        Returns:
            Shape ``(P,)``.
        """
        diagonals = []
        for i, basis in enumerate(self.eigenvectors):
            V = self._low_rank(i)
            if V is not None and exponent not in (1, -1):
                raise ValueError(
                    f"Block {i} has a low-rank correction: its diagonal is exact for "
                    f"the powers 1 and -1 only, got {exponent:g}."
                )
            powered = self.powered_eigenvalues(i, exponent)
            if not basis:
                diagonal = powered.flatten()
            elif len(basis) == 2:
                squared = basis[1].square().mT
                diagonal = (basis[0].square() @ powered @ squared).flatten()
            else:
                diagonal = (basis[0].square() @ powered.unsqueeze(-1)).flatten()
            if V is not None:
                diagonal = diagonal + self._low_rank_diagonal(i, V, exponent)
            diagonals.append(diagonal)
        return torch.cat(diagonals)

    def _low_rank_diagonal(self, index: int, V: Tensor, exponent: float) -> Tensor:
        """What a correction adds to the diagonal of ``M^{±1}``, in parameters.

        ``+ rowsum((Q V)²)`` for ``M``; for ``M⁻¹`` (Woodbury)
        ``− rowsum((Q Λ⁻¹ V L^{-T})²)`` with ``C = L Lᵀ``.
        """
        shape = self.eigenvalues[index].shape
        if V.shape[1] == 0:
            return V.new_zeros(V.shape[0])
        if exponent == -1:
            V = lowrank.whitened_inverse(self.damped_eigenvalues(index).flatten(), V)
        columns = self._rotate_out(index, V.mT.reshape(-1, *shape))
        term = columns.reshape(V.shape[1], -1).square().sum(0)
        return term if exponent == 1 else -term

    def to_matrix(
        self, exponent: float = 1, *, max_bytes: int | None = DENSE_LIMIT_BYTES
    ) -> Tensor:
        """Dense ``M^exponent`` of shape ``(P, P)``; for tests and small models only.

        Args:
            exponent: Real exponent.
            max_bytes: Refuse results larger than this (:data:`DENSE_LIMIT_BYTES`,
                2 GiB, by default); ``None`` for no limit.

        Returns:
            Shape ``(P, P)``.

        Raises:
            MemoryError: If the dense matrix would exceed ``max_bytes``.
        """
        check_dense_size(
            (self.n_params, self.n_params), self.dtype, "matrix", max_bytes
        )
        blocks = []
        for i, basis in enumerate(self.eigenvectors):
            if self.corrections[i] is not None:
                blocks.append(self._dense_corrected(i, exponent))
                continue
            if not basis:
                blocks.append(
                    torch.diag(self.powered_eigenvalues(i, exponent).flatten())
                )
                continue
            powered = self.powered_eigenvalues(i, exponent)
            stacked = basis[0].ndim == 3  # one basis per group
            for group in range(basis[0].shape[0] if stacked else 1):
                factors = [q[group] for q in basis] if stacked else list(basis)
                values = powered[group] if stacked else powered
                Q = torch.kron(*factors) if len(factors) == 2 else factors[0]
                blocks.append((Q * values.reshape(1, -1)) @ Q.T)
        return torch.block_diag(*blocks)

    def _dense_corrected(self, index: int, exponent: float) -> Tensor:
        """Dense ``M_b^exponent`` of a corrected block (its own ``eigh``)."""
        shape = self.eigenvalues[index].shape
        n = self.eigenvalues[index].numel()
        eye = torch.eye(n, dtype=self.dtype, device=self.device).reshape(n, *shape)
        inner = self._powered(index, eye, 1)  # rows M e_i: M, symmetric
        half = self._rotate_out(index, inner).reshape(n, n)  # rows Q M e_i: M Qᵀ
        rows = half.mT.reshape(n, *shape)  # rows of Q M
        dense = self._rotate_out(index, rows).reshape(n, n)  # Q M Qᵀ
        dense = (dense + dense.mT) / 2
        if exponent == 1:
            return dense
        values, vectors = torch.linalg.eigh(dense)
        if exponent < 0 or exponent != int(exponent):
            self._check_positive(index, values, f"a power {exponent:g}")
        return (vectors * values.pow(exponent)) @ vectors.mT
