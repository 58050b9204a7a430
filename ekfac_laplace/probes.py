"""Probing backward passes: where each example's rows are in what a module sees.

Two questions about a forward pass that shapes cannot answer, each settled by a few
backward passes from chosen combinations of the outputs, before any curvature is
accumulated:

* :func:`route_rows`: which example each row of a layer called on some examples'
  rows (a mixture-of-experts expert, ``expert(x[rows])``) belongs to;
* :func:`locate_batches`: which dimension holds the batch of each module that could
  be sequence-first (``(T, B, d)``) or fold several rows into the batch.

Both read and update a :class:`~ekfac_laplace.capture.ForwardCapture`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ekfac_laplace.capture import ForwardCapture, laid_out
from ekfac_laplace.driver import backward
from ekfac_laplace.errors import CaptureError


def route_rows(
    capture: ForwardCapture, f: Tensor, targets: list[Tensor], always: bool = False
) -> bool:
    """Lay out per example the rows of layers called on some examples' rows.

    A mixture of experts calls each expert on the rows routed to it
    (``expert(x[rows])``), or on none, or not at all. Where a layer of a
    routable kind gets an input ``(R, d_in)`` with ``R`` not a multiple of the
    batch size ``B``, or did not run, the model routes rows (a fold of ``m``
    rows per example, ``R = m·B``, as a reward model's pairs, is taken to be
    consecutive and costs nothing), and for every layer of such a kind with a
    2-D input, two backward passes find each row's example (an expert may get
    a multiple of ``B`` rows by chance): ``Σ_n ⟨v_n, f_n⟩`` and
    ``Σ_n (n + 1) ⟨v_n, f_n⟩`` give row ``r`` of example ``n`` gradients in the
    ratio ``n + 1`` (rows without gradient add nothing to any per-example
    gradient, wherever they go). The capture's inputs (now) and every output
    gradient (as it arrives, by its ``routes``) are then laid out as ``B·m`` rows,
    example by example, zero-padded to ``m`` rows each, as
    :func:`~ekfac_laplace.layer.group_rows` expects. A layer that did not run gets
    ``0`` rows. Runs before :func:`locate_batches`.

    Args:
        capture: The capture of the forward pass, after it.
        f: The outputs ``(B, …)`` of the captured forward pass.
        targets: Parameters to back-propagate to (one per module).
        always: Route the rows even if this pass shows no routing (an earlier
            batch of the same fit did).

    Returns:
        Whether the rows were routed (the model routes rows).

    Raises:
        CaptureError: If a row carries gradient from several examples.
    """
    batch = f.shape[0]
    routed, seen = [], always
    for layer in capture.layout.layers:
        if not layer.kind.routable or layer.attention is not None:
            continue
        if layer.name not in capture.inputs:  # not called: no row at all
            capture.inputs[layer.name] = layer.weight.new_zeros(
                0, layer.as_matrix(layer.weight).shape[1]
            ).detach()
            capture.outputs[layer.name] = (None, 0)
            seen = True
        elif capture.inputs[layer.name].ndim == 2:
            routed.append(layer.name)
            seen = seen or capture.inputs[layer.name].shape[0] % batch != 0
    if not seen or batch < 2 or not f.requires_grad:
        return seen
    routed = [name for name in routed if capture.inputs[name].shape[0]]
    generator = torch.Generator(device=f.device).manual_seed(0)
    direction = torch.randn(
        f.shape, generator=generator, dtype=f.dtype, device=f.device
    )
    scale = torch.arange(1, batch + 1, dtype=f.dtype, device=f.device)
    probes = []
    with torch.enable_grad():
        for weights in (None, scale.reshape(-1, *[1] * (f.ndim - 1))):
            weighted = direction if weights is None else direction * weights
            backward((f * weighted).sum(), targets, retain_graph=True)
            probes.append({name: capture.raw_gradient(name) for name in routed})
            capture.forget_gradients()
    for name in routed:
        rows = capture.inputs[name].shape[0]
        examples = _row_examples(name, probes[0][name], probes[1][name], rows, batch)
        capture.routes[name] = _destinations(examples, batch)
        capture.inputs[name] = laid_out(capture.inputs[name], *capture.routes[name])
    return True


@torch.no_grad()
def locate_batches(
    capture: ForwardCapture, f: Tensor, targets: list[Tensor], check: bool
) -> None:
    """Find each module's batch dimension from which rows example 0 and 1 reach.

    A tensor ``(T, B, d)`` of a sequence-first model and ``(B, T, d)`` with
    ``T`` a multiple of ``B`` cannot be told apart by their shapes. One backward
    pass from the outputs of example ``e`` (``e = 0, 1``) reaches only the rows
    of example ``e`` in the batch dimension (its ``m`` consecutive rows where
    ``m`` are folded into the batch); dimension 0 is kept where several
    dimensions qualify. Modules that no dimension fits are refused (with
    ``check``) or kept at 0. Sets the capture's ``batch_dims`` and relocates its
    diagonal modules' calls; without ambiguity (and without ``check``) no
    backward pass is made.

    Args:
        capture: The capture of the forward pass, after it (its routed rows laid
            out by :func:`route_rows`).
        f: The outputs ``(B, C)`` of the captured forward pass.
        targets: Parameters to back-propagate to (one per module).
        check: Probe every module, refusing coupled or interleaved examples.

    Raises:
        ValueError: With ``check``, if a module's rows of example 0 or 1 are
            not where the batch dimension puts them.
    """
    batch = f.shape[0]
    candidates = _candidate_dims(capture, batch)
    if batch < 2 or not candidates:
        return
    if not check and all(dims == [0] for dims in candidates.values()):
        return
    probes = []
    with torch.enable_grad():
        for example in (0, 1):
            backward(f[example].sum(), targets, retain_graph=True)
            probes.append({name: capture.raw_gradient(name) for name in candidates})
            capture.forget_gradients()
    for name, dims in candidates.items():
        reached = [probe[name] for probe in probes]
        if any(gradient is None for gradient in reached):
            continue  # the module does not influence the outputs
        if not all(bool(torch.isfinite(gradient).all()) for gradient in reached):
            continue  # NaN / Inf: refused with its name by the factor checks
        found = next(
            (
                dim
                for dim in dims
                if all(
                    _only_row(gradient, dim, batch, example)
                    for example, gradient in enumerate(reached)
                )
            ),
            None,
        )
        if found is None and check:
            raise ValueError(
                f"Module '{name}' sees tensors of shape "
                f"{tuple(reached[0].shape)} for a batch of {batch} examples, but "
                "no dimension holds the examples apart: the first example's "
                "outputs depend on rows of other examples (the rows of each "
                "example are not consecutive, or examples are coupled). Keep "
                "examples independent; fold extra dimensions into the batch "
                "with x.reshape(batch * m, ...), which keeps each example's "
                "rows together."
            )
        if found:
            capture.batch_dims[name] = found
            if name in capture.calls:
                capture.calls[name] = capture.calls[name].located(found, batch)


def _candidate_dims(capture: ForwardCapture, batch: int) -> dict[str, list[int]]:
    """Per module, the dimensions that could hold the batch (0 first)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in capture.layout.layers:
        if not layer.kind.batch_first and layer.attention is None:
            if layer.name in capture.inputs:
                shapes[layer.name] = tuple(capture.inputs[layer.name].shape)
    for name, call in capture.calls.items():
        if call.conventional:
            continue
        tensors = [shape for shape in call.output_shapes if shape]
        if tensors:
            shapes[name] = tensors[0]
    return {
        name: [0] + [d for d in range(1, len(shape) - 1) if shape[d] % batch == 0]
        for name, shape in shapes.items()
        if shape[0] % batch == 0 or len(shape) > 2
    }


def _row_examples(
    name: str, first: Tensor | None, second: Tensor | None, rows: int, batch: int
) -> Tensor:
    """Each row's example, from its gradients under weights ``1`` and ``n + 1``."""
    if first is None or second is None:  # no gradient reaches it: any example
        return torch.arange(rows) * batch // max(rows, 1)  # (laid_out moves them)
    first = first.detach().reshape(rows, -1).double()
    second = second.detach().reshape(rows, -1).double()
    norms = first.square().sum(1)
    reached = norms > 0
    ratio = (first * second).sum(1) / norms.where(reached, torch.ones_like(norms))
    examples = (ratio.round() - 1).clamp(0, batch - 1).where(reached, 0).long()
    expected = first * (examples + 1).unsqueeze(1).to(first.dtype)
    residual = (second - expected).norm(dim=1)
    tolerance = 1e-3 * second.norm(dim=1) + 1e-12 * float(second.norm())
    if bool((reached & (residual > tolerance)).any()):
        raise CaptureError(
            f"Module '{name}' is called on {rows} rows for a batch of {batch} "
            "examples, and some of its rows carry gradient from several examples: "
            "its per-example gradients are not defined. Keep each row of an "
            "example's own (an expert called on x[rows] is fine; a batch mean is "
            "not)."
        )
    return examples


def _destinations(examples: Tensor, batch: int) -> tuple[Tensor, int]:
    """Where each row goes when each example's rows are laid out together."""
    counts = torch.bincount(examples, minlength=batch)
    width = int(counts.max()) if len(examples) else 0
    order = torch.argsort(examples, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.empty_like(examples)
    rows = torch.arange(len(examples), device=examples.device)
    slots[order] = rows - starts[examples[order]]
    return examples * width + slots, batch * width


def _only_row(gradient: Tensor, dim: int, batch: int, example: int) -> bool:
    """Whether ``gradient`` is zero outside example ``example``'s rows of ``dim``."""
    if gradient.shape[dim] % batch:
        return False
    rows = gradient.movedim(dim, 0).reshape(batch, -1)
    others = torch.cat([rows[:example], rows[example + 1 :]])
    return not others.any()
