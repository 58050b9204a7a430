"""How the cost of an EKFAC Laplace approximation grows, phase by phase.

Five sweeps, each along one axis with everything else fixed (random inputs and
labels: the cost does not depend on them; one seed per point):

* ``n``: the number of training points N, MLP 784-512-512-10, all weights;
* ``width``: MLP 784-w-w-10 at N = 2,048, all weights;
* ``depth``: the number of hidden 512×512 layers, MLP 784-512-(512)×depth-10 at
  N = 2,048, all weights;
* ``classes``: MLP 64-512-C at N = 2,048, last layer only (its ``G`` factor is
  C×C);
* ``tokens``: the sequence length T of inputs ``(B, T, 256)``,
  ``Linear(256, 256)`` at every token, ReLU, the mean over tokens, a 10-class head,
  N = 256 sequences, all weights.

At every point four phases of :class:`~ekfac_laplace.EKFACLaplace` (or
``EKFACLLLaplace``) are timed, in this order on one object: ``fit``
(``la.fit(loader)``, the default exact GGN, loader batch 256 or 32 for sequences),
``glm`` (``la(X[:32], pred_type="glm", link_approx="probit")``), ``sample``
(``la.sample(100)``) and ``marglik``
(``la.optimize_prior_precision(method="marglik", n_steps=100)``), plus the
*floor* of the fit: one forward pass over the same loader and ``K`` backward passes
per batch (``K`` = the number of classes, as the exact GGN needs) of ``⟨f, v_k⟩``
to the output of every layer in the posterior, with no factor arithmetic — what
any type-2 KFAC pays before it computes anything (``v_k`` one-hot, the cheapest
direction, so this is a lower bound). For the last layer the only
such output is ``f`` itself, so the floor is the forward pass and ``K`` trivial
backward calls; our engine needs no backward pass there at all. On the
``tokens`` axis, ``products`` times the bare matrix products of an exact EKFAC fit
of the token layer (:func:`token_products`: the Gram matrices, the rotations and
the rotated per-example gradients, squared and summed, and the two
eigendecompositions, as bare torch calls): ``fit / (floor + products)`` is what
the engine costs beyond the arithmetic it cannot skip.

**Timing.** Each phase is called once (``cold``) with
:func:`timing.time_calls`; if that took under ``REPEAT_LIMIT_S`` it is called
again ``1``–``MAX_WARM`` times (as many as fit in ``REPEAT_LIMIT_S``) and the
median of those (``warm``) is reported, else the cold time is (marked
``cold`` in the JSON, ``*`` in the tables). The exponent ``p`` of
``seconds ∝ x^p`` is the least-squares slope over the measured points in log-log.

**Processes.** Each axis runs in one fresh worker process (:func:`timing.run_worker`,
threads pinned), its points in increasing size, every phase timed in that process
after the ones before it. In-process timing is enough here: a sweep asks how the
cost grows with ``x``, not how two contenders compare, and a point's cost at the
large end is seconds to minutes, far above what allocator or cache state carried
over from a smaller point can add. Fresh processes per point would
add the ~6 s import of torch, laplace-torch and curvlinops to each of ~27 points
(a quarter of the budget) and give every point's phases a cold process; one
process for all axes would let one axis's allocator state leak into the next.
Within an axis the process-wide one-time costs (imports, thread pools, first BLAS
calls) are paid by an untimed warm-up on a tiny problem before the first point,
so they do not inflate the smallest point (which would bias the exponent down);
each phase's cold call still includes that point's own first-touch allocations.
Peak memory is reset before every phase (:class:`PeakMemory`). ``--quick`` runs
every axis in this process at tiny sizes (a smoke test, seconds).

**What is left out at the large end** (to keep the full run near 12 minutes on
2 cores; estimated 7 minutes from single points run at smaller sizes):
``sample`` at width 4,096 (``100 × 4·4096³ ≈ 3·10¹³`` flops of eigenbasis
rotations, minutes, and 8 GiB per copy of the 100 × 20.5M samples) and at 10,000
classes (``100 × 2·10⁸·512 ≈ 10¹³`` flops, about a minute); ``glm`` at 10,000
classes (laplace-torch's predictive returns the full ``(32, C, C)`` output
covariance, and the Jacobian-free path holds ``(32, C, C)`` output Jacobians and
their rotation: 3 × 12 GiB). Those cells are ``skipped`` with the reason. Calls
whose cold call takes over ``REPEAT_LIMIT_S`` are timed cold only (expected on 2
cores: the fit at N = 16,384, at width 2,048 and 4,096 and at 10,000 classes,
sampling at width 1,024 and 2,048, marglik at width 4,096).

Usage::

    python benchmarks/scaling.py                    # all axes, ~7-12 min, 2 cores
    python benchmarks/scaling.py --axes n depth     # a subset
    python benchmarks/scaling.py --quick --out /tmp/s --plots /tmp/s

Writes ``<out>/scaling.json`` and ``<out>/scaling.md`` (defaults
``benchmarks/results``) and ``<plots>/scaling_<axis>.png`` (default
``docs/benchmarks``); ``--quick`` adds ``_quick`` to every name.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ekfac_laplace  # noqa: F401  (registers hessian_structure="ekfac")
from ekfac_laplace.accumulators import GRAM_LEAF_COLUMNS, add_upper_gram
from ekfac_laplace.evaluation.memory import PeakMemory  # noqa: F401  (before gc.freeze)

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import THREADS, pin_threads, run_worker, time_calls  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("fit", "glm", "sample", "marglik")
FLOOR = "floor"
PRODUCTS = "products"  # the tokens axis only (see token_products)
GLM_BATCH = 32
SAMPLES = 100
MARGLIK_STEPS = 100
# A phase whose cold call took longer than this is not repeated; a cheaper one is
# repeated as often as fits in this many seconds, at least once, at most MAX_WARM.
REPEAT_LIMIT_S = 4.0
MAX_WARM = 3


@dataclass
class Problem:
    """One point of a sweep: a model, its training data and how to fit it.

    Attributes:
        model: The network (eval mode).
        loader: The training data.
        inputs: The fixed predictive batch, ``X[:32]``.
        classes: The number of outputs ``K`` (backward passes per batch).
        subset: ``"all"`` or ``"last_layer"``.
        products: Where given, the bare matrix products of an exact EKFAC fit
            (:func:`token_products`), timed as a phase of its own.
    """

    model: nn.Module
    loader: DataLoader
    inputs: Tensor
    classes: int
    subset: str = "all"
    products: Callable[[], None] | None = None

    def floor_modules(self) -> list[nn.Module]:
        """The layers whose outputs a type-2 KFAC back-propagates to."""
        linear = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        return linear[-1:] if self.subset == "last_layer" else linear


@dataclass(frozen=True)
class Axis:
    """One sweep: the values of ``x``, how to build a point, what is skipped.

    Attributes:
        name: Short name (``n``, ``width``, ...), used in file names.
        label: The x-axis label.
        setting: What is held fixed, for the tables and plots.
        points: Values of ``x`` in the full run, increasing.
        quick_points: Values of ``x`` in ``--quick``.
        build: ``(x, quick) -> Problem``.
        skip: Phase to ``(largest x measured, reason)`` in the full run.
    """

    name: str
    label: str
    setting: str
    points: tuple[int, ...]
    quick_points: tuple[int, ...]
    build: Callable[[int, bool], Problem]
    skip: dict[str, tuple[int, str]] = field(default_factory=dict)


class TokenMean(nn.Module):
    """The mean over the token dimension: ``(B, T, d) -> (B, d)``."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x.mean(1)


def mlp(widths: list[int]) -> nn.Sequential:
    """An MLP with ReLU between ``nn.Linear`` layers of the given widths.

    Args:
        widths: Input, hidden and output widths.

    Returns:
        The network.
    """
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def classification(
    model: nn.Module,
    X: Tensor,
    classes: int,
    batch_size: int,
    subset: str = "all",
) -> Problem:
    """A problem on random labels.

    Args:
        model: The network.
        X: Inputs, shape ``(N, ...)``.
        classes: The number of classes.
        batch_size: The loader's batch size.
        subset: ``"all"`` or ``"last_layer"``.

    Returns:
        The problem.
    """
    y = torch.randint(0, classes, (len(X),))
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size)
    return Problem(model.eval(), loader, X[:GLM_BATCH], classes, subset)


def build_n(n_data: int, quick: bool) -> Problem:
    """MLP 784-512-512-10 on ``n_data`` points (32-32-32-10 in ``--quick``).

    Args:
        n_data: N.
        quick: Tiny sizes.

    Returns:
        The point.
    """
    inputs, width = (32, 32) if quick else (784, 512)
    model = mlp([inputs, width, width, 10])
    return classification(model, torch.randn(n_data, inputs), 10, 256)


def build_width(width: int, quick: bool) -> Problem:
    """MLP 784-w-w-10 on 2,048 points (32-w-w-10 on 64 in ``--quick``).

    Args:
        width: w.
        quick: Tiny sizes.

    Returns:
        The point.
    """
    inputs, n_data = (32, 64) if quick else (784, 2048)
    model = mlp([inputs, width, width, 10])
    return classification(model, torch.randn(n_data, inputs), 10, 256)


def build_depth(depth: int, quick: bool) -> Problem:
    """MLP 784-512-(512)×depth-10 on 2,048 points (32-16-… on 64 in ``--quick``).

    Args:
        depth: The number of hidden ``512 × 512`` layers.
        quick: Tiny sizes.

    Returns:
        The point.
    """
    inputs, width, n_data = (32, 16, 64) if quick else (784, 512, 2048)
    model = mlp([inputs, *[width] * (depth + 1), 10])
    return classification(model, torch.randn(n_data, inputs), 10, 256)


def build_classes(classes: int, quick: bool) -> Problem:
    """MLP 64-512-C on 2,048 points, last layer (width 16, 64 in ``--quick``).

    Args:
        classes: C.
        quick: Tiny sizes.

    Returns:
        The point.
    """
    width, n_data = (16, 64) if quick else (512, 2048)
    model = mlp([64, width, classes])
    X = torch.randn(n_data, 64)
    return classification(model, X, classes, 256, subset="last_layer")


def build_tokens(tokens: int, quick: bool) -> Problem:
    """Linear(d, d) per token, ReLU, mean, Linear(d, 10); N = 256, d = 256.

    Args:
        tokens: T; the inputs are ``(N, T, d)`` (d = 8, N = 16 in ``--quick``).
        quick: Tiny sizes.

    Returns:
        The point.
    """
    width, n_data, batch = (8, 16, 8) if quick else (256, 256, 32)
    model = nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), TokenMean(), nn.Linear(width, 10)
    )
    problem = classification(model, torch.randn(n_data, tokens, width), 10, batch)
    problem.products = token_products(batch, tokens, width, 10 - 1, n_data // batch)
    return problem


def token_products(
    batch: int, tokens: int, width: int, passes: int, batches: int
) -> Callable[[], None]:
    """The bare matrix products of an exact EKFAC fit of a token-level layer.

    The three groups of :func:`token_product_groups`, then the two ``d × d``
    eigendecompositions. This is the arithmetic any exact implementation does
    beyond the forward and backward passes (about ``3K + 2`` times the forward
    pass's), so ``fit − floor − products`` is what the engine adds around it.

    Args:
        batch: ``B``.
        tokens: ``T``.
        width: ``d``.
        passes: ``K``.
        batches: Batches in the data set.

    Returns:
        A call that runs them once over the data set.
    """
    groups = token_product_groups(batch, tokens, width, passes, batches)
    rows = torch.randn(
        batch * tokens, width, generator=torch.Generator().manual_seed(1)
    )
    factor = rows.T @ rows  # whole, as the engine mirrors its sums before eigh

    def run() -> None:
        for action, _ in groups.values():
            action()
        for _ in range(2):
            torch.linalg.eigh(factor)

    return run


def token_product_groups(
    batch: int, tokens: int, width: int, passes: int, batches: int
) -> dict[str, tuple[Callable[[], None], float]]:
    """The products of :func:`token_products` in three groups, with their flops.

    Per batch of ``B`` sequences of ``T`` tokens, for ``Linear(d, d)`` and ``K``
    backward passes (``C − 1`` for the exact GGN of ``C`` classes), plain torch
    calls on tensors made beforehand:

    * ``grams``: the Gram matrices ``A`` (``B T d²`` multiply-adds) and ``G``
      (``K B T d²``), their upper triangles as the engine sums them
      (:func:`~ekfac_laplace.accumulators.add_upper_gram`: ``¾`` of that at
      ``d = 256``);
    * ``rotations``: the inputs into the eigenbasis (``B T d²``) and, for
      ``T < d``, the ``K`` gradients too (``K B T d²``);
    * ``per_example``: per pass, the rotated per-example gradients
      ``Q_Gᵀ (Σ_t g_t a_tᵀ) Q_A`` squared and summed, in the cheaper order: from
      the rotated gradients for ``T < d`` (``K B T d²``), else the product
      rotated after (``K B (T d² + d³)``).

    Args:
        batch: ``B``.
        tokens: ``T``.
        width: ``d``.
        passes: ``K``.
        batches: Batches in the data set.

    Returns:
        Group name to a call that runs it once over the data set, and its flops.
    """
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, tokens, width, generator=generator)
    gradients = torch.randn(passes, batch, tokens, width, generator=generator)
    basis = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    rotate_first = tokens < width
    rotated_inputs = inputs @ basis
    ready = [g @ basis for g in gradients] if rotate_first else list(gradients)

    def grams() -> None:
        factors = [inputs.new_zeros(width, width) for _ in range(2)]
        for _ in range(batches):
            add_upper_gram(factors[0], inputs.reshape(-1, width))
            for g in gradients:
                add_upper_gram(factors[1], g.reshape(-1, width))

    def rotations() -> None:
        for _ in range(batches):
            inputs @ basis
            if rotate_first:
                for g in gradients:
                    g @ basis

    def per_example() -> None:
        squares = inputs.new_zeros(width, width)
        for _ in range(batches):
            for g in ready:
                product = torch.bmm(g.transpose(1, 2), rotated_inputs)
                if not rotate_first:
                    product = basis.T @ product
                squares += product.square_().sum(0)

    unit = 2 * batches * batch * tokens * width**2  # flops of one B T d² product
    leaves = max(1, -(-width // GRAM_LEAF_COLUMNS))  # halved down to the leaves
    upper = (leaves + 1) / (2 * leaves)
    after = 0 if rotate_first else 2 * batches * batch * width**3
    return {
        "grams": (grams, upper * (1 + passes) * unit),
        "rotations": (rotations, (1 + (passes if rotate_first else 0)) * unit),
        "per_example": (per_example, passes * (unit + after)),
    }


AXES: dict[str, Axis] = {
    axis.name: axis
    for axis in (
        Axis(
            "n",
            "training points N",
            "MLP 784-512-512-10, all weights",
            (1024, 2048, 4096, 8192, 16384),
            (64, 128, 256),
            build_n,
        ),
        Axis(
            "width",
            "hidden width w",
            "MLP 784-w-w-10, N = 2048, all weights",
            (256, 512, 1024, 2048, 4096),
            (8, 16, 32),
            build_width,
            {"sample": (2048, "100 samples rotate 4096² blocks: ~3·10¹³ flops, 8 GiB")},
        ),
        Axis(
            "depth",
            "hidden 512×512 layers",
            "MLP 784-512-(512)×depth-10, N = 2048, all weights",
            (1, 2, 3, 4, 6, 8),
            (1, 2, 4),
            build_depth,
        ),
        Axis(
            "classes",
            "classes C",
            "MLP 64-512-C, N = 2048, last layer",
            (10, 100, 1000, 10000),
            (4, 16, 64),
            build_classes,
            {
                "glm": (1000, "(32, C, C) output Jacobians and covariance: 3 × 12 GiB"),
                "sample": (1000, "100 samples rotate a C×C basis: ~10¹³ flops"),
            },
        ),
        Axis(
            "tokens",
            "tokens T",
            "(B, T, 256) → Linear(256, 256), ReLU, mean over T, Linear(256, 10); "
            "N = 256 sequences, all weights",
            (16, 32, 64, 128, 256, 512),
            (4, 8, 16),
            build_tokens,
        ),
    )
}


def laplace_of(problem: Problem) -> Any:
    """Our EKFAC Laplace approximation of a point (the default exact GGN backend).

    Args:
        problem: The point.

    Returns:
        An unfitted ``EKFACLaplace`` or ``EKFACLLLaplace``.
    """
    return Laplace(
        problem.model,
        "classification",
        subset_of_weights=problem.subset,
        hessian_structure="ekfac",
    )


def floor_pass(problem: Problem) -> None:
    """One forward and ``K`` backward passes per batch to every layer output.

    Args:
        problem: The point; its ``floor_modules`` are the layers.
    """
    outputs: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        outputs.append(output)

    handles = [m.register_forward_hook(keep) for m in problem.floor_modules()]
    try:
        for X, _ in problem.loader:
            outputs.clear()
            f = problem.model(X)
            for k in range(problem.classes):
                direction = f.new_zeros(f.shape[-1])
                direction[k] = 1.0  # the cheapest v_k: one output for every example
                torch.autograd.grad(
                    f,
                    outputs,
                    grad_outputs=direction.expand_as(f),
                    retain_graph=k < problem.classes - 1,
                )
    finally:
        for handle in handles:
            handle.remove()


def measure_phase(action: Callable[[], Any], quick: bool) -> dict[str, Any]:
    """Time ``action``: one cold call, then warm calls if the cold one was short.

    Args:
        action: The phase.
        quick: One warm call at most (smoke test).

    Returns:
        ``seconds`` (warm, or cold where not repeated), ``basis`` (``"warm"`` /
        ``"cold"``), ``cold``, ``warm``, every call's seconds, and the peak memory
        and its growth in MiB over all calls.
    """
    first = time_calls(action, 0)
    cold = first["cold"]
    repeats = 0
    if cold < REPEAT_LIMIT_S:
        repeats = min(MAX_WARM, max(1, int(REPEAT_LIMIT_S / max(cold, 1e-9))))
        repeats = min(repeats, 1) if quick else repeats
    result = {
        "seconds": cold,
        "basis": "cold",
        "cold": cold,
        "warm": None,
        "calls": first["calls"],
        "peak_mib": first["peak_mib"],
        "growth_mib": first["growth_mib"],
    }
    if repeats:
        later = time_calls(action, repeats - 1)
        warm = statistics.median(later["calls"])
        result.update(seconds=warm, basis="warm", warm=warm)
        result["calls"] = first["calls"] + later["calls"]
        for key in ("peak_mib", "growth_mib"):
            values = [v for v in (first[key], later[key]) if v is not None]
            result[key] = max(values) if values else None
    return result


def measure_point(axis: Axis, x: int, quick: bool) -> dict[str, Any]:
    """The four phases and the floor at one point of a sweep.

    Args:
        axis: The sweep.
        x: The point.
        quick: Tiny sizes.

    Returns:
        ``x``, ``n_params`` and per phase a :func:`measure_phase` result,
        ``{"skipped": reason}`` or ``{"error": message}``.
    """
    torch.manual_seed(0)
    problem = axis.build(x, quick)
    la = laplace_of(problem)
    generator = torch.Generator().manual_seed(0)
    actions: dict[str, Callable[[], Any]] = {
        "fit": lambda: la.fit(problem.loader),
        "glm": lambda: la(problem.inputs, pred_type="glm", link_approx="probit"),
        "sample": lambda: la.sample(SAMPLES, generator=generator),
        "marglik": lambda: la.optimize_prior_precision(
            method="marglik", n_steps=MARGLIK_STEPS
        ),
        FLOOR: lambda: floor_pass(problem),
    }
    if problem.products is not None:
        actions[PRODUCTS] = problem.products
    point: dict[str, Any] = {"x": x}
    for phase in actions:
        limit = None if quick else axis.skip.get(phase)
        if limit is not None and x > limit[0]:
            point[phase] = {"skipped": limit[1]}
        elif phase in PHASES and phase != "fit" and "error" in point["fit"]:
            point[phase] = {"skipped": "the fit failed"}
        else:
            try:
                point[phase] = measure_phase(actions[phase], quick)
            except Exception as error:  # a refusal is a result, not a crash
                point[phase] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{axis.name}={x} {phase}: {_cell(point[phase])}", file=sys.stderr)
    point["n_params"] = int(la.n_params) if "error" not in point["fit"] else None
    point["floor_backward_passes"] = problem.classes
    return point


def exponent(xs: list[float], seconds: list[float]) -> float | None:
    """The least-squares slope ``p`` of ``log seconds = p log x + c``.

    Args:
        xs: Points.
        seconds: Their times.

    Returns:
        ``p``, or ``None`` with fewer than two points.
    """
    if len(xs) < 2:
        return None
    u = [math.log(x) for x in xs]
    v = [math.log(max(s, 1e-12)) for s in seconds]
    u_mean, v_mean = sum(u) / len(u), sum(v) / len(v)
    spread = sum((a - u_mean) ** 2 for a in u)
    return sum((a - u_mean) * (b - v_mean) for a, b in zip(u, v)) / spread


def series(points: list[dict[str, Any]], phase: str) -> tuple[list[int], list[float]]:
    """The measured ``(x, seconds)`` of one phase along a sweep.

    Args:
        points: From :func:`measure_point`.
        phase: A phase or ``"floor"``.

    Returns:
        The points where the phase was measured, and its seconds there.
    """
    measured = [p for p in points if "seconds" in p.get(phase, {})]
    return [p["x"] for p in measured], [p[phase]["seconds"] for p in measured]


def run_axis(name: str, quick: bool) -> dict[str, Any]:
    """Every point of one sweep in this process, with the exponents.

    Args:
        name: The axis.
        quick: Tiny sizes.

    Returns:
        ``axis``, ``label``, ``setting``, ``points`` and ``exponents`` per phase.
    """
    axis = AXES[name]
    if not quick:  # pay the process's one-time costs before the first point
        warm_up = axis.build(axis.quick_points[0], True)
        la = laplace_of(warm_up)
        la.fit(warm_up.loader)
        la(warm_up.inputs, pred_type="glm", link_approx="probit")
        la.sample(2)
        la.optimize_prior_precision(method="marglik", n_steps=2)
        floor_pass(warm_up)
    # PeakMemory collects garbage before every phase: with torch, laplace-torch and
    # curvlinops loaded (imported above, so frozen here) a full collection takes
    # ~0.2 s. Frozen objects are skipped.
    gc.freeze()
    try:
        points = [
            measure_point(axis, x, quick)
            for x in (axis.quick_points if quick else axis.points)
        ]
    finally:
        gc.unfreeze()
    return {
        "axis": name,
        "label": axis.label,
        "setting": axis.setting + (" (--quick: tiny sizes)" if quick else ""),
        "points": points,
        "exponents": {
            phase: exponent(*series(points, phase))
            for phase in (*PHASES, FLOOR, PRODUCTS)
            if any(phase in point for point in points)
        },
    }


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    """A worker process's job: one axis, with pinned threads.

    Args:
        payload: ``{"axis": name, "quick": bool, "threads": int}``.

    Returns:
        :func:`run_axis`'s result.
    """
    pin_threads(payload["threads"])
    return run_axis(payload["axis"], payload["quick"])


def _cell(entry: dict[str, Any]) -> str:
    """A table cell: seconds (``*`` if cold only), ``skipped`` or ``error``."""
    if "seconds" in entry:
        star = "*" if entry["basis"] == "cold" else ""
        return f"{entry['seconds']:.3g}{star}"
    if "skipped" in entry:
        return "skipped"
    return "error"


def _ratio(entry: dict[str, Any], parts: list[dict[str, Any]]) -> str:
    """``entry``'s seconds over the sum of ``parts``' seconds, or ``–``."""
    if "seconds" not in entry or any("seconds" not in part for part in parts):
        return "–"
    total = sum(part["seconds"] for part in parts)
    return f"{entry['seconds'] / total:.2f}" if total > 0 else "–"


def _exponent_cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(results: dict[str, dict[str, Any]], threads: int) -> str:
    """One table per axis: seconds per phase and the floor, and the exponents.

    Args:
        results: Axis name to :func:`run_axis`'s result (or ``{"error": ...}``).
        threads: The threads each worker ran with.

    Returns:
        The markdown.
    """
    lines = [
        f"Seconds per call ({threads} thread{'s' * (threads != 1)}; the median of "
        "warm calls, `*` the cold call only); *floor*: forward + K backward passes "
        "to every layer output; *p*: the slope of log seconds against log x.",
    ]
    notes: list[str] = []
    for name, result in results.items():
        lines += ["", f"### {name}: {result.get('setting', '')}", ""]
        if "error" in result:
            lines.append(f"failed: {result['error']}")
            continue
        products = any(PRODUCTS in point for point in result["points"])
        header = ["x", "params", "fit s", "floor s", "fit / floor"]
        if products:
            header += ["products s", "fit / (floor + products)"]
        header += ["glm s", "sample s", "marglik s"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for point in result["points"]:
            fit, floor = point["fit"], point[FLOOR]
            params = f"{point['n_params']:,}" if point["n_params"] else "–"
            cells = [str(point["x"]), params, _cell(fit), _cell(floor)]
            cells.append(_ratio(fit, [floor]))
            if products:
                bare = point.get(PRODUCTS, {})
                cells += [_cell(bare) if bare else "–", _ratio(fit, [floor, bare])]
            cells += [_cell(point[phase]) for phase in ("glm", "sample", "marglik")]
            lines.append("| " + " | ".join(cells) + " |")
            for phase in (*PHASES, FLOOR, PRODUCTS):
                entry = point.get(phase, {})
                reason = entry.get("skipped") or entry.get("error")
                if reason and reason != "the fit failed":
                    notes.append(f"{name} = {point['x']}, {phase}: {reason}")
        p = result["exponents"]
        cells = ["**p**", "", *(_exponent_cell(p[k]) for k in ("fit", FLOOR)), "–"]
        if products:
            cells += [_exponent_cell(p.get(PRODUCTS)), "–"]
        cells += [_exponent_cell(p[k]) for k in ("glm", "sample", "marglik")]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Skipped or failed:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def plot_axis(result: dict[str, Any], path: Path) -> None:
    """Seconds against ``x`` in log-log, one curve per phase and the floor.

    Args:
        result: :func:`run_axis`'s result.
        path: The PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.add_subplot()
    styles = {
        "fit": ("C0", "-", "o"),
        FLOOR: ("C0", "--", "x"),
        "glm": ("C1", "-", "s"),
        "sample": ("C2", "-", "^"),
        "marglik": ("C3", "-", "d"),
        PRODUCTS: ("C0", ":", "+"),
    }
    names = {FLOOR: "fit floor (fwd + K bwd)", PRODUCTS: "bare products of the fit"}
    for phase, (colour, line, marker) in styles.items():
        xs, seconds = series(result["points"], phase)
        if not xs:
            continue
        p = result["exponents"].get(phase)
        label = f"{names.get(phase, phase)}  p = {_exponent_cell(p)}"
        ax.plot(xs, seconds, line, color=colour, marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = [point["x"] for point in result["points"]]
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(result["label"])
    ax.set_ylabel("seconds per call")
    ax.set_title(textwrap.fill(result["setting"], 80), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def machine(threads: int) -> dict[str, Any]:
    """What the numbers were measured on.

    Args:
        threads: The threads of each worker.

    Returns:
        Versions, platform and threads.
    """
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "laplace_torch": metadata.version("laplace-torch"),
        "platform": platform.platform(),
        "threads": threads,
    }


def write_results(
    results: dict[str, dict[str, Any]], args: argparse.Namespace, suffix: str
) -> None:
    """Write the JSON and the markdown of the axes measured so far.

    Args:
        results: Axis name to :func:`run_axis`'s result (or ``{"error": ...}``).
        args: The command line (``out``, ``threads``, ``quick``).
        suffix: ``"_quick"`` or ``""``.
    """
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine(args.threads),
        "quick": args.quick,
        "phases": [*PHASES, FLOOR, PRODUCTS],
        "axes": results,
    }
    (args.out / f"scaling{suffix}.json").write_text(json.dumps(payload, indent=2))
    command = "python benchmarks/scaling.py" + (" --quick" if args.quick else "")
    (args.out / f"scaling{suffix}.md").write_text(
        f"Command: `{command}`\n\n{markdown(results, args.threads)}"
    )


def sweep(args: argparse.Namespace) -> int:
    """Run the chosen axes, writing the results after each.

    Args:
        args: The command line.

    Returns:
        0, or 1 if an axis or a phase failed.
    """
    suffix = "_quick" if args.quick else ""
    results: dict[str, dict[str, Any]] = {}
    threads_before = torch.get_num_threads()
    try:
        for name in args.axes:
            if args.quick:  # in this process: a smoke test, not a measurement
                torch.set_num_threads(args.threads)
                results[name] = run_axis(name, quick=True)
            else:
                print(f"axis {name}: measuring in a worker process", flush=True)
                payload = {"axis": name, "quick": False, "threads": args.threads}
                results[name] = run_worker(Path(__file__), payload, args.threads)
            if "error" not in results[name]:
                plot_axis(results[name], args.plots / f"scaling{suffix}_{name}.png")
            print(markdown({name: results[name]}, args.threads), flush=True)
            write_results(results, args, suffix)
    finally:
        torch.set_num_threads(threads_before)
    failed = any(
        "error" in result
        or any(
            "error" in point.get(phase, {})
            for point in result["points"]
            for phase in (*PHASES, FLOOR, PRODUCTS)
        )
        for result in results.values()
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the sweeps; write the JSON, the markdown and one PNG per axis.

    Args:
        argv: Command-line arguments.

    Returns:
        0, or 1 if an axis or a phase failed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--axes", nargs="*", default=list(AXES), choices=list(AXES))
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        # laplace-torch's advice on every prior tuning, torch's deprecations.
        warnings.simplefilter("ignore")
        if args.worker:
            print(json.dumps(worker(json.loads(args.worker))))
            return 0
        return sweep(args)


if __name__ == "__main__":
    raise SystemExit(main())
