"""Candidates of a comparison: the MAP, its peers, or a laplace-torch Laplace.

A candidate is written ``"map"``, a peer (``"map_ts"``, ``"ensemble<M>"``,
``"mc_dropout[:<p>]"``), or ``"<subset>_<structure>[:<backend>][@<prior tuning>]"``,
e.g. ``"all_ekfac"``, ``"ll_kron:mc"``, ``"all_ekfac@marglik"``,
``"all_ekfac+exact1000"`` (EKFAC with the exact block of every tensor of at most
1,000 entries: in the default MLP, its output weight; a ``Linear`` layer's bias block
is exact under EKFAC already); :meth:`Candidate.parse` reads it and
:meth:`Candidate.build` creates the (unfitted) Laplace object through
``laplace.Laplace``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from laplace import Laplace
from laplace.baselaplace import BaseLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from torch import nn

import ekfac_laplace.laplace  # noqa: F401  (registers hessian_structure="ekfac")

#: The Laplace candidates of a default comparison.
DEFAULT_LAPLACE = (
    "ll_kron",
    "ll_ekfac",
    "ll_full",
    "all_diag",
    "all_kron",
    "all_ekfac",
    "all_ekfac+exact1000",
)
#: The default comparison: the MAP, temperature scaling, and each Laplace
#: candidate twice, at the default prior and at the marginal-likelihood prior (the
#: robustness-oriented choice, ``@marglik``), the two rows sharing one fit.
DEFAULT_CANDIDATES = (
    "map",
    "map_ts",
    *(name for base in DEFAULT_LAPLACE for name in (base, f"{base}@marglik")),
)
#: The suffix of an EKFAC structure with exact blocks (``dense_blocks_up_to``).
EXACT_SUFFIX = "+exact"
#: The suffix of an EKFAC structure with a low-rank correction (``correction_rank``).
LOW_RANK_SUFFIX = "+lr"
SUBSETS = {"ll": "last_layer", "all": "all"}
#: How a prior precision is tuned (see ``EvaluationSettings.prior_tuning``).
PRIOR_TUNINGS = ("validation", "marglik", "gridsearch", "none")
#: The peers (non-Laplace predictives), by the spec that names them.
PEERS = {
    "map_ts": "the MAP with a temperature fitted on the validation set",
    "ensemble<M>": "a deep ensemble of M ≥ 2 networks (the MAP and M − 1 more)",
    "mc_dropout[:<p>]": "MC dropout of a network trained with dropout p (0.1)",
}
#: The dropout rate of ``"mc_dropout"``.
DEFAULT_DROPOUT = 0.1
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
    (``all_ekfac+exact500+lr8``). A Laplace candidate may name its prior tuning,
    ``all_ekfac@marglik``, overriding the comparison's; two candidates that differ
    only there share one fit. ``"map"`` is the network without Laplace; its peers
    are ``"map_ts"`` (temperature scaling), ``"ensemble<M>"`` (a deep ensemble of
    ``M ≥ 2`` networks, the MAP among them) and ``"mc_dropout"`` /
    ``"mc_dropout:<p>"`` (MC dropout of a network trained with dropout ``p``, 0.1
    by default); see :mod:`~ekfac_laplace.evaluation.peers`.

    Attributes:
        name: The spec it was parsed from, used as the row's name.
        subset_of_weights: ``"last_layer"`` or ``"all"``; ``None`` for the MAP and
            its peers.
        hessian_structure: laplace-torch Hessian structure; ``None`` for the MAP.
        backend: ``"ggn"``, ``"mc"`` or ``"ef"``; ``None`` for the MAP.
        dense_blocks_up_to: For ``ekfac+exact<n>``, ``n``; else 0.
        correction_rank: For ``ekfac+lr<k>``, ``k``; else 0.
        prior_tuning: The candidate's own prior tuning (``@<tuning>``), or ``None``
            for the comparison's.
        peer: ``"temperature"``, ``"ensemble"`` or ``"mc_dropout"`` for a peer.
        members: The ensemble's size.
        dropout: MC dropout's rate.
    """

    name: str
    subset_of_weights: str | None = None
    hessian_structure: str | None = None
    backend: str | None = None
    dense_blocks_up_to: int = 0
    correction_rank: int = 0
    prior_tuning: str | None = None
    peer: str | None = None
    members: int = 0
    dropout: float = 0.0

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
        peer = _parse_peer(spec)
        if peer is not None:
            return peer
        spec_without_tuning, at, tuning = spec.partition("@")
        if at and tuning not in PRIOR_TUNINGS:
            raise ValueError(
                f"Unknown prior tuning {tuning!r} in candidate {spec!r}; write "
                f"'<candidate>@<tuning>' with tuning in {PRIOR_TUNINGS}, e.g. "
                "'all_ekfac@marglik'."
            )
        head, colon, backend = spec_without_tuning.partition(":")
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
            tuning if at else None,
        )

    @property
    def is_map(self) -> bool:
        """Whether this is the MAP baseline (no Laplace approximation, no peer)."""
        return self.subset_of_weights is None and self.peer is None

    @property
    def is_peer(self) -> bool:
        """Whether this is a non-Laplace peer (temperature, ensemble, MC dropout)."""
        return self.peer is not None

    @property
    def is_laplace(self) -> bool:
        """Whether this is a Laplace approximation."""
        return self.subset_of_weights is not None

    @property
    def fit_name(self) -> str:
        """The name without its prior tuning: candidates sharing it share one fit."""
        return self.name.partition("@")[0]

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
        if not self.is_laplace:
            raise ValueError(
                f"The {self.name!r} candidate is not a Laplace approximation."
            )
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


def _parse_peer(spec: str) -> Candidate | None:
    """The peer candidate ``spec`` names, or ``None`` if it names none.

    Raises:
        ValueError: For a malformed ensemble size or dropout rate.
    """
    if spec == "map_ts":
        return Candidate(spec, peer="temperature")
    if spec.startswith("ensemble"):
        size = spec.removeprefix("ensemble")
        if not size.isdigit() or int(size) < 2:
            raise ValueError(
                f"Unknown candidate {spec!r}: a deep ensemble is written "
                "'ensemble<M>' with M ≥ 2 networks, e.g. 'ensemble5'."
            )
        return Candidate(spec, peer="ensemble", members=int(size))
    head, colon, rate = spec.partition(":")
    if head != "mc_dropout":
        return None
    try:
        dropout = float(rate) if colon else DEFAULT_DROPOUT
    except ValueError:
        dropout = math.nan
    if not 0 < dropout < 1:
        raise ValueError(
            f"Unknown candidate {spec!r}: MC dropout is written 'mc_dropout' (rate "
            f"{DEFAULT_DROPOUT}) or 'mc_dropout:<p>' with 0 < p < 1, e.g. "
            "'mc_dropout:0.2'."
        )
    return Candidate(spec, peer="mc_dropout", dropout=dropout)
