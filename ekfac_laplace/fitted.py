"""The fitted layout: which block structure each parameter tensor got, as a value.

A fit decides, per parameter tensor of the posterior, its block structure
(:mod:`ekfac_laplace.structures`: Kronecker-factored, exact dense, diagonal), the kind
of layer or module that applies it, and the shapes of its eigenvalues and
eigenvectors. :class:`FittedLayout` keeps that decision. ``compute_ekfac`` returns it
with the factors, the posterior keeps it, ``state_dict`` saves it in a plain form
(strings, integers and lists: ``torch.load(..., weights_only=True)`` reads it), and
every consumer (the predictive, the state check, the structure selection, an online
fit) rebuilds the model's :class:`~ekfac_laplace.layout.ParameterLayout` from it
instead of guessing the structures from the eigenvectors' shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

#: The plain form's version (``FittedLayout.plain()["version"]``).
PLAIN_VERSION = 1


@dataclass(frozen=True)
class FittedBlock:
    """One parameter tensor's block, as the fit made it.

    Attributes:
        module: The name of the module that applies the parameter (the first use
            of a tied one).
        parameter: The parameter's name in that module.
        kind: The layer kind (:mod:`ekfac_laplace.kinds`) of a Kronecker or exact
            block of a layer, else the diagonal module kind
            (:mod:`ekfac_laplace.module_kinds`).
        structure: The block structure's registered name
            (:mod:`ekfac_laplace.structures`).
        values: The shape of its eigenvalues.
        bases: The shapes of its eigenvectors (``()`` for an identity basis).
        correction: For a Kronecker block with a low-rank correction
            (``correction_rank``, :mod:`ekfac_laplace.sketch`), the eigenpairs it
            keeps; ``0`` for none.
    """

    module: str
    parameter: str
    kind: str
    structure: str
    values: tuple[int, ...]
    bases: tuple[tuple[int, ...], ...] = ()
    correction: int = 0

    @property
    def qualified_name(self) -> str:
        """``module.parameter`` (the parameter alone for the model's own)."""
        return f"{self.module}.{self.parameter}" if self.module else self.parameter


@dataclass(frozen=True)
class FittedLayout:
    """Every block of a fitted posterior, in the order of the parameter vector.

    Attributes:
        blocks: One :class:`FittedBlock` per parameter tensor.
        batch_dims: Module name to the dimension of its tensors that holds the
            batch where it is not 0, as the fit found it; ``None`` where the fit did
            not look (one example per batch, the curvlinops engine): the predictive
            then finds it.
    """

    blocks: tuple[FittedBlock, ...]
    batch_dims: Mapping[str, int] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.blocks)

    def with_corrections(self, pairs: Mapping[int, int]) -> FittedLayout:
        """This layout with the low-rank corrections a posterior holds.

        Args:
            pairs: Block index to the eigenpairs its correction keeps (every
                other block gets none).

        Returns:
            A new layout.
        """
        blocks = tuple(
            replace(block, correction=pairs.get(index, 0))
            for index, block in enumerate(self.blocks)
        )
        return FittedLayout(blocks, self.batch_dims)

    def plain(self) -> list[Any]:
        """The layout as plain values, for a state.

        A list (laplace-torch's states hold lists, numbers, strings and tensors).

        Returns:
            ``[version, [[module, parameter, kind, structure, values, bases,
            correction], ...], batch_dims]``, ``batch_dims`` as
            ``[[module, dim], ...]`` or ``None`` (a state saved before the
            corrections has no ``correction``: none).
        """
        dims = self.batch_dims
        return [
            PLAIN_VERSION,
            [
                [
                    block.module,
                    block.parameter,
                    block.kind,
                    block.structure,
                    list(block.values),
                    [list(shape) for shape in block.bases],
                    block.correction,
                ]
                for block in self.blocks
            ],
            None if dims is None else [[name, dim] for name, dim in dims.items()],
        ]

    @classmethod
    def from_plain(cls, plain: Any) -> FittedLayout:
        """Read :meth:`plain`'s form back.

        Args:
            plain: What :meth:`plain` returned (after a save and load).

        Returns:
            The layout.

        Raises:
            ValueError: If it is not that form.
        """
        try:
            version, entries, dims = plain
            if version != PLAIN_VERSION:
                raise ValueError(f"version {version!r}")
            blocks = tuple(_block(entry) for entry in entries)
            batch_dims = None if dims is None else {str(k): _count(v) for k, v in dims}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(
                "The state's fitted layout ('ekfac_layout') is not the form that "
                f"state_dict() writes ({error}); the state is corrupt. Fit again."
            ) from None
        return cls(blocks, batch_dims)


def _block(entry: Sequence[Any]) -> FittedBlock:
    module, parameter, kind, structure, values, bases, *rest = entry
    if len(rest) > 1:
        raise ValueError(f"a block of {len(entry)} entries")
    for text in (module, parameter, kind, structure):
        if not isinstance(text, str):
            raise TypeError(f"a name {text!r} that is not a string")
    return FittedBlock(
        module,
        parameter,
        kind,
        structure,
        tuple(_count(n) for n in values),
        tuple(tuple(_count(n) for n in shape) for shape in bases),
        _count(rest[0]) if rest else 0,
    )


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"a size {value!r} that is not a non-negative integer")
    return value
