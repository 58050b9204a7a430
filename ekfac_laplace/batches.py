"""Training and test batches as laplace-torch passes them: ``(X, y)`` or a dict.

laplace-torch accepts two kinds of batches: ``(X, y)`` tuples and dict-like
(Hugging Face style) batches, which are passed to the model *whole* with the targets
under ``dict_key_y`` and the inputs under ``dict_key_x``. This module is the one place
that takes batches apart: :func:`split_batch` for a single batch,
:class:`LaplaceBatches` for a re-iterable loader, and the checks :meth:`fit
<ekfac_laplace.EKFACLaplace.fit>` makes on a loader before its first pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor, nn
from torch.utils.data import DataLoader


def split_batch(
    batch: Any, dict_key_y: str = "labels", dict_key_x: str | None = None
) -> tuple[Any, Tensor]:
    """The model input and the targets of one batch.

    Args:
        batch: ``(X, y)`` (a tuple or list; extra entries are ignored) or a dict-like
            batch, which is the model input whole.
        dict_key_y: Key of the targets in a dict-like batch.
        dict_key_x: Key of the inputs a dict-like batch must have (not checked if
            ``None``); laplace-torch reads the batch size from it.

    Returns:
        ``(X, y)``; for a dict-like batch ``(batch, batch[dict_key_y])``.

    Raises:
        KeyError: If a dict-like batch lacks ``dict_key_y`` or ``dict_key_x``, as
            laplace-torch raises.
        ValueError: If the batch is neither a dict nor a pair.
    """
    if isinstance(batch, Mapping):
        for role, axis, key in (
            ("target", "y", dict_key_y),
            ("input", "x", dict_key_x),
        ):
            if key is not None and key not in batch:
                raise KeyError(
                    f"A dict-like batch has no {role} key {key!r} (keys: "
                    f"{sorted(batch)}); set dict_key_{axis} on the Laplace object to "
                    "the key your batches use, or rename the key."
                )
        return batch, batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        "Loader batches must be (x, y) tuples/lists or dicts with inputs and targets "
        f"(under dict_key_y), got {type(batch).__name__}."
    )


def batch_size(X: Any, dict_key_x: str = "input_ids") -> int:
    """Number of examples in a model input (a tensor or a dict-like batch).

    Args:
        X: A tensor of shape ``(B, ...)`` or a dict-like batch.
        dict_key_x: Key of the inputs in a dict-like batch.

    Returns:
        ``B``.
    """
    if isinstance(X, Mapping):
        return int(X[dict_key_x].shape[0])
    return int(X.shape[0])


def module_device(module: nn.Module) -> torch.device:
    """Where a module's inputs go: the device of its first parameter (CPU if none).

    Args:
        module: The network.

    Returns:
        The device.
    """
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def to_device(X: Any, device: torch.device) -> Any:
    """Move a model input (a tensor or the tensors of a dict) to ``device``.

    A dict-like batch whose tensors are all on ``device`` already is returned as it
    is (keeping its type, e.g. a Hugging Face ``BatchEncoding``); otherwise as a
    ``dict`` of moved tensors.

    Args:
        X: A tensor, a dict-like batch, or anything else (returned as is).
        device: The target device.

    Returns:
        The input on ``device``.
    """
    if isinstance(X, Tensor):
        return X.to(device)
    if isinstance(X, Mapping):
        tensors = [value for value in X.values() if isinstance(value, Tensor)]
        if all(value.device == torch.device(device) for value in tensors):
            return X
        return {
            key: value.to(device) if isinstance(value, Tensor) else value
            for key, value in X.items()
        }
    return X


class LaplaceBatches:
    """Re-iterable view of a training loader as ``(X, y)`` pairs.

    Dict-like batches yield ``(batch, batch[dict_key_y])``; the model gets the batch
    whole, as laplace-torch does. The most recent targets are kept in
    :attr:`current_targets`, so that a forward hook can compute the loss.

    Args:
        loader: Iterable of ``(X, y)`` tuples or of dict-like batches.
        dict_key_y: Key of the targets in dict-like batches.
        dict_key_x: Key of the inputs dict-like batches must have (``None``: any).
    """

    def __init__(
        self,
        loader: Iterable[Any],
        dict_key_y: str = "labels",
        dict_key_x: str | None = None,
    ) -> None:
        self.loader = loader
        self.dict_key_y = dict_key_y
        self.dict_key_x = dict_key_x
        self.current_targets: Tensor | None = None
        #: ``(batches, examples)`` of the first complete pass.
        self.first_pass: tuple[int, int] | None = None
        self._passes = 0

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        """The batches, integer labels as ``int64``; each pass is counted.

        Raises:
            ValueError: At the end of a pass that yields another number of batches
                or examples than the first.
        """
        batches = examples = 0
        for batch in self.loader:
            X, y = split_batch(batch, self.dict_key_y, self.dict_key_x)
            if not y.is_floating_point() and y.dtype not in (torch.int64, torch.bool):
                y = y.long()  # int32 / uint8 labels: what the torch losses take
            self.current_targets = y
            batches += 1
            examples += y.shape[0] if y.ndim else 1
            yield X, y
        self._pass_done(batches, examples)

    @property
    def passes(self) -> int:
        """The complete passes over the loader so far (``first()`` is not one)."""
        return self._passes

    def _pass_done(self, batches: int, examples: int) -> None:
        self._passes += 1
        if self.first_pass is None:
            self.first_pass = (batches, examples)
            return
        if (batches, examples) != self.first_pass:
            first_batches, first_examples = self.first_pass
            raise ValueError(
                f"Pass {self._passes} over train_loader yielded {examples} examples "
                f"in {batches} batches, the first pass {first_examples} in "
                f"{first_batches}. The fit passes over the data more than once and "
                "needs the same data each time: a one-shot iterator, a sampler "
                "whose length changes or a loader that drops batches at random "
                "does not give it. Use a DataLoader over a Dataset."
            )

    def first(self) -> tuple[Any, Tensor]:
        """The first batch.

        Returns:
            ``(X, y)`` of the first batch.

        Raises:
            ValueError: If the loader yields no batches.
        """
        try:
            return next(iter(self))
        except StopIteration:
            raise ValueError(
                "fit got a train_loader that yields no batches (an empty loader, or "
                "drop_last=True with fewer examples than the batch size)."
            ) from None


def check_reiterable(loader: Iterable[Any]) -> None:
    """Refuse a one-shot iterator as a training loader.

    A fit passes over the data two or three times (and the last-layer class takes
    a first batch to find the last layer): an iterator whose ``__iter__`` returns
    the same object (a generator, or a class handing out one generator) would
    lose its first batch and then be empty.

    Args:
        loader: The training loader.

    Raises:
        ValueError: If two ``iter(loader)`` are the same iterator.
    """
    if isinstance(loader, DataLoader):  # re-iterable; iter() would start workers
        return
    if iter(loader) is iter(loader):
        raise ValueError(
            f"train_loader is a one-shot iterator ({type(loader).__name__}: every "
            "iter() of it is the same object, as for a generator), but the fit "
            "passes over the data more than once. Pass a DataLoader, a list of "
            "batches, or an object whose __iter__ starts a new pass each time."
        )


def first_examples(batches: Iterable[Any], count: int) -> Any:
    """The model input of the first ``count`` examples of the first batch.

    Args:
        batches: :class:`LaplaceBatches` (or anything with ``first()``), or any
            re-iterable of ``(X, y)`` pairs.
        count: How many examples at most.

    Returns:
        ``X`` of the first batch with every tensor that has the batch's examples in
        dimension 0 (as many rows as the targets) cut to ``count`` rows.

    Raises:
        ValueError: If there is no batch.
    """
    first = getattr(batches, "first", None)
    if callable(first):
        X, y = first()
    else:
        X, y = next(iter(batches), (None, None))
        if y is None:
            raise ValueError("fit got a train_loader that yields no batches.")
    rows = y.shape[0] if y.ndim else 1

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == rows:
            return value[:count]
        return value

    if isinstance(X, Mapping):
        return {key: cut(value) for key, value in X.items()}
    return cut(X)


def dataset_size(loader: Any, shard: bool = False) -> int:
    """The number of training points ``N`` of a loader, ``len(loader.dataset)``.

    Args:
        loader: A ``DataLoader`` (anything with a sized ``dataset``).
        shard: The loader is one rank's shard of a data-parallel fit: count what
            its sampler draws (``len(loader.sampler)``, e.g. a
            ``DistributedSampler``'s share), else its dataset.

    Returns:
        ``N >= 1``.

    Raises:
        ValueError: If the dataset has no length or is empty.
    """
    dataset = getattr(loader, "dataset", None)
    try:
        num_data = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "fit needs train_loader.dataset with a length (the number of training "
            "points N); wrap the data in a map-style Dataset such as "
            "torch.utils.data.TensorDataset."
        ) from None
    sampler = getattr(loader, "sampler", None)
    if shard and sampler is not None and hasattr(sampler, "__len__"):
        num_data = len(sampler)
    if num_data == 0:
        raise ValueError(
            "fit got an empty training set (len(dataset) == 0)"
            + (" on this rank's shard." if shard else ".")
        )
    return num_data


def check_inputs(X: Any, dtype: torch.dtype, dict_key_x: str = "input_ids") -> None:
    """Refuse floating-point inputs of another dtype than the model's.

    Args:
        X: A model input (a tensor or a dict-like batch, whose floating tensors are
            checked).
        dtype: The model's parameter dtype.
        dict_key_x: Key of the inputs in a dict-like batch, for the message.

    Raises:
        ValueError: For a floating-point input of another dtype, with the fix.
    """
    tensors = X.items() if isinstance(X, Mapping) else [("inputs", X)]
    for name, value in tensors:
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and value.dtype != dtype
        ):
            where = "The inputs" if name == "inputs" else f"The batch's {name!r}"
            raise ValueError(
                f"{where} are {value.dtype} but the model's parameters are {dtype}; "
                f"convert the data (e.g. X.to({dtype})) or the model "
                f"(model.to({value.dtype})) so that they match."
            )


def check_outputs(out: Any) -> Tensor:
    """Refuse a model that does not return one tensor of outputs.

    Args:
        out: What the model returned.

    Returns:
        ``out``, a tensor.

    Raises:
        ValueError: For a tuple, a dict or anything else.
    """
    if not isinstance(out, Tensor):
        raise ValueError(
            f"The model returns a {type(out).__name__}; EKFAC Laplace needs it to "
            "return one tensor of outputs, (batch, outputs) or (batch, tokens, "
            "classes). Wrap the model in an nn.Module whose forward returns the "
            "logits, e.g. model(x)[0] or model(x).logits."
        )
    return out


def check_targets(
    f: Tensor, y: Tensor, likelihood: Likelihood | str, batch: int | None = None
) -> None:
    """Refuse targets that do not fit the outputs and the likelihood.

    Classification targets are class indices (an integer dtype, shape ``(B,)``,
    values in ``[0, C)``) or class probabilities (floating, shape ``(B, C)``);
    regression targets are floating, shaped like the outputs. Floating targets
    must be finite. One host read per batch (the labels' range, or whether the
    floating targets are finite); none for a batch without examples.

    Args:
        f: Model outputs ``(B, C)``.
        y: The batch's targets.
        likelihood: ``"classification"`` or ``"regression"``.
        batch: The batch's index in the loader, for the message.

    Raises:
        ValueError: Naming the problem, the batch and the fix.
    """
    if y.is_floating_point() and y.numel() and not bool(torch.isfinite(y).all()):
        where = "" if batch is None else f" of batch {batch}"
        raise ValueError(
            f"The targets{where} contain NaN or Inf; the likelihood and the "
            "evidence would be NaN. Remove or repair those examples."
        )
    if likelihood == Likelihood.REGRESSION:
        if y.shape != f.shape:
            raise ValueError(
                f"Regression targets have shape {tuple(y.shape)} but the model "
                f"outputs {tuple(f.shape)}; they must match, e.g. y.reshape(-1, 1)."
            )
        if not y.is_floating_point():
            raise ValueError(
                f"Regression targets must be floating point, got {y.dtype}; use "
                "y.float() (or the model's dtype)."
            )
        return
    if y.shape == f.shape and y.is_floating_point():
        return  # class probabilities
    if y.ndim != 1 or y.shape[0] != f.shape[0]:
        raise ValueError(
            f"Classification targets must be class indices of shape (batch,) or "
            f"class probabilities of shape (batch, classes), got {tuple(y.shape)} "
            f"for outputs {tuple(f.shape)}."
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(
            f"Classification targets of shape (batch,) must be integer class "
            f"indices, got {y.dtype}; use y.long()."
        )
    if y.numel() == 0:  # a batch whose tokens all have the label -100
        return
    low, high = torch.stack(torch.aminmax(y)).tolist()  # one host sync a batch
    if low < 0 or high >= f.shape[1]:
        raise ValueError(
            f"Class labels must lie in [0, {f.shape[1]}) for a model with "
            f"{f.shape[1]} outputs, got labels from {low} to {high}; relabel the "
            "classes as 0 … C-1, or give the model one output per class."
        )


#: Labels of tokens that count for nothing (padding, prompts), as in
#: ``torch.nn.functional.cross_entropy`` and Hugging Face.
IGNORE_INDEX = -100


def token_rows(
    f: Tensor, y: Tensor, likelihood: Likelihood | str
) -> tuple[Tensor, Tensor, Tensor]:
    """The counted tokens of token-level outputs, one row each.

    A language model's outputs ``(B, T, C)`` with labels ``(B, T)`` are one
    classification example per token whose label is not ``-100``; those tokens'
    outputs and labels become rows, in row-major (example, token) order. For
    regression every token counts, with targets ``(B, T, C)``.

    Args:
        f: Outputs ``(B, T, C)``.
        y: Labels ``(B, T)`` or regression targets ``(B, T, C)``.
        likelihood: ``"classification"`` or ``"regression"``.

    Returns:
        ``f`` rows ``(R, C)``, ``y`` rows and the mask of counted tokens ``(B, T)``.

    Raises:
        ValueError: For targets of another shape.
    """
    if likelihood == Likelihood.REGRESSION:
        if y.shape != f.shape:
            raise ValueError(
                f"Token-level outputs of shape {tuple(f.shape)} need regression "
                f"targets of the same shape, got {tuple(y.shape)}."
            )
        counted = torch.ones(f.shape[:2], dtype=torch.bool, device=f.device)
        return f.flatten(0, 1), y.flatten(0, 1), counted
    if y.shape != f.shape[:2] or y.is_floating_point():
        raise ValueError(
            f"Token-level outputs of shape {tuple(f.shape)} need integer labels of "
            f"shape {tuple(f.shape[:2])} (-100 for tokens that do not count), got "
            f"{tuple(y.shape)} ({y.dtype})."
        )
    counted = y != IGNORE_INDEX
    return f[counted], y[counted], counted


@contextmanager
def naming_failing_module(model: nn.Module) -> Iterator[None]:
    """Add the innermost running module's name to a ``RuntimeError`` of a forward.

    torch's shape errors (``mat1 and mat2 shapes cannot be multiplied``) do not say
    where they happen; this re-raises them with the module's name and class.

    Args:
        model: The network whose forward pass runs inside the context.

    Yields:
        Nothing.

    Raises:
        RuntimeError: The forward pass's, with the module named.
    """
    running: list[str] = []

    def enter(name: str) -> Any:
        return lambda module, args: running.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if running:
            running.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    except RuntimeError as error:
        if not running:
            raise
        name = running[-1]
        kind = type(model.get_submodule(name)).__name__
        raise RuntimeError(f"{error} (in module '{name}', {kind})") from error
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def output_size(
    model: nn.Module,
    batches: LaplaceBatches,
    likelihood: Likelihood | str,
    device: torch.device,
    dict_key_x: str = "input_ids",
) -> int:
    """The number of model outputs, checked against the first batch.

    The first batch's inputs must have the model's dtype and its targets must fit
    the outputs and the likelihood (:func:`check_targets`); a ``RuntimeError`` of the
    forward pass names the module it comes from.

    Args:
        model: The network (in eval mode).
        batches: The training batches.
        likelihood: ``"classification"`` or ``"regression"``.
        device: Device of the model.
        dict_key_x: Key of the inputs in a dict-like batch.

    Returns:
        The output width ``C`` of outputs of shape ``(B, C)`` or, token-level,
        ``(B, T, C)``.

    Raises:
        ValueError: For an empty loader, inputs of another dtype, outputs that are
            not ``(batch, outputs)`` or ``(batch, tokens, classes)``, or targets
            that do not fit them.
    """
    X, y = batches.first()
    check_inputs(X, next(model.parameters()).dtype, dict_key_x)
    with naming_failing_module(model):
        out = check_outputs(model(to_device(X, device)))
    y = y.to(out.device)
    if out.ndim == 3:
        out, y, _ = token_rows(out, y, likelihood)
    elif out.ndim != 2:
        raise ValueError(
            f"EKFAC Laplace needs model outputs of shape (batch, outputs) or "
            f"(batch, tokens, classes), got {tuple(out.shape)}; flatten other "
            "dimensions into the batch dimension."
        )
    check_targets(out, y, likelihood, batch=0)
    return int(out.shape[-1])
