r"""What a block structure declares, and the registry.

Every parameter tensor ``θ_b`` of the posterior has one block ``P_b`` of the
precision, stored as an eigenbasis and eigenvalues, ``P_b = Q_b diag(λ_b + δ_b)
Q_bᵀ`` (:class:`~ekfac_laplace.matrix.EKFACDecomposed`: ``Q_b`` is ``()`` for the
identity, ``(Q,)`` or a Kronecker pair ``(Q_G, Q_A)``), so that multiplying,
inverting, taking the log determinant and sampling are the same operations for every
structure. A structure declares the rest:

* which tensors it claims (:meth:`BlockStructure.claims`, by ``priority``);
* what it accumulates over the data (:meth:`~BlockStructure.start`,
  :meth:`~BlockStructure.accumulate`): a *per-example* structure takes each
  example's (pseudo-)gradient rows ``j_{n,k}`` of its tensor, handed to it by the
  engine in the passes it makes anyway (from a Kronecker layer's ``a`` and ``g``, a
  diagonal module's replayed ``vjp``, or an output layer's curvature);
* how it is decomposed into ``(Q_b, λ_b)`` (:meth:`~BlockStructure.decompose`) and
  merged with more data in an online fit (:meth:`~BlockStructure.merged`);
* the shapes it is saved with (:meth:`~BlockStructure.shapes`); its name is saved in
  the fitted layout (:mod:`ekfac_laplace.fitted`);
* the GLM predictive takes its Jacobian rows ``J_b`` in its basis,
  ``Σ_i (J_b Q_b)_{n,c,i} (J_b Q_b)_{m,c',i} / (hλ_i + δ_b)``, for any basis of
  one matrix or none.

The Kronecker structure is fed by the layers' inputs and output gradients instead
(:mod:`ekfac_laplace.accumulators`), and the diagonal one by restricted rows (an
embedding's used rows) with a tied parameter's uses summed; both are registered
so that the fitted layout, the state check and the selection can name them.
Subclassing with a ``name`` registers a structure: a new per-example structure is
one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ekfac_laplace.options import EKFACOptions

#: Numbers per chunk of per-example gradients (rows × entries: 64 MiB in float32),
#: when a structure sums ``jᵀ j`` and when a module's are computed by ``vmap``.
CHUNK_NUMBERS = 2**24

_REGISTRY: list[BlockStructure] = []


class BlockStructure:
    """One block structure (subclass it, with a ``name``, to add one).

    Attributes:
        name: Its name in the fitted layout and in messages.
        priority: Against another structure claiming the same tensor (higher
            first).
        per_example: Whether it accumulates per-example gradient rows
            (:meth:`accumulate`); ``False`` for the Kronecker structure.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    per_example: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if any(other.name == cls.name for other in _REGISTRY):
                raise ValueError(f"A block structure {cls.name!r} is registered.")
            _REGISTRY.append(cls())
            _REGISTRY.sort(key=lambda structure: -structure.priority)

    def __repr__(self) -> str:
        return f"<block structure {self.name}>"

    def unregister(self) -> None:
        """Remove it from the registry (a test's structure)."""
        _REGISTRY.remove(self)

    def claims(self, param: Tensor, options: EKFACOptions) -> bool:
        """Whether this structure takes a tensor before the layer's own.

        Args:
            param: The parameter tensor.
            options: The fit's options.

        Returns:
            ``True`` to give the tensor this structure.
        """
        return False

    def shapes(self, param: Tensor) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """The shapes of its eigenvalues and eigenvectors for ``param``."""
        raise NotImplementedError

    def start(self, param: Tensor, dtype: torch.dtype) -> Tensor:
        """The zero of what it accumulates for ``param``.

        Args:
            param: The parameter tensor.
            dtype: The accumulation dtype.

        Returns:
            A tensor that :meth:`accumulate` updates in place.
        """
        raise NotImplementedError

    def accumulate(self, total: Tensor, rows: Tensor) -> None:
        """Add per-example gradient rows ``(R, n)`` to ``total``, in place."""
        raise NotImplementedError

    def decompose(
        self, total: Tensor, param: Tensor, description: str
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """The block's ``(Q_b, λ_b)`` from what it accumulated.

        Args:
            total: The accumulated tensor (summed over the ranks).
            param: The parameter tensor.
            description: What it is, for messages.

        Returns:
            The eigenbasis (``()``, or one matrix) and the eigenvalues.
        """
        raise NotImplementedError

    def merged(
        self,
        basis: Sequence[Tensor],
        values: Tensor,
        total: Tensor,
        param: Tensor,
        description: str,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """An online fit: the previous block plus what more data accumulated.

        Args:
            basis: The previous eigenbasis.
            values: The previous eigenvalues.
            total: The new data's accumulated tensor.
            param: The parameter tensor.
            description: What it is, for messages.

        Returns:
            The eigenbasis and eigenvalues of the sum.
        """
        raise NotImplementedError


def add_gram(total: Tensor, rows: Tensor) -> None:
    """``total += rowsᵀ rows``, in chunks of rows (a helper for structures).

    Args:
        total: ``(n, n)``, updated in place.
        rows: ``(R, n)``.
    """
    chunk = max(1, CHUNK_NUMBERS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        total.addmm_(part.T, part)


def structure_named(name: str) -> BlockStructure:
    """The registered structure of a name.

    Args:
        name: As saved in a fitted layout.

    Returns:
        The structure.

    Raises:
        ValueError: For a name no structure has.
    """
    for structure in _REGISTRY:
        if structure.name == name:
            return structure
    raise ValueError(
        f"No block structure is named {name!r} (registered: "
        f"{[s.name for s in _REGISTRY]}); a state that names one was saved with "
        "a structure this installation does not have."
    )


def claiming_structure(param: Tensor, options: EKFACOptions) -> BlockStructure | None:
    """The per-example structure that claims a tensor first, if any.

    Args:
        param: The parameter tensor.
        options: The fit's options.

    Returns:
        The structure, or ``None`` (the layer's Kronecker or a diagonal block).
    """
    return next((s for s in _REGISTRY if s.claims(param, options)), None)


def registered_structures() -> list[BlockStructure]:
    """Every registered structure, highest priority first."""
    return list(_REGISTRY)
