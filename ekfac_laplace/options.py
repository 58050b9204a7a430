"""The options of an EKFAC fit, validated once and passed whole.

Ten settings decide how the EKFAC curvature is computed: which curvature
(``fisher_type``), how weight-sharing layers are factorised (``kfac_approx``), the
Monte-Carlo sampler (``mc_samples``, ``seed``, and ``mc_per_sequence`` for
token-level outputs), which engine computes it and how much
memory it may keep (``engine``, ``cache_budget_bytes``), what happens to parameters
KFAC cannot factorise (``unsupported_layers``), how large a Kronecker factor may be
(``max_factor_size``), and which small tensors keep their exact block
(``dense_blocks_up_to``). :class:`EKFACOptions` holds them as one frozen value:
built (and checked) once where a user passes them, handed whole to
:func:`ekfac_laplace.compute_ekfac` and the engines, and saved whole in a Laplace
object's ``state_dict``. The string choices are enums, as curvlinops' ``FisherType``
and ``KFACType``; plain strings are accepted and converted.

The dataclass is the one declaration of the options: a new option is a field and
its line in the class docstring. The Laplace constructors take every option but
``fisher_type`` (which the backend decides) as a keyword (:func:`taking_options`
gives them the signature and the help of each), :func:`option_keywords` lists
them, and :class:`OptionKeywords` types them for static checkers (a test keeps it
equal to the fields).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, TypedDict, TypeVar

#: Seed of the Monte-Carlo label sampler unless one is given (curvlinops' default).
DEFAULT_SEED = 2147483647
#: Bytes of first-pass results the fast engine may keep to skip its second pass
#: (projected from the first batch; see :mod:`ekfac_laplace.engine`).
DEFAULT_CACHE_BUDGET_BYTES = 256 * 2**20
#: The examples of each layer that a low-rank correction's sketch sees
#: (``correction_examples``; see :mod:`ekfac_laplace.sketch`).
DEFAULT_CORRECTION_EXAMPLES = 1024


class _Choice(str, Enum):
    """A string-valued choice that prints as its value."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, value: object, name: str) -> _Choice:
        """The member for ``value`` (a member or its string).

        Args:
            value: The value given by the user.
            name: The option's name, for the message.

        Returns:
            The enum member.

        Raises:
            ValueError: If ``value`` is not one of the choices.
        """
        try:
            return cls(value)
        except ValueError:
            choices = tuple(member.value for member in cls)
            raise ValueError(
                f"Unknown {name} {value!r}; choose one of {choices}."
            ) from None


class FisherType(_Choice):
    """Which curvature EKFAC approximates.

    ``TYPE2`` is the exact generalised Gauss-Newton (GGN), ``MC`` the Monte-Carlo
    Fisher (labels sampled from the model), ``EMPIRICAL`` the empirical Fisher.
    """

    TYPE2 = "type2"
    MC = "mc"
    EMPIRICAL = "empirical"


class KFACApprox(_Choice):
    """How weight-sharing layers (``Conv2d``) are factorised.

    ``EXPAND`` treats every position as an example, ``REDUCE`` sums the positions
    first (Eschenhagen et al., 2023, "Kronecker-Factored Approximate Curvature for
    Modern Neural Network Architectures").
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class Engine(_Choice):
    """Which implementation computes EKFAC: ours (``FAST``) or curvlinops'."""

    FAST = "fast"
    CURVLINOPS = "curvlinops"


class UnsupportedLayers(_Choice):
    """Parameters KFAC cannot factorise: a diagonal block, or an error."""

    DIAGONAL = "diagonal"
    RAISE = "raise"


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class EKFACOptions:
    """How the EKFAC curvature of a Laplace approximation is computed.

    Attributes:
        fisher_type: The curvature: exact GGN (``"type2"``, default), Monte-Carlo
            Fisher (``"mc"``) or empirical Fisher (``"empirical"``).
        kfac_approx: ``"expand"`` (default) or ``"reduce"``: how the positions
            that share a weight (a convolution's, a sequence's) enter the
            Kronecker factors.
        mc_samples: Labels drawn per example for the Monte-Carlo Fisher (``1``
            otherwise).
        seed: Seed of the Monte-Carlo label sampler; every pass draws the same labels,
            so fits are reproducible and independent of torch's global generator.
        engine: ``"fast"`` (default, ours) or ``"curvlinops"`` (curvlinops'
            ``EKFACLinearOperator``, the reference); both compute the same matrix.
        cache_budget_bytes: Bytes the fast engine may keep from its first pass to
            skip the second (``0``: always two passes): per layer and example,
            either its inputs and output gradients or, where fewer numbers (a
            convolution's many positions), its per-example gradients.
        unsupported_layers: ``"diagonal"`` (default): parameters of modules KFAC
            cannot factorise, and layers that fail the layer check, get the exact
            GGN / Fisher diagonal; ``"raise"``: refuse them.
        max_factor_size: Layers whose Kronecker factor would have more rows than
            this get their exact diagonal block instead; ``None`` (default):
            a factor over 2 GiB is refused before any work.
        dense_blocks_up_to: Parameter tensors with at most this many entries get
            their exact GGN / Fisher block (``n²`` numbers and an ``eigh`` each),
            from the same passes; ``0`` (default): none.
        mc_per_sequence: Token-level outputs with the Monte-Carlo Fisher only: one
            label drawn per token and one backward pass per sequence (per sample),
            the sequence the example of the eigenvalue correction, instead of one
            pass per token position (``T`` times fewer passes). Unbiased for the
            GGN and for its EKFAC eigenvalues in a given basis, as the per-token
            Monte-Carlo EKFAC is, but not equal to it: each square also holds the
            zero-mean products of one sequence's tokens, so its variance is larger.
            No effect on outputs ``(batch, outputs)``.
        correction_rank: Every Kronecker block also keeps the top-``k`` eigenpairs
            of its rotated curvature ``R = Qᵀ B Q`` beside the exact diagonal of
            the rest, ``Q (diag(R − U S Uᵀ) + U S Uᵀ) Qᵀ``
            (:mod:`ekfac_laplace.sketch`), found from a sketch of ``2k`` columns
            in the correction pass; ``0`` (default): plain EKFAC. Needs
            ``engine="fast"``.
        correction_examples: The examples (of each layer) whose rotated
            gradients the sketch sees, the first batches' (the diagonal always
            sees all); ``None``: every example (the sketch then costs ``2k``
            products of a layer's size per example).

    Raises:
        ValueError: For an unknown choice, a non-integer or out-of-range number, or
            ``mc_samples != 1`` or ``mc_per_sequence`` without
            ``fisher_type="mc"``.
    """

    fisher_type: FisherType = field(
        default=FisherType.TYPE2,
        metadata={"keyword": False},  # from the backend
    )
    kfac_approx: KFACApprox = KFACApprox.EXPAND
    mc_samples: int = 1
    seed: int = DEFAULT_SEED
    engine: Engine = Engine.FAST
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES
    unsupported_layers: UnsupportedLayers = UnsupportedLayers.DIAGONAL
    max_factor_size: int | None = None
    dense_blocks_up_to: int = 0
    mc_per_sequence: bool = False  # new fields after it: positional order kept
    correction_rank: int = 0
    correction_examples: int | None = DEFAULT_CORRECTION_EXAMPLES

    def __post_init__(self) -> None:
        parsed = {
            "unsupported_layers": UnsupportedLayers.parse(
                self.unsupported_layers, "unsupported_layers"
            ),
            "fisher_type": FisherType.parse(self.fisher_type, "fisher_type"),
            "kfac_approx": KFACApprox.parse(self.kfac_approx, "kfac_approx"),
            "engine": Engine.parse(self.engine, "engine"),
            "mc_samples": _check_int("mc_samples", self.mc_samples, 1),
            "cache_budget_bytes": _check_int(
                "cache_budget_bytes", self.cache_budget_bytes, 0
            ),
        }
        if self.max_factor_size is not None:
            _check_int("max_factor_size", self.max_factor_size, 1)
        _check_int("dense_blocks_up_to", self.dense_blocks_up_to, 0)
        _check_int("correction_rank", self.correction_rank, 0)
        if self.correction_examples is not None:
            _check_int("correction_examples", self.correction_examples, 1)
        if self.correction_rank and parsed["engine"] != Engine.FAST:
            raise ValueError(
                f"correction_rank={self.correction_rank} needs engine='fast': the "
                "low-rank correction is sketched in our engine's correction pass."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.mc_per_sequence, bool):
            raise ValueError(
                f"mc_per_sequence must be True or False, got {self.mc_per_sequence!r}."
            )
        if self.mc_per_sequence and parsed["fisher_type"] != FisherType.MC:
            raise ValueError(
                "mc_per_sequence=True only applies to the Monte-Carlo Fisher (with "
                "laplace-torch's backends backend_kwargs={'stochastic': True}): the "
                "exact GGN's and the empirical Fisher's vectors are not zero-mean, so "
                "summing a sequence's tokens in one pass would add their products."
            )
        if parsed["mc_samples"] != 1 and parsed["fisher_type"] != FisherType.MC:
            raise ValueError(
                f"mc_samples={self.mc_samples} only applies to fisher_type='mc'; "
                f"with fisher_type={str(parsed['fisher_type'])!r} use mc_samples=1."
            )
        for name, value in parsed.items():
            object.__setattr__(self, name, value)

    def to_state(self) -> tuple[tuple[str, str | int], ...]:
        """The options as ``(name, value)`` pairs of strings, integers and booleans.

        Returns:
            A tuple that ``torch.save`` stores without pickling any class.
        """
        return tuple(
            (field.name, value.value if isinstance(value, Enum) else value)
            for field in fields(self)
            for value in (getattr(self, field.name),)
        )

    @classmethod
    def from_state(
        cls, state: Sequence[tuple[str, Any]] | Mapping[str, Any]
    ) -> EKFACOptions:
        """Rebuild options saved by :meth:`to_state`, validating them.

        Args:
            state: ``(name, value)`` pairs (or a mapping).

        Returns:
            The options.

        Raises:
            ValueError: For unknown names or invalid values.
        """
        values = dict(state.items() if isinstance(state, Mapping) else state)
        if unknown := _unknown_names(values):
            raise ValueError(f"The saved EKFAC options have unknown names {unknown}.")
        return cls(**values)

    def replaced(self, **changes: Any) -> EKFACOptions:
        """These options with some changed, validated as new ones are.

        Args:
            **changes: Option names to their new values.

        Returns:
            New options.

        Raises:
            ValueError: For an unknown name or an invalid value.
        """
        if unknown := _unknown_names(changes):
            raise ValueError(
                f"Unknown EKFAC option(s) {unknown}; the options are "
                f"{[option.name for option in fields(self)]}."
            )
        return replace(self, **changes)


def _unknown_names(values: Mapping[str, Any]) -> list[str]:
    """The names in ``values`` that are not options, sorted."""
    return sorted(set(values) - {option.name for option in fields(EKFACOptions)})


class OptionKeywords(TypedDict, total=False):
    """The keyword options of the Laplace constructors, for static type checkers.

    The same names and types as the :class:`EKFACOptions` fields (but
    ``fisher_type``); ``tests/test_options.py`` keeps them equal. Used as
    ``**options: Unpack[OptionKeywords]`` so that editors complete them.
    """

    kfac_approx: KFACApprox | str
    mc_samples: int
    seed: int
    engine: Engine | str
    cache_budget_bytes: int
    unsupported_layers: UnsupportedLayers | str
    max_factor_size: int | None
    dense_blocks_up_to: int
    mc_per_sequence: bool
    correction_rank: int
    correction_examples: int | None


_CHOICES = ("fisher_type", "kfac_approx", "engine", "unsupported_layers")


def option_keywords() -> dict[str, Any]:
    """The options a Laplace constructor takes as keywords, with their defaults.

    Returns:
        Name to default (an enum's default as its string), in field order.
    """
    defaults = {}
    for option in fields(EKFACOptions):
        if option.metadata.get("keyword", True):
            default = option.default
            defaults[option.name] = (
                default.value if isinstance(default, Enum) else default
            )
    return defaults


def option_docs() -> dict[str, str]:
    """Each option's description, from the ``Attributes`` of :class:`EKFACOptions`.

    Returns:
        Name to its text (continuation lines joined).
    """
    section = (EKFACOptions.__doc__ or "").split("Attributes:", 1)[-1]
    section = section.split("Raises:", 1)[0]
    docs: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^ {8}(\w+): (.*)$", line)
        if match:
            name, text = match.groups()
            docs[name] = text
        elif name is not None and line.strip():
            docs[name] += " " + line.strip()
    return docs


Init = TypeVar("Init", bound=Callable[..., None])


def taking_options(init: Init) -> Init:
    """Give a Laplace constructor that takes ``**options`` the option keywords.

    The wrapped ``__init__`` refuses an unknown keyword as Python would
    (``TypeError``, with the closest option named), and shows each option of
    :func:`option_keywords` with its default in its signature (``help``, IDEs that
    inspect at run time) and its description in its docstring.

    Args:
        init: ``__init__(self, ..., **options)``.

    Returns:
        The wrapped ``__init__``.
    """
    signature = inspect.signature(init)
    named = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    defaults = option_keywords()
    types = {  # a choice also takes its string
        f.name: f"{f.type} | str" if f.name in _CHOICES else f.type
        for f in fields(EKFACOptions)
    }
    keywords = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=types[name]
        )
        for name, value in defaults.items()
    ]
    accepted = {p.name for p in named} | set(defaults)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [key for key in kwargs if key not in accepted]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(accepted), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{type(self).__name__}.__init__() got an unexpected keyword "
                f"argument {unknown[0]!r}{hint} Its EKFAC options are "
                f"{', '.join(defaults)}."
            )
        init(self, *args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*named, *keywords])
    docs = option_docs()
    lines = [f"    {name}: {docs.get(name, '')}" for name in defaults]
    wrapper.__doc__ = (
        (init.__doc__ or "")
        + "\n\nEKFAC options (keywords; see EKFACOptions):\n\n"
        + "\n".join(lines)
    )
    return wrapper  # type: ignore[return-value]
