r"""The curvature of the loss in output space, in closed form for a whole batch.

Every curvature EKFAC approximates has the form ``Σ_n J_nᵀ Λ_n J_n`` with ``J_n`` the
Jacobian of the outputs of example ``n`` and ``Λ_n = Σ_k v_{n,k} v_{n,k}ᵀ`` a sum of
outer products of output-space vectors:

* exact GGN (``type2``): ``v_{n,k}`` the columns of a square root of the loss Hessian,
  for the summed MSE ``√2 e_c``; for cross-entropy ``Λ = diag(p) − p pᵀ`` has rank
  ``C − 1`` (the logits' common shift is in its null space), and its ``C − 1``
  vectors are ``√p ∘ u_j`` with ``u_j`` an orthonormal basis of ``√p``'s complement
  (below) — one backward pass fewer than the ``C`` columns ``√p_c (e_c − p)``;
* Monte-Carlo Fisher: ``v_{n,k} = ∇_f loss(f_n, ŷ_{n,k}) / √S`` for ``S`` labels
  ``ŷ`` drawn from the model's predictive;
* empirical Fisher: ``v_n = ∇_f loss(f_n, y_n)``.

Back-propagating the ``v_{n,k}`` through the network gives the per-example
(pseudo-)gradients that the Kronecker factors and the eigenvalue correction need.
"""

from __future__ import annotations

import math

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor
from torch.nn import functional as F

from ekfac_laplace.options import EKFACOptions, FisherType

#: The exact GGN's vectors of a batch larger than this (``B·C²`` numbers) are
#: refused (a vocabulary of 50,257 classes needs 10 GB per example in float32).
VECTORS_LIMIT_BYTES = 2**31


def loss_gradient(f: Tensor, y: Tensor, likelihood: Likelihood | str) -> Tensor:
    """Gradient of the summed torch loss w.r.t. the outputs, per example.

    Args:
        f: Outputs, shape ``(B, C)``.
        y: Class indices ``(B,)`` or probabilities ``(B, C)``; regression targets
            ``(B, C)``.
        likelihood: ``"classification"`` or ``"regression"``.

    Returns:
        Shape ``(B, C)``.
    """
    if likelihood == Likelihood.REGRESSION:
        return 2.0 * (f - y)
    if y.ndim == 1:
        return f.softmax(dim=1) - F.one_hot(y, f.shape[1]).to(f.dtype)
    return f.softmax(dim=1) - y


class OutputCurvature:
    """The output-space curvature of one batch, ``Λ_n = Σ_k v_{n,k} v_{n,k}ᵀ``.

    For the exact GGN of cross-entropy it is kept as the probabilities ``p`` (then
    ``Λ = diag(p) − p pᵀ``), so a layer whose output *is* the model output needs
    neither the ``C`` vectors nor any backward pass: its ``G = Σ_n Λ_n`` and its
    rotated squares ``Σ_k (Q_Gᵀ v_k)² = (Q_G∘Q_G)ᵀ p − (Q_Gᵀ p)²`` are closed-form.

    Args:
        f: Model outputs of the batch, shape ``(B, C)``.
        y: Targets of the batch.
        likelihood: ``"classification"`` or ``"regression"``.
        options: The EKFAC options (``fisher_type``, ``mc_samples``).
        generator: Random generator of the Monte-Carlo labels.
    """

    def __init__(
        self,
        f: Tensor,
        y: Tensor,
        likelihood: Likelihood | str,
        options: EKFACOptions,
        generator: torch.Generator,
    ) -> None:
        f = f.detach()
        self.probabilities: Tensor | None = None
        self._vectors: Tensor | None = None
        if options.fisher_type == FisherType.TYPE2:
            if likelihood == Likelihood.CLASSIFICATION:
                self.probabilities = f.softmax(dim=1)
            else:
                eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
                self._vectors = math.sqrt(2.0) * eye.expand(f.shape[0], -1, -1)
        elif options.fisher_type == FisherType.EMPIRICAL:
            self._vectors = loss_gradient(f, y, likelihood).unsqueeze(1)
        else:
            self._vectors = _sampled_gradients(
                f, likelihood, options.mc_samples, generator
            )

    def vectors(self) -> Tensor:
        """The vectors ``v`` to back-propagate.

        Returns:
            Shape ``(B, K, C)`` (for the exact GGN ``K = C``, and ``K = C − 1``
            for cross-entropy).

        Raises:
            MemoryError: For the exact GGN of so many classes that its ``B·C²``
                numbers exceed :data:`VECTORS_LIMIT_BYTES` (a language model's
                vocabulary), before they are built.
        """
        if self._vectors is None:
            p = self.probabilities
            rows, classes = p.shape
            nbytes = rows * classes * classes * p.element_size()
            if nbytes > VECTORS_LIMIT_BYTES:
                raise MemoryError(
                    f"The exact GGN of {classes} classes needs {classes - 1} "
                    f"vectors of {classes} entries per example ({nbytes / 2**30:.1f} "
                    f"GiB for the {rows} examples of this batch) and as many "
                    "backward passes, over the limit of "
                    f"{VECTORS_LIMIT_BYTES / 2**30:.0f} GiB. Use the Monte-Carlo "
                    "Fisher (backend_kwargs={'stochastic': True}: one sampled "
                    "label and one backward pass per example), or restrict the "
                    "model's outputs to the classes that matter."
                )
            return _softmax_root(p)
        return self._vectors

    def gradient_factor(self) -> Tensor:
        """``Σ_n Λ_n``: the gradient factor ``G`` of a layer that is the output.

        Returns:
            Shape ``(C, C)``.
        """
        if self.probabilities is not None:
            p = self.probabilities
            return torch.diag(p.sum(0)) - p.T @ p
        flat = self._vectors.reshape(-1, self._vectors.shape[-1])
        return flat.T @ flat

    def rotated_squares(self, q_g: Tensor) -> Tensor:
        """``Σ_k (Q_Gᵀ v_{n,k})²`` per example.

        Args:
            q_g: Eigenvectors of ``G``, shape ``(C, C)``.

        Returns:
            Shape ``(B, C)``.
        """
        if self.probabilities is not None:
            p = self.probabilities
            return p @ q_g.square() - (p @ q_g).square()
        return (self._vectors @ q_g).square().sum(1)

    def nbytes(self) -> int:
        """Memory held by this object.

        Returns:
            Bytes.
        """
        held = self.probabilities if self._vectors is None else self._vectors
        return held.numel() * held.element_size()


def _softmax_root(p: Tensor) -> Tensor:
    r"""``C − 1`` vectors ``v_j`` with ``Σ_j v_j v_jᵀ = diag(p) − p pᵀ``, per example.

    With ``q = √p`` (a unit vector), ``diag(p) − p pᵀ = D (I − q qᵀ) D`` for
    ``D = diag(q)``, and ``I − q qᵀ = U Uᵀ`` for any orthonormal basis ``U`` of
    ``q``'s complement. The Householder reflection ``R = I − w wᵀ / (1 + q_C)``,
    ``w = q + e_C``, maps ``e_C`` to ``−q``; being orthogonal, its other ``C − 1``
    columns are such a basis. ``1 + q_C ≥ 1``, so no cancellation can occur.

    Args:
        p: Probabilities ``(B, C)``.

    Returns:
        ``v_j = q ∘ R e_j`` for ``j < C``, shape ``(B, C − 1, C)``; for ``C = 1``
        the loss Hessian is zero and so is the one returned vector ``(B, 1, 1)``.
    """
    B, C = p.shape
    if C == 1:
        return torch.zeros_like(p).unsqueeze(1)
    q = p.sqrt()
    w = q.clone()
    w[:, -1] += 1.0
    eye = torch.eye(C - 1, C, dtype=p.dtype, device=p.device)
    # Row j of R restricted to j < C (R is symmetric): e_j − w_j w / (1 + q_C).
    scale = w[:, :-1] / (1.0 + q[:, -1:])  # (B, C − 1)
    basis = eye.unsqueeze(0) - scale.unsqueeze(2) * w.unsqueeze(1)
    return q.unsqueeze(1) * basis


def _sampled_gradients(
    f: Tensor, likelihood: Likelihood | str, mc_samples: int, generator: torch.Generator
) -> Tensor:
    """``(B, S, C)`` loss gradients at labels drawn from the model, over ``√S``."""
    samples = []
    for _ in range(mc_samples):
        if likelihood == Likelihood.REGRESSION:
            noise = torch.randn(
                f.shape, generator=generator, dtype=f.dtype, device=f.device
            )
            sampled = f + math.sqrt(0.5) * noise
        else:
            sampled = f.softmax(dim=1).multinomial(1, generator=generator).squeeze(1)
        samples.append(loss_gradient(f, sampled, likelihood))
    return torch.stack(samples, dim=1) / math.sqrt(mc_samples)
