r"""Choosing each parameter tensor's block within a memory budget.

A posterior's block for a parameter tensor of ``n`` entries can be *diagonal* (its
exact GGN / Fisher diagonal: ``n`` numbers), *EKFAC* (a Kronecker eigenbasis with
corrected eigenvalues: ``n + d_out² + d_in²``), *EKFAC with a low-rank correction*
(``lowrank``, offered when the object's options set a ``correction_rank`` ``k``:
EKFAC's and ``k (n + 1)``, :mod:`ekfac_laplace.sketch`) or *exact* (its exact
block, decomposed: ``n + n²``). With the prior fixed, the Laplace log evidence is a
sum over the blocks,

$$
    \log p(\mathcal D) = c - \tfrac12 \sum_b \log\det P_b ,
$$

and for each block the exact one has the smallest ``log det``: a diagonal block is
the diagonal of the exact block, an EKFAC block its diagonal in the Kronecker
eigenbasis, and Hadamard's inequality bounds a positive definite matrix's
determinant by the product of its diagonal in any orthonormal basis (a corrected
block, ``D + U S Uᵀ`` with the same diagonal as EKFAC's where ``R̂ ≼ R``, lies in
between: its ``log det`` is by the determinant lemma, exact). So the
evidence ranks the structures by how close they come to the exact block, and
choosing the blocks within a budget is a multiple-choice knapsack.
:func:`select_structures` scores each block under every structure it can have and
picks, exhaustively (every combination, for a few tensors) or greedily: every block
starts at its cheapest, and the upgrade with the largest gain per extra byte that
fits is taken until none fits or gains. On request it scores by validation NLL
instead: the GLM predictive variance is a sum of the blocks' terms as well, so every
combination's predictive comes from per-block terms computed once (the NLL itself is
not a sum, so greedy is a heuristic there).

A layer's weight and bias are chosen together, among the pairs that one fit could
give: both diagonal, both EKFAC (each with or without its correction), or either
exact with the other exact or diagonal (an EKFAC bias needs its layer's Kronecker
basis; an exact bias beside an EKFAC weight would be read back as an EKFAC one).

It fits three times, without changing the Laplace object until all succeed: EKFAC
(with the corrections, if the options ask for them: the same fit gives both), the
exact blocks of the tensors whose block fits the budget on its own, and every
tensor's diagonal. Its result is the object with the chosen blocks as ``H`` and a
table per tensor: size, structure, memory, evidence gain over its diagonal block and
what the other structures would have cost and gained.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor
from torch.utils.data import DataLoader

from ekfac_laplace import lowrank
from ekfac_laplace._compat import likelihood_scale
from ekfac_laplace.batches import batch_size, split_batch, to_device
from ekfac_laplace.fitted import FittedBlock, FittedLayout
from ekfac_laplace.layer import KroneckerLayer
from ekfac_laplace.layout import KRONECKER, ParameterLayout
from ekfac_laplace.matrix import EKFACDecomposed
from ekfac_laplace.posterior import EKFACPosterior
from ekfac_laplace.predictive import glm_predictive_variance
from ekfac_laplace.state import restored_on_failure

STRUCTURES = ("diagonal", "ekfac", "lowrank", "exact")
#: The report's name of each structure.
LABELS = {
    "diagonal": "diagonal",
    "ekfac": "EKFAC",
    "lowrank": "EKFAC + low rank",
    "exact": "exact",
}
CRITERIA = ("evidence", "val_nll")
SEARCHES = ("greedy", "exhaustive")
#: The most combinations an exhaustive search scores.
EXHAUSTIVE_LIMIT = 10**6
#: The most item options the greedy search's exchange step looks at (pairs of them).
EXCHANGE_LIMIT = 400
#: The (weight, bias) structures of a layer with both in the posterior.
LAYER_PAIRS = (
    ("diagonal", "diagonal"),
    ("ekfac", "ekfac"),
    ("lowrank", "lowrank"),
    ("lowrank", "ekfac"),
    ("ekfac", "lowrank"),
    ("diagonal", "exact"),
    ("exact", "diagonal"),
    ("exact", "exact"),
)


@dataclass
class BlockOption:
    """One structure one parameter tensor can have.

    Attributes:
        structure: ``"diagonal"``, ``"ekfac"``, ``"lowrank"`` or ``"exact"``.
        eigenvectors: Its basis (``()``, ``(Q_G, Q_A)``, ``(Q_G,)`` or ``(Q,)``).
        eigenvalues: Its eigenvalues (the curvature's, as ``H``; a corrected
            block's ``D``).
        numbers: How many numbers it stores (eigenvalues and eigenvectors, and a
            correction's ``U`` and ``S``; a factor shared by a weight and its bias
            is counted for each).
        log_det: ``log det`` of the block's posterior precision, prior included.
        fitted: Its block in the fitted layout of the fit it is from.
        correction: A corrected block's ``(U, S)``; ``None`` otherwise.
        diagonal: A corrected block's ``diag(R)`` (for online fits and states).
    """

    structure: str
    eigenvectors: tuple[Tensor, ...]
    eigenvalues: Tensor
    numbers: int
    log_det: float
    fitted: FittedBlock
    correction: tuple[Tensor, Tensor] | None = None
    diagonal: Tensor | None = None


@dataclass
class Item:
    """What is chosen at once: one tensor, or a layer's weight and bias.

    Attributes:
        indices: The block indices it covers.
        options: The combinations it can take, one option per index.
        variances: Per combination, its term of the validation predictive variance
            (``"val_nll"`` only).
    """

    indices: tuple[int, ...]
    options: list[tuple[BlockOption, ...]]
    variances: list[Tensor] | None = None

    def numbers(self, option: int) -> int:
        """How many numbers a combination stores."""
        return sum(block.numbers for block in self.options[option])

    def log_det(self, option: int) -> float:
        """Its ``log det``."""
        return sum(block.log_det for block in self.options[option])


@dataclass
class BlockChoice:
    """A row of the report: one tensor and what it got.

    Attributes:
        name: The parameter's name in the model.
        entries: Its number of entries.
        structure: The chosen structure.
        nbytes: The chosen block's memory.
        evidence_gain: Its log evidence over its diagonal block,
            ``-½ (log det P_b - log det P_b^diag)``.
        options: Every structure it could have: structure to ``(bytes, gain)``.
    """

    name: str
    entries: int
    structure: str
    nbytes: int
    evidence_gain: float
    options: dict[str, tuple[int, float]]


@dataclass
class StructureSelection:
    """The chosen blocks and the posterior that holds them.

    Attributes:
        laplace: The Laplace object, fitted, with the chosen blocks as ``H``.
        choices: One row per parameter tensor, in the order of the parameters.
        budget_bytes: The budget.
        criterion: ``"evidence"`` or ``"val_nll"``.
        search: ``"greedy"`` or ``"exhaustive"``.
        score: The chosen posterior's log evidence, or its validation NLL.
    """

    laplace: EKFACPosterior
    choices: list[BlockChoice]
    budget_bytes: int
    criterion: str
    search: str
    score: float

    @property
    def total_bytes(self) -> int:
        """The chosen blocks' memory."""
        return sum(choice.nbytes for choice in self.choices)

    @property
    def structures(self) -> dict[str, str]:
        """Parameter name to its chosen structure."""
        return {choice.name: choice.structure for choice in self.choices}

    def table(self) -> str:
        """The report as a Markdown table.

        Returns:
            One row per tensor: its size, the chosen structure, its memory and gain
            in log evidence over the diagonal block, then each structure's
            ``bytes / gain``; then the totals.
        """
        lines = [
            "| tensor | entries | structure | bytes | gain over diagonal | "
            + " | ".join(LABELS[s] for s in STRUCTURES)
            + " |",
            "|---|---:|---|---:|---:|" + "---|" * len(STRUCTURES),
        ]
        for choice in self.choices:
            cells = [
                (
                    f"{choice.options[s][0]} B / {choice.options[s][1]:.2f}"
                    if s in choice.options
                    else "—"
                )
                for s in STRUCTURES
            ]
            lines.append(
                f"| {choice.name} | {choice.entries} | {choice.structure} | "
                f"{choice.nbytes} | {choice.evidence_gain:.2f} | "
                + " | ".join(cells)
                + " |"
            )
        label = "log evidence" if self.criterion == "evidence" else "validation NLL"
        lines.append(
            f"| total | {sum(c.entries for c in self.choices)} | {self.search} | "
            f"{self.total_bytes} of {self.budget_bytes} | {label} {self.score:.4f} "
            "|" + " |" * len(STRUCTURES)
        )
        return "\n".join(lines)


def select_structures(
    laplace: EKFACPosterior,
    train_loader: DataLoader,
    budget_bytes: int,
    *,
    criterion: str = "evidence",
    val_loader: DataLoader | None = None,
    search: str = "greedy",
    progress_bar: bool = False,
) -> StructureSelection:
    """Fit ``laplace`` with diagonal, EKFAC or exact blocks chosen per tensor.

    Args:
        laplace: An EKFAC Laplace object (``hessian_structure="ekfac"``, all or last
            layer) with its prior precision, noise and options set; fitted or not.
            Its options must not set ``dense_blocks_up_to`` (the selection chooses
            the exact blocks).
        train_loader: The training data.
        budget_bytes: What the blocks may hold, counted in the curvature's dtype
            (eigenvalues and eigenvectors).
        criterion: ``"evidence"`` (the Laplace evidence with the object's prior)
            or ``"val_nll"`` (the NLL of the GLM predictive on ``val_loader``:
            probit for classification, Gaussian for regression).
        val_loader: The validation data, for ``"val_nll"``.
        search: ``"greedy"`` (best gain per byte first) or ``"exhaustive"``.
        progress_bar: Show a progress bar over each pass.

    Returns:
        The selection; ``laplace`` is fitted with the chosen blocks. A later
        ``laplace.fit(...)`` fits plain EKFAC again.

    Raises:
        ValueError: For an unknown criterion or search, ``"val_nll"`` without a
            validation loader or with an unsupported likelihood or feature
            reduction, ``dense_blocks_up_to`` set, a budget below the cheapest
            blocks, an exhaustive search over too many combinations, or what
            :meth:`~ekfac_laplace.EKFACPosterior.fit` refuses. ``laplace`` is then
            unchanged.
    """
    _check_arguments(laplace, criterion, val_loader, search)
    with restored_on_failure(laplace, laplace.model):
        laplace.fit(train_loader, progress_bar=progress_bar)
        ekfac = laplace.H
        itemsize = ekfac.eigenvalues[0].element_size()
        params = laplace.posterior_parameters
        entries = [p.numel() for p in params]
        exact_up_to = max(
            (n for n in entries if (n * n + n) * itemsize <= budget_bytes), default=0
        )
        fitted = laplace.fitted_layout
        fits = {"ekfac": (ekfac, fitted)}
        if exact_up_to:
            exact = laplace.curvature(
                train_loader,
                dense_blocks_up_to=exact_up_to,
                correction_rank=0,
                progress_bar=progress_bar,
            )
            fits["exact"] = (exact.to_decomposed(), exact.layout)
        diagonal = laplace.curvature(
            train_loader,
            diagonal_blocks=True,
            correction_rank=0,
            progress_bar=progress_bar,
        )
        fits["diagonal"] = (diagonal.to_decomposed(), diagonal.layout)
        layout = ParameterLayout.from_fitted(laplace.model, params, fitted)
        options = _block_options(laplace, layout, fits, exact_up_to)
        items = _items(layout, options)
        sizes = [
            [item.numbers(i) * itemsize for i in range(len(item.options))]
            for item in items
        ]
        cheapest = sum(min(options) for options in sizes)
        if cheapest > budget_bytes:
            raise ValueError(
                f"A budget of {budget_bytes} bytes does not hold even the cheapest "
                f"blocks ({cheapest} bytes); raise it, or leave tensors out of the "
                "posterior (requires_grad_(False), or the last layer)."
            )
        score = _scorer(laplace, items, criterion, val_loader)
        if search == "exhaustive":
            choice = _exhaustive(sizes, budget_bytes, score)
        else:
            choice = _greedy(sizes, budget_bytes, score)
        chosen: list[BlockOption] = [None] * len(params)  # type: ignore[list-item]
        for item, option in zip(items, choice):
            for index, block in zip(item.indices, item.options[option]):
                chosen[index] = block
        laplace.H = EKFACDecomposed(
            [block.eigenvectors for block in chosen],
            [block.eigenvalues for block in chosen],
            corrections=[block.correction for block in chosen],
        )
        laplace.correction_diagonals = {
            index: block.diagonal
            for index, block in enumerate(chosen)
            if block.correction is not None
        }
        laplace.fitted_layout = FittedLayout(
            tuple(block.fitted for block in chosen), fitted.batch_dims
        )
        if criterion == "evidence":
            final = float(laplace.log_marginal_likelihood())
        else:
            final = -score(choice)
    rows = _rows(laplace, options, chosen, itemsize)
    return StructureSelection(laplace, rows, budget_bytes, criterion, search, final)


def _check_arguments(
    laplace: EKFACPosterior,
    criterion: str,
    val_loader: DataLoader | None,
    search: str,
) -> None:
    """Refuse what the selection cannot do, before any fit."""
    if not isinstance(laplace, EKFACPosterior):
        raise ValueError(
            "select_structures needs an EKFAC Laplace object (hessian_structure="
            f"'ekfac'), got {type(laplace).__name__}."
        )
    if criterion not in CRITERIA or search not in SEARCHES:
        raise ValueError(
            f"criterion must be one of {CRITERIA} and search one of {SEARCHES}, got "
            f"{criterion!r} and {search!r}."
        )
    if laplace.options.dense_blocks_up_to:
        raise ValueError(
            "The selection chooses the exact blocks itself; construct the Laplace "
            "object without dense_blocks_up_to."
        )
    if criterion != "val_nll":
        return
    if val_loader is None:
        raise ValueError("criterion='val_nll' needs a val_loader.")
    if laplace.likelihood not in (Likelihood.CLASSIFICATION, Likelihood.REGRESSION):
        raise ValueError(
            "criterion='val_nll' scores classification or regression, got "
            f"{laplace.likelihood!r}; use criterion='evidence'."
        )
    if getattr(laplace.model, "feature_reduction", None) is not None:
        raise ValueError(
            "criterion='val_nll' does not support feature_reduction; use "
            "criterion='evidence'."
        )


def _block_options(
    laplace: EKFACPosterior,
    layout: ParameterLayout,
    fits: dict[str, tuple[EKFACDecomposed, FittedLayout]],
    exact_up_to: int,
) -> list[dict[str, BlockOption]]:
    """Per tensor, the structures it can have (by name), with their log det.

    A lone bias of a Kronecker layer gets no exact block: read back (state,
    online fits), its one basis would be taken for an EKFAC one.
    """
    params = laplace.posterior_parameters
    scale = float(likelihood_scale(laplace))
    priors = laplace.prior_precision.expand(len(params))
    ekfac, ekfac_layout = fits["ekfac"]
    options: list[dict[str, BlockOption]] = []
    for index, (param, owner) in enumerate(zip(params, layout.owners)):
        lone_bias = (
            isinstance(owner, KroneckerLayer)
            and index == owner.bias_index
            and owner.weight_index is None
        )
        kronecker = ekfac_layout.blocks[index].structure == KRONECKER
        offered = {
            "diagonal": True,
            "ekfac": kronecker,
            "lowrank": kronecker and ekfac.corrections[index] is not None,
            "exact": param.numel() <= exact_up_to and not lone_bias,
        }
        delta = float(priors[index])
        options.append({})
        for structure in STRUCTURES:
            if not offered[structure]:
                continue
            if structure in ("ekfac", "lowrank"):
                options[-1][structure] = _kronecker_option(
                    laplace, structure, index, scale, delta
                )
                continue
            fit, fitted = fits[structure]
            vectors = fit.eigenvectors[index]
            values = fit.eigenvalues[index]
            options[-1][structure] = BlockOption(
                structure,
                tuple(vectors),
                values,
                values.numel() + sum(q.numel() for q in vectors),
                float(torch.log(scale * values.double() + delta).sum()),
                fitted.blocks[index],
            )
    return options


def _kronecker_option(
    laplace: EKFACPosterior, structure: str, index: int, scale: float, delta: float
) -> BlockOption:
    """A Kronecker block of the object's fit, plain (``diag(R)``) or corrected."""
    H, block = laplace.H, laplace.fitted_layout.blocks[index]
    vectors = tuple(H.eigenvectors[index])
    stored = sum(q.numel() for q in vectors)
    correction = H.corrections[index]
    if correction is None or structure == "ekfac":
        values = laplace.correction_diagonals.get(index, H.eigenvalues[index])
        return BlockOption(
            "ekfac",
            vectors,
            values,
            values.numel() + stored,
            float(torch.log(scale * values.double() + delta).sum()),
            replace(block, correction=0),
        )
    U, S = correction
    values = H.eigenvalues[index]  # D
    lam = (scale * values + delta).flatten().double()
    V = U.double() * (scale * S.double()).sqrt()
    return BlockOption(
        "lowrank",
        vectors,
        values,
        values.numel() + stored + U.numel() + S.numel(),
        float(lowrank.logdet(lam, V)),
        block,
        correction,
        laplace.correction_diagonals[index],
    )


def _items(
    layout: ParameterLayout, options: list[dict[str, BlockOption]]
) -> list[Item]:
    """What is chosen at once: a layer's weight-and-bias pair, or one tensor."""
    items, paired = [], set()
    for layer in layout.layers:
        weight, bias = layer.weight_index, layer.bias_index
        if weight is not None and bias is not None:
            pairs = [
                (options[weight][w], options[bias][b])
                for w, b in LAYER_PAIRS
                if w in options[weight] and b in options[bias]
            ]
            items.append(Item((weight, bias), pairs))
            paired |= {weight, bias}
    items += [
        Item((index,), [(option,) for option in options[index].values()])
        for index in range(len(options))
        if index not in paired
    ]
    return sorted(items, key=lambda item: item.indices)


def _scorer(
    laplace: EKFACPosterior,
    items: list[Item],
    criterion: str,
    val_loader: DataLoader | None,
) -> Callable[[Sequence[int]], float]:
    """Higher is better: the evidence's varying part, or the negative NLL."""
    if criterion == "evidence":

        def evidence(choice: Sequence[int]) -> float:
            return -0.5 * sum(item.log_det(i) for item, i in zip(items, choice))

        return evidence
    f, y, inputs = _validation(laplace, val_loader)
    for item in items:
        item.variances = [
            _variance_term(laplace, item, option, inputs)
            for option in range(len(item.options))
        ]

    def negative_nll(choice: Sequence[int]) -> float:
        variance = sum(item.variances[i] for item, i in zip(items, choice))
        return -_nll(laplace, f, y, variance)

    return negative_nll


def _validation(
    laplace: EKFACPosterior, loader: DataLoader
) -> tuple[Tensor, Tensor, list]:
    """The validation outputs, targets and input batches, on the model's device."""
    device = laplace.mean.device
    outputs, targets, inputs = [], [], []
    with torch.no_grad():
        for batch in loader:
            X, y = split_batch(batch, laplace.dict_key_y)
            X = to_device(X, device)
            inputs.append(X)
            outputs.append(laplace.model(X))
            targets.append(y.to(device))
    return torch.cat(outputs), torch.cat(targets), inputs


def _variance_term(
    laplace: EKFACPosterior, item: Item, option: int, inputs: list
) -> Tensor:
    """One item's term of the GLM predictive variance, ``J_b P_b⁻¹ J_bᵀ``."""
    params = laplace.posterior_parameters
    blocks = item.options[option]
    priors = laplace.prior_precision.expand(len(params))
    precision = (
        EKFACDecomposed(
            [block.eigenvectors for block in blocks],
            [block.eigenvalues for block in blocks],
            corrections=[block.correction for block in blocks],
        )
        * likelihood_scale(laplace)
        + priors[list(item.indices)]
    )
    fitted = FittedLayout(
        tuple(block.fitted for block in blocks), laplace.fitted_layout.batch_dims
    )
    terms = [
        glm_predictive_variance(
            laplace.model,
            [params[index] for index in item.indices],
            precision,
            X,
            fitted,
            batch=batch_size(X, laplace.dict_key_x),
        )[1].detach()
        for X in inputs
    ]
    return torch.cat(terms)


def _nll(laplace: EKFACPosterior, f: Tensor, y: Tensor, variance: Tensor) -> float:
    """The mean validation NLL of the GLM predictive with this output covariance."""
    diagonal = torch.diagonal(variance, dim1=-2, dim2=-1)
    if laplace.likelihood == Likelihood.REGRESSION:
        total = diagonal + laplace.sigma_noise.square()
        target = y.reshape(f.shape)
        nll = 0.5 * ((target - f).square() / total + torch.log(2 * math.pi * total))
        return float(nll.sum(-1).mean())
    probit = f / torch.sqrt(1 + math.pi / 8 * diagonal)
    return float(torch.nn.functional.cross_entropy(probit, y.long()))


def _greedy(
    sizes: list[list[int]],
    budget: int,
    score: Callable[[Sequence[int]], float],
    exchange: bool = True,
) -> list[int]:
    """Cheapest first, then the best gain per extra byte that fits, repeatedly.

    With ``exchange``, :func:`_exchanged` improves the result.
    """
    choice = [min(range(len(s)), key=s.__getitem__) for s in sizes]
    used = sum(s[i] for s, i in zip(sizes, choice))
    current = score(choice)
    while True:
        best, best_rate = None, 0.0
        for item, options in enumerate(sizes):
            for option, nbytes in enumerate(options):
                extra = nbytes - options[choice[item]]
                if option == choice[item] or used + extra > budget:
                    continue
                trial = list(choice)
                trial[item] = option
                gain = score(trial) - current
                # a change that frees memory and gains is always taken first
                rate = math.inf if extra <= 0 else gain / extra
                if gain > 0 and rate > best_rate:
                    best, best_rate = (item, option, extra, gain), rate
        if best is None:
            return _exchanged(choice, sizes, budget, score) if exchange else choice
        item, option, extra, gain = best
        choice[item] = option
        used += extra
        current += gain


def _exchanged(
    choice: list[int],
    sizes: list[list[int]],
    budget: int,
    score: Callable[[Sequence[int]], float],
) -> list[int]:
    """Greedy's choice, improved by changing two items at once while that gains.

    Gain per byte can miss a large upgrade that pays only after a smaller one is
    undone; trading one item's memory for another's finds those. Only for up to
    :data:`EXCHANGE_LIMIT` item options (the search is quadratic in them).
    """
    moves = [(i, o) for i, options in enumerate(sizes) for o in range(len(options))]
    if len(moves) > EXCHANGE_LIMIT:
        return choice
    used = sum(s[i] for s, i in zip(sizes, choice))
    current = score(choice)
    while True:
        best, best_score = None, current
        for (i, a), (j, b) in itertools.combinations(moves, 2):
            if i == j or (choice[i] == a and choice[j] == b):
                continue
            extra = sizes[i][a] - sizes[i][choice[i]]
            extra += sizes[j][b] - sizes[j][choice[j]]
            if used + extra > budget:
                continue
            trial = list(choice)
            trial[i], trial[j] = a, b
            value = score(trial)
            if value > best_score + 1e-12 * abs(best_score):
                best, best_score = (trial, extra), value
        if best is None:
            return choice
        choice, extra = best
        used += extra
        current = best_score


def _exhaustive(
    sizes: list[list[int]], budget: int, score: Callable[[Sequence[int]], float]
) -> list[int]:
    """Every combination within the budget; the best."""
    total = math.prod(len(s) for s in sizes)
    if total > EXHAUSTIVE_LIMIT:
        raise ValueError(
            f"An exhaustive search would score {total} combinations (limit "
            f"{EXHAUSTIVE_LIMIT}); use search='greedy'."
        )
    best, best_score = None, -math.inf
    for choice in itertools.product(*(range(len(s)) for s in sizes)):
        if sum(s[i] for s, i in zip(sizes, choice)) > budget:
            continue
        value = score(choice)
        if value > best_score:
            best, best_score = list(choice), value
    assert best is not None  # the cheapest combination fits (checked)
    return best


def _rows(
    laplace: EKFACPosterior,
    options: list[dict[str, BlockOption]],
    chosen: list[BlockOption],
    itemsize: int,
) -> list[BlockChoice]:
    """The report's rows, in the order of the parameters."""
    names = {id(p): name for name, p in laplace.model.named_parameters()}
    rows = []
    for index, param in enumerate(laplace.posterior_parameters):
        diagonal = options[index]["diagonal"].log_det
        gains = {
            structure: (block.numbers * itemsize, -0.5 * (block.log_det - diagonal))
            for structure, block in options[index].items()
        }
        block = chosen[index]
        rows.append(
            BlockChoice(
                names.get(id(param), f"tensor {index}"),
                param.numel(),
                block.structure,
                block.numbers * itemsize,
                gains[block.structure][1],
                gains,
            )
        )
    return rows


__all__ = [
    "BlockChoice",
    "BlockOption",
    "StructureSelection",
    "select_structures",
]
