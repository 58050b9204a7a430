"""Candidates of a comparison: the MAP, or a laplace-torch Laplace approximation.

A candidate is written ``"map"`` or ``"<subset>_<structure>[:<backend>]"``, e.g.
``"all_ekfac"``, ``"ll_kron:mc"``, ``"all_ekfac+exact1000"`` (EKFAC with the exact
block of every tensor of at most 1,000 entries: in the default MLP, its output
weight; a ``Linear`` layer's bias block is exact under EKFAC already);
:meth:`Candidate.parse` reads it and
:meth:`Candidate.build` creates the (unfitted) Laplace object through
``laplace.Laplace``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from laplace import Laplace
from laplace.baselaplace import BaseLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from torch import nn

import ekfac_laplace.laplace  # noqa: F401  (registers hessian_structure="ekfac")

DEFAULT_CANDIDATES = (
    "map",
    "ll_kron",
    "ll_ekfac",
    "ll_full",
    "all_diag",
    "all_kron",
    "all_ekfac",
    "all_ekfac+exact1000",
)
#: The suffix of an EKFAC structure with exact blocks (``dense_blocks_up_to``).
EXACT_SUFFIX = "+exact"
#: The suffix of an EKFAC structure with a low-rank correction (``correction_rank``).
LOW_RANK_SUFFIX = "+lr"
SUBSETS = {"ll": "last_layer", "all": "all"}
STRUCTURES = ("diag", "kron", "ekfac", "full")
#: Structures laplace-torch names that cannot run here, and why.
UNAVAILABLE_STRUCTURES = {
    "lowrank": (
        "laplace-torch's low-rank Laplace (all weights only) needs the old "
        "asdfghjkl package from git, which laplace-torch 0.3 does not install"
    ),
}
BACKENDS = {
    "ggn": (CurvlinopsGGN, {}),
    "mc": (CurvlinopsGGN, {"stochastic": True}),
    "ef": (CurvlinopsEF, {}),
}


@dataclass(frozen=True)
class Candidate:
    """One Laplace approximation to compare, or the MAP baseline.

    Written as ``"<subset>_<structure>[:<backend>]"``: ``subset`` is ``ll`` (last
    layer) or ``all``; ``structure`` one of ``diag``, ``kron``, ``ekfac``, ``full``
    (laplace-torch's ``lowrank`` is not offered: it needs an old asdl from git);
    ``backend`` ``ggn`` (exact GGN, default), ``mc`` (Monte-Carlo Fisher) or ``ef``
    (empirical Fisher). ``ekfac+exact<n>`` is EKFAC with the exact block of every
    tensor of at most ``n`` entries (``dense_blocks_up_to=n``), ``ekfac+lr<k>``
    EKFAC with the rank-``k`` correction of every Kronecker block
    (``correction_rank=k``); both suffixes may be combined
    (``all_ekfac+exact500+lr8``). ``"map"`` is the network without Laplace.

    Attributes:
        name: The spec it was parsed from, used as the row's name.
        subset_of_weights: ``"last_layer"`` or ``"all"``; ``None`` for the MAP.
        hessian_structure: laplace-torch Hessian structure; ``None`` for the MAP.
        backend: ``"ggn"``, ``"mc"`` or ``"ef"``; ``None`` for the MAP.
        dense_blocks_up_to: For ``ekfac+exact<n>``, ``n``; else 0.
        correction_rank: For ``ekfac+lr<k>``, ``k``; else 0.
    """

    name: str
    subset_of_weights: str | None = None
    hessian_structure: str | None = None
    backend: str | None = None
    dense_blocks_up_to: int = 0
    correction_rank: int = 0

    @classmethod
    def parse(cls, spec: str) -> Candidate:
        """Parse ``"map"`` or ``"<subset>_<structure>[:<backend>]"``.

        Args:
            spec: The candidate, e.g. ``"all_ekfac"`` or ``"ll_kron:mc"``.

        Returns:
            The candidate.

        Raises:
            ValueError: If the spec does not name a known subset, structure, backend.
        """
        spec = spec.strip()
        if spec == "map":
            return cls("map")
        head, colon, backend = spec.partition(":")
        subset, _, structure = head.partition("_")
        backend = backend if colon else "ggn"
        structure, *suffixes = structure.split("+")
        numbers: dict[str, int] = {}
        for suffix in suffixes:
            match = re.fullmatch(r"(exact|lr)([1-9][0-9]*)", suffix)
            if structure != "ekfac" or match is None or match[1] in numbers:
                raise ValueError(
                    f"Unknown candidate {spec!r}: exact blocks and a low-rank "
                    f"correction are written '<subset>_ekfac{EXACT_SUFFIX}<n>' and "
                    f"'<subset>_ekfac{LOW_RANK_SUFFIX}<k>' with n, k ≥ 1, once each, "
                    f"e.g. 'all_ekfac{EXACT_SUFFIX}500{LOW_RANK_SUFFIX}8'."
                )
            numbers[match[1]] = int(match[2])
        if subset in SUBSETS and structure in UNAVAILABLE_STRUCTURES:
            raise ValueError(
                f"Candidate {spec!r} is not offered: "
                f"{UNAVAILABLE_STRUCTURES[structure]}. Offered structures: "
                f"{', '.join(STRUCTURES)}, e.g. 'all_ekfac' or 'll_full'."
            )
        if (
            subset not in SUBSETS
            or structure not in STRUCTURES
            or backend not in BACKENDS
        ):
            raise ValueError(
                f"Unknown candidate {spec!r}: write 'map' or "
                f"'<subset>_<structure>[:<backend>]' with subset in "
                f"{tuple(SUBSETS)}, structure in {STRUCTURES} and backend in "
                f"{tuple(BACKENDS)}, e.g. 'all_ekfac' or 'll_kron:mc'."
            )
        return cls(
            spec,
            SUBSETS[subset],
            structure,
            backend,
            numbers.get("exact", 0),
            numbers.get("lr", 0),
        )

    @property
    def is_map(self) -> bool:
        """Whether this is the MAP baseline (no Laplace approximation)."""
        return self.subset_of_weights is None

    def build(
        self, model: nn.Module, likelihood: str, *, sigma_noise: float = 1.0
    ) -> BaseLaplace:
        """Create the (unfitted) laplace-torch object for this candidate.

        Args:
            model: The MAP network.
            likelihood: ``"classification"`` or ``"regression"``.
            sigma_noise: Observation noise for regression.

        Returns:
            The Laplace approximation, ready for ``fit``.

        Raises:
            ValueError: For the MAP candidate, which has no Laplace object.
        """
        if self.is_map:
            raise ValueError("The MAP candidate has no Laplace approximation.")
        backend, backend_kwargs = BACKENDS[self.backend]
        options = {
            name: value
            for name, value in (
                ("dense_blocks_up_to", self.dense_blocks_up_to),
                ("correction_rank", self.correction_rank),
            )
            if value
        }
        return Laplace(
            model,
            likelihood,
            subset_of_weights=self.subset_of_weights,
            hessian_structure=self.hessian_structure,
            backend=backend,
            backend_kwargs=dict(backend_kwargs),
            sigma_noise=sigma_noise,
            **options,
        )
