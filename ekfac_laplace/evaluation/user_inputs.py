"""A user's own model function and data file, loaded and validated.

``ekfac-laplace compare --model module:function --data file.pt`` evaluates a user's
network on a user's data instead of the bundled ones; this module is that layer:

- :func:`load_model_function` imports ``"package.module:function"`` (the current
  directory searched first, as ``python -m`` does) or ``"path/to/file.py:function"``;
- :func:`build_user_model` calls it with the keywords it accepts (``input_shape``,
  ``n_outputs``, ``dropout``), seeded, the global random state left as it was;
- :func:`load_data_file` reads a data file into a
  :class:`~ekfac_laplace.evaluation.problems.Problem`, and :func:`save_data_file`
  writes one after the same checks.

A data file is a dict written by ``torch.save`` and read back with
``torch.load(..., weights_only=True)``, so it holds tensors, numbers and strings only:

| key          | value                                                    | required |
| ------------ | -------------------------------------------------------- | -------- |
| `train`      | `(X, y)`                                                 | yes      |
| `test`       | `(X, y)`                                                 | yes      |
| `val`        | `(X, y)`; else a seeded 20% of train (stratified)        | no       |
| `ood`        | `X`, or `(X, y)` with `y` ignored; classification only   | no       |
| `shift`      | `{kind: {strength: (X, y)}}`: shifted test sets          | no       |
| `likelihood` | `"classification"` / `"regression"`; else from y's dtype | no       |
| `n_outputs`  | classes (else max label + 1) or outputs (else y's width) | no       |
| `name`       | the data set's name (else the file's stem)               | no       |

Inputs ``X`` are floating, of shape ``(N, *input_shape)`` with the same
``input_shape`` in every split. Targets ``y`` are integer labels of shape ``(N,)``
in ``[0, n_outputs)`` for classification (integer dtype infers it), floating
values of shape ``(N,)`` or ``(N, K)`` for regression (floating dtype infers it),
``K`` the same everywhere. Every mistake is a ``ValueError`` naming the file, the
key and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ekfac_laplace.evaluation.checks import check_positive_int, check_seed
from ekfac_laplace.evaluation.data import DataSplits
from ekfac_laplace.evaluation.problems import Problem, problem_from_splits

__all__ = [
    "DATA_KEYS",
    "VAL_FRACTION",
    "build_user_model",
    "load_data_file",
    "load_model_function",
    "save_data_file",
]

#: The keys a data file may have.
DATA_KEYS = ("train", "val", "test", "ood", "shift", "likelihood", "n_outputs", "name")
#: Share of the training set split off as validation set when a file has no ``val``.
VAL_FRACTION = 0.2

_LIKELIHOODS = ("classification", "regression")
_SPEC_EXAMPLE = "write module:function, e.g. my_models:build or models/net.py:build"
_FILE_MODULE_PREFIX = "_ekfac_laplace_user_model_"
_file_modules = itertools.count()


def _first_line(error: BaseException) -> str:
    """``"TypeError: its first line"`` of an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ------------------------------------------------------------------ the model


def _import_module(name: str, spec: str) -> ModuleType:
    """Import ``name`` with the current directory at the front of ``sys.path``."""
    saved_path = list(sys.path)
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing == name or name.startswith(f"{missing}."):
            raise ValueError(
                f"Cannot find module {missing!r} of model {spec!r} (searched the "
                f"current directory {cwd} and sys.path); check the spelling, run from "
                "the directory that holds it, or give its file: path/to/file.py:"
                "function."
            ) from error
        raise _import_error(name, spec, error) from error
    except (Exception, SystemExit) as error:
        raise _import_error(name, spec, error) from error
    finally:
        sys.path[:] = saved_path


def _import_error(name: str, spec: str, error: BaseException) -> ValueError:
    """The error of a module that raised while being imported."""
    return ValueError(
        f"Importing {name!r} of model {spec!r} raised {_first_line(error)}; fix the "
        f"module (python -c 'import {name}' shows the whole traceback)."
    )


def _import_file(path: Path, spec: str) -> ModuleType:
    """Run a ``.py`` file as a fresh module, its directory importable meanwhile."""
    if not path.is_file():
        raise ValueError(
            f"Model file {str(path)!r} of model {spec!r} does not exist (relative "
            f"paths start at {os.getcwd()}); check the path."
        )
    name = f"{_FILE_MODULE_PREFIX}{next(_file_modules)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(
            f"Cannot load {str(path)!r} of model {spec!r} as a Python module; give a "
            "Python source file ending in .py."
        )
    module = importlib.util.module_from_spec(module_spec)
    saved_path = list(sys.path)
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module  # dataclasses and pickling look the module up
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        del sys.modules[name]
        raise ValueError(
            f"Running model file {str(path)!r} of model {spec!r} raised "
            f"{_first_line(error)}; fix the file (python {path} shows the whole "
            "traceback)."
        ) from error
    finally:
        sys.path[:] = saved_path
    return module


def _public_callables(module: ModuleType, count: int = 10) -> str:
    """Up to ``count`` public callables of a module, those it defines first."""
    names = [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and callable(value)
    ]
    names.sort(
        key=lambda name: (
            getattr(vars(module)[name], "__module__", None) != module.__name__,
            name,
        )
    )
    if not names:
        return "it has no public callables"
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return f"its public callables: {', '.join(names[:count])}{more}"


def load_model_function(spec: str) -> Callable[..., nn.Module]:
    """The function (or class) that builds a user's network.

    ``"package.module:function"`` is imported with :mod:`importlib`, the current
    directory searched first (as ``python -m`` does; ``sys.path`` is restored
    afterwards). ``"path/to/file.py:function"`` runs that file as a fresh module
    (its directory importable while it runs, for its sibling modules).

    Args:
        spec: ``"module:function"`` or ``"path/to/file.py:function"``.

    Returns:
        The callable, e.g. ``build(input_shape, n_outputs)``; call it with
        :func:`build_user_model`.

    Raises:
        ValueError: If the spec has no ``:`` or an empty part, the file does not
            exist, the module cannot be found or raises when imported, or it has
            no such attribute or the attribute is not callable.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"Model {spec!r} names no function; {_SPEC_EXAMPLE}.")
    target, attribute = (part.strip() for part in spec.rsplit(":", 1))
    if not target or not attribute:
        raise ValueError(f"Model {spec!r} has an empty part; {_SPEC_EXAMPLE}.")
    if target.endswith(".py"):
        module = _import_file(Path(target).expanduser(), spec)
        where = f"model file {target!r}"
    elif "/" in target or "\\" in target:
        raise ValueError(
            f"Model {spec!r}: {target!r} looks like a path but does not end in .py; "
            f"give a .py file or a dotted module name ({_SPEC_EXAMPLE})."
        )
    else:
        module = _import_module(target, spec)
        where = f"module {target!r}"
    if not hasattr(module, attribute):
        raise ValueError(
            f"The {where} has no attribute {attribute!r}; "
            f"{_public_callables(module)}. Write {target}:<one of them>."
        )
    function = getattr(module, attribute)
    if not callable(function):
        raise ValueError(
            f"{target}:{attribute} is not callable (a {type(function).__name__} "
            "object); name a function (or class) that returns the torch.nn.Module."
        )
    return function


def _describe(function: Callable[..., Any]) -> str:
    """``module:function`` (the file for a model file) for messages."""
    name = getattr(function, "__qualname__", None) or repr(function)
    module_name = getattr(function, "__module__", None) or "?"
    module = sys.modules.get(module_name)
    if module_name.startswith(_FILE_MODULE_PREFIX) and module is not None:
        module_name = getattr(module, "__file__", None) or module_name
    return f"{module_name}:{name}"


def _keywords(
    function: Callable[..., Any], offered: dict[str, Any], dropout: float | None
) -> dict[str, Any]:
    """The offered keywords ``function`` takes; other required parameters refused."""
    described = _describe(function)
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Cannot read the signature of model function {described} "
            f"({_first_line(error)}); wrap it in a def taking input_shape and "
            "n_outputs."
        ) from error
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    by_keyword = {
        p.name: p
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    if dropout is not None and not takes_any and "dropout" not in by_keyword:
        raise ValueError(
            f"MC dropout needs a model function with a 'dropout' parameter; "
            f"{described} has none. Add dropout: float to it and use it in "
            "nn.Dropout(dropout) layers."
        )
    unmet = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in offered
    ]
    if unmet:
        raise ValueError(
            f"Model function {described} requires {unmet}, which the command line "
            f"cannot give (it gives {sorted(offered)}); give them defaults."
        )
    return {
        name: value
        for name, value in offered.items()
        if takes_any or name in by_keyword
    }


def build_user_model(
    function: Callable[..., nn.Module],
    input_shape: tuple[int, ...],
    n_outputs: int,
    *,
    seed: int = 0,
    dropout: float | None = None,
) -> nn.Module:
    """Call a user's model function with the keywords it accepts, seeded.

    Of ``input_shape``, ``n_outputs`` and ``dropout`` (offered only when not
    ``None``), the function gets those its signature names (all of them if it
    takes ``**kwargs``). It runs under ``torch.random.fork_rng`` after
    ``torch.manual_seed(seed)``: the same seed gives the same initial weights, and
    the caller's CPU random state is left as it was.

    Args:
        function: From :func:`load_model_function`.
        input_shape: Shape of one input, e.g. ``(1, 8, 8)``.
        n_outputs: Number of classes or regression outputs.
        seed: Seed of the initialisation.
        dropout: Dropout probability in ``[0, 1)`` for MC dropout, or ``None``.

    Returns:
        The network.

    Raises:
        ValueError: If ``dropout`` is given and the function has no ``dropout``
            parameter, it requires a parameter not offered, a size or the dropout
            probability is out of range, the seed is not in ``[0, 2**32)``, or the
            function raises (chained).
        TypeError: If it returns something other than an ``nn.Module``.
    """
    check_seed(seed)
    input_shape = tuple(input_shape)
    if not input_shape or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1
        for size in input_shape
    ):
        raise ValueError(
            f"input_shape must be one or more positive ints, got {input_shape}; pass "
            "the shape of one input, e.g. (1, 8, 8)."
        )
    check_positive_int("n_outputs", n_outputs)
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}; pass e.g. 0.1.")
    offered: dict[str, Any] = {"input_shape": input_shape, "n_outputs": n_outputs}
    if dropout is not None:
        offered["dropout"] = float(dropout)
    keywords = _keywords(function, offered, dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = function(**keywords)
        except Exception as error:
            raise ValueError(
                f"Model function {_describe(function)} raised {_first_line(error)} "
                f"when called with {keywords}; fix the function."
            ) from error
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Model function {_describe(function)} returned a "
            f"{type(model).__name__}, not a torch.nn.Module; return the network."
        )
    return model


# ------------------------------------------------------------------- the data


@dataclass(frozen=True)
class _CheckedData:
    """A data file's contents, checked: targets long ``(N,)`` or float ``(N, K)``."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None
    test: tuple[Tensor, Tensor]
    ood: Tensor | None
    shift: dict[str, dict[float, tuple[Tensor, Tensor]]]
    likelihood: str
    n_outputs: int
    name: str | None


def _pair(value: object, where: str) -> tuple[Tensor, Tensor]:
    """``(X, y)``: two tensors, as many rows each, at least one, X floating."""
    if not (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(part, Tensor) for part in value)
    ):
        got = (
            f"a {type(value).__name__} of "
            f"({', '.join(type(part).__name__ for part in value)})"
            if isinstance(value, (tuple, list))
            else f"a {type(value).__name__}"
        )
        raise ValueError(
            f"{where} must be a pair (X, y) of tensors, got {got}; convert arrays "
            "with torch.as_tensor."
        )
    inputs, targets = value
    _check_inputs(inputs, where)
    if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"{where}: X has {inputs.shape[0]} rows but y has shape "
            f"{tuple(targets.shape)}; give one target per input row."
        )
    return inputs, targets


def _check_inputs(inputs: Tensor, where: str) -> None:
    """Floating, finite inputs of shape ``(N, ...)`` with ``N >= 1``."""
    if inputs.ndim < 2:
        raise ValueError(
            f"{where}: X must have shape (N, *input_shape), got "
            f"{tuple(inputs.shape)}; for one feature use X.unsqueeze(1)."
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{where} is empty (0 rows); give at least one example.")
    if not inputs.is_floating_point():
        raise ValueError(
            f"{where}: X has dtype {inputs.dtype}, but inputs must be floating; "
            "convert them with X.float()."
        )
    if not torch.isfinite(inputs).all():
        raise ValueError(f"{where}: X contains NaN or infinite values; remove them.")


def _splits(content: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The labelled splits, the shifted sets' names and the OOD inputs.

    Labelled splits are keyed by their name in messages; the shifted sets' names
    are given by kind and strength. Inputs are checked here, targets later.
    """
    for key in ("train", "test"):
        if key not in content:
            raise ValueError(
                f"{source} has no {key!r} split; add {key!r}: (X, y) to the dict."
            )
    labelled = {
        f"{source}, key {key!r}": _pair(content[key], f"{source}, key {key!r}")
        for key in ("train", "val", "test")
        if key in content
    }
    shift = content.get("shift", {})
    if not isinstance(shift, Mapping):
        raise ValueError(
            f"{source}, key 'shift' must be a dict {{kind: {{strength: (X, y)}}}}, got "
            f"a {type(shift).__name__}."
        )
    shifted: dict[str, dict[float, str]] = {}
    for kind, strengths in shift.items():
        where = f"{source}, key 'shift'[{kind!r}]"
        if not isinstance(kind, str) or not isinstance(strengths, Mapping):
            raise ValueError(
                f"{where} must map a kind name (str) to {{strength: (X, y)}}, got "
                f"{type(kind).__name__} -> {type(strengths).__name__}."
            )
        if not strengths:
            raise ValueError(f"{where} has no strengths; drop it or add some.")
        shifted[kind] = {}
        for strength, pair in strengths.items():
            if isinstance(strength, bool) or not isinstance(strength, (int, float)):
                raise ValueError(
                    f"{where}: strength {strength!r} must be a number (float or int)."
                )
            name = f"{where}[{strength!r}]"
            labelled[name] = _pair(pair, name)
            shifted[kind][float(strength)] = name
    ood = content.get("ood")
    if ood is not None:
        where = f"{source}, key 'ood'"
        ood = _pair(ood, where)[0] if isinstance(ood, (tuple, list)) else ood
        if not isinstance(ood, Tensor):
            raise ValueError(
                f"{where} must be a tensor X (or a pair (X, y), y ignored), got a "
                f"{type(ood).__name__}."
            )
        _check_inputs(ood, where)
    input_shape = tuple(content["train"][0].shape[1:])
    inputs = {name: pair[0] for name, pair in labelled.items()}
    if ood is not None:
        inputs[f"{source}, key 'ood'"] = ood
    for where, x in inputs.items():
        if tuple(x.shape[1:]) != input_shape:
            raise ValueError(
                f"{where}: inputs have shape {tuple(x.shape[1:])} per example, but "
                f"the training inputs {input_shape}; give every split the same "
                "input shape."
            )
    return {"labelled": labelled, "shift": shifted, "ood": ood}


def _likelihood(content: Mapping[str, Any], source: str) -> str:
    """The file's likelihood, or the one its training targets' dtype implies."""
    if "likelihood" in content:
        likelihood = content["likelihood"]
        if likelihood not in _LIKELIHOODS:
            raise ValueError(
                f"{source}, key 'likelihood' is {likelihood!r}; choose one of "
                f"{_LIKELIHOODS}."
            )
        return likelihood
    targets = content["train"][1]
    if targets.is_floating_point():
        return "regression"
    if targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(
            f"{source}, key 'train': y has dtype {targets.dtype}; use integer labels "
            "(y.long()) for classification or floating targets (y.float()) for "
            "regression, or set 'likelihood'."
        )
    return "classification"


def _n_outputs(content: Mapping[str, Any], source: str, minimum: int) -> int | None:
    """The file's ``n_outputs``, if it has one."""
    if "n_outputs" not in content:
        return None
    n_outputs = content["n_outputs"]
    if isinstance(n_outputs, bool) or not isinstance(n_outputs, int):
        raise ValueError(
            f"{source}, key 'n_outputs' must be an int, got {n_outputs!r}."
        )
    if n_outputs < minimum:
        raise ValueError(
            f"{source}, key 'n_outputs' is {n_outputs}, but must be at least "
            f"{minimum}; fix it or drop the key to infer it."
        )
    return n_outputs


def _classes(
    labelled: dict[str, tuple[Tensor, Tensor]], source: str, given: int | None
) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    """Long labels ``(N,)`` in ``[0, n_outputs)`` and ``n_outputs``."""
    for where, (_, y) in labelled.items():
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"{where}: classification targets must be integer labels, got dtype "
                f"{y.dtype}; convert them with y.long() (or set 'likelihood' to "
                "'regression')."
            )
        if y.ndim != 1:
            raise ValueError(
                f"{where}: classification targets must be labels of shape (N,), got "
                f"{tuple(y.shape)}; for one-hot rows use y.argmax(1)."
            )
        if y.min().item() < 0:
            raise ValueError(
                f"{where}: labels must be non-negative, got {y.min().item()}; number "
                "the classes 0, 1, ..."
            )
    n_outputs = given or 1 + max(y.max().item() for _, y in labelled.values())
    if n_outputs < 2:
        raise ValueError(
            f"{source}: every label is 0, but classification needs at least 2 "
            "classes; set 'n_outputs' or use all classes' examples."
        )
    for where, (_, y) in labelled.items():
        if y.max().item() >= n_outputs:
            raise ValueError(
                f"{where}: labels must lie in [0, {n_outputs - 1}] for n_outputs = "
                f"{n_outputs}, got {y.max().item()}; raise 'n_outputs' or drop it."
            )
    return {where: (x, y.long()) for where, (x, y) in labelled.items()}, n_outputs


def _outputs(
    labelled: dict[str, tuple[Tensor, Tensor]], source: str, given: int | None
) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    """Finite floating targets ``(N, K)``, the same ``K`` everywhere, and ``K``."""
    reshaped = {}
    for where, (x, y) in labelled.items():
        if not y.is_floating_point():
            raise ValueError(
                f"{where}: regression targets must be floating, got dtype {y.dtype}; "
                "convert them with y.float() (or set 'likelihood' to "
                "'classification')."
            )
        if y.ndim > 2:
            raise ValueError(
                f"{where}: regression targets must have shape (N,) or (N, K), got "
                f"{tuple(y.shape)}; flatten them with y.flatten(1)."
            )
        if not torch.isfinite(y).all():
            raise ValueError(f"{where}: y contains NaN or infinite values.")
        reshaped[where] = (x, y.reshape(len(y), -1))
    train_where = next(iter(reshaped))
    width = reshaped[train_where][1].shape[1]
    for where, (_, y) in reshaped.items():
        if y.shape[1] != width:
            raise ValueError(
                f"{where}: targets have {y.shape[1]} outputs per example, the "
                f"training targets {width}; give every split the same outputs."
            )
    if given is not None and given != width:
        raise ValueError(
            f"{source}, key 'n_outputs' is {given}, but the targets have {width} "
            "outputs per example; fix it or drop the key."
        )
    return reshaped, width


def _checked(content: object, source: str) -> _CheckedData:
    """A data file's dict, checked (the file named ``source`` in every message)."""
    if not isinstance(content, Mapping):
        raise ValueError(
            f"{source} holds a {type(content).__name__}, not a dict; save a dict "
            "with keys 'train' and 'test' (see save_data_file)."
        )
    unknown = [key for key in content if key not in DATA_KEYS]
    if unknown:
        raise ValueError(
            f"{source} has unknown key(s) {unknown}; the allowed keys are "
            f"{', '.join(DATA_KEYS)}."
        )
    splits = _splits(content, source)
    likelihood = _likelihood(content, source)
    if likelihood == "regression" and splits["ood"] is not None:
        raise ValueError(
            f"{source}, key 'ood': out-of-distribution inputs are only used for "
            "classification; drop the key."
        )
    name = content.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"{source}, key 'name' must be a non-empty str, got {name!r}.")
    given = _n_outputs(content, source, 2 if likelihood == "classification" else 1)
    check_targets = _classes if likelihood == "classification" else _outputs
    labelled, n_outputs = check_targets(splits["labelled"], source, given)

    def split(key: str) -> tuple[Tensor, Tensor] | None:
        return labelled.get(f"{source}, key {key!r}")

    shift = {
        kind: {strength: labelled[name] for strength, name in names.items()}
        for kind, names in splits["shift"].items()
    }
    return _CheckedData(
        train=split("train"),
        val=split("val"),
        test=split("test"),
        ood=splits["ood"],
        shift=shift,
        likelihood=likelihood,
        n_outputs=int(n_outputs),
        name=name,
    )


def _validation_split(
    train: tuple[Tensor, Tensor], likelihood: str, seed: int, source: str
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], str]:
    """A seeded :data:`VAL_FRACTION` of train as validation set (stratified if can)."""
    inputs, targets = train
    n_examples = len(inputs)
    if n_examples < 2:
        raise ValueError(
            f"{source}, key 'train' has {n_examples} example and no 'val' split to "
            "go with it; add 'val': (X, y) or more training examples."
        )
    n_val = max(1, round(VAL_FRACTION * n_examples))
    stratify = None
    if likelihood == "classification":
        counts = torch.bincount(targets)
        counts = counts[counts > 0]
        if counts.min() >= 2 and len(counts) <= min(n_val, n_examples - n_val):
            stratify = targets.numpy()
    kept, held_out = train_test_split(
        torch.arange(n_examples).numpy(),
        test_size=n_val,
        random_state=seed,
        stratify=stratify,
    )
    kept, held_out = torch.as_tensor(kept), torch.as_tensor(held_out)
    how = "stratified" if stratify is not None else "random"
    note = f"val: {how} {VAL_FRACTION:.0%} of train (seed {seed})"
    return (inputs[kept], targets[kept]), (inputs[held_out], targets[held_out]), note


def load_data_file(path: Path | str, *, seed: int = 0, batch_size: int = 64) -> Problem:
    """A user's data file (see the module's table) as a problem to evaluate on.

    Without a ``val`` split, a seeded :data:`VAL_FRACTION` of the training set
    becomes the validation set, stratified by label for classification when every
    class has two examples or more (the description says which).

    Args:
        path: The file, written by ``torch.save`` (e.g. by :func:`save_data_file`).
        seed: Seed of the validation split and of the training loader's shuffling.
        batch_size: Batch size of every loader.

    Returns:
        The problem, named by the file's ``name`` key (else the file's stem): a
        shuffled (seeded) training loader, the validation, test, OOD and shifted
        test loaders unshuffled, and its splits with classification targets long
        ``(N,)`` or regression targets float ``(N, n_outputs)``.

    Raises:
        ValueError: If the file is missing or unreadable, or its contents break a
            rule of the format (the message names the file, the key and the fix).
    """
    check_seed(seed)
    check_positive_int("batch_size", batch_size)
    path = Path(path)
    source = f"Data file {str(path)!r}"
    if not path.exists():
        raise ValueError(f"{source} does not exist; check the path.")
    if not path.is_file():
        raise ValueError(f"{source} is not a file; give the .pt file itself.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{source} cannot be read by torch.load(weights_only=True) "
            f"({_first_line(error)}); write it with torch.save of a dict of plain "
            "tensors, e.g. with ekfac_laplace.evaluation.user_inputs.save_data_file."
        ) from error
    data = _checked(content, source)
    train, val, note = data.train, data.val, "val given"
    if val is None:
        train, val, note = _validation_split(train, data.likelihood, seed, source)
    units = "classes" if data.likelihood == "classification" else "outputs"
    if data.n_outputs == 1:
        units = units[:-1]
    extras = [note]
    if data.ood is not None:
        extras.append(f"ood {len(data.ood)}")
    if data.shift:
        extras.append(f"shifts: {', '.join(data.shift)}")
    label = path.name if data.name is None else f"{data.name} ({path.name})"
    splits = DataSplits(
        train=TensorDataset(*train),
        val=TensorDataset(*val),
        test=TensorDataset(*data.test),
        likelihood=data.likelihood,
        n_outputs=data.n_outputs,
        input_shape=tuple(train[0].shape[1:]),
        description=(
            f"{label} ({data.likelihood}, {data.n_outputs} {units}): train "
            f"{len(train[0])} / val {len(val[0])} / test {len(data.test[0])}; "
            f"{'; '.join(extras)}"
        ),
    )
    ood = None
    if data.ood is not None:  # no classes: -1 labels, as the bundled OOD set has
        no_labels = torch.full((len(data.ood),), -1, dtype=torch.long)
        ood = TensorDataset(data.ood, no_labels)
    problem = problem_from_splits(
        data.name or path.stem,
        splits,
        seed=seed,
        batch_size=batch_size,
        ood=ood,
        shifted={
            kind: {strength: TensorDataset(*pair) for strength, pair in sets.items()}
            for kind, sets in data.shift.items()
        },
    )
    return problem


def save_data_file(
    path: Path | str,
    *,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None = None,
    ood: Tensor | tuple[Tensor, Tensor] | None = None,
    shift: dict[str, dict[float, tuple[Tensor, Tensor]]] | None = None,
    likelihood: str | None = None,
    n_outputs: int | None = None,
    name: str | None = None,
) -> Path:
    """Write a data file for :func:`load_data_file` (``--data``), checked first.

    The arguments are the keys of the module's table; only those given are
    written. Tensors are saved detached, on the CPU and copied (a slice is saved
    without the rest of its storage). Nothing is written if a check fails.

    Args:
        path: Where to write (parent directories are created).
        train: Training set ``(X, y)``: ``X`` of shape ``(N, *input_shape)``.
        test: Test set ``(X, y)``.
        val: Validation set ``(X, y)``; without it, :func:`load_data_file` splits
            one off the training set.
        ood: Out-of-distribution inputs ``X`` (or ``(X, y)``, ``y`` ignored);
            classification only.
        shift: Shifted test sets ``{kind: {strength: (X, y)}}``.
        likelihood: ``"classification"`` or ``"regression"``; inferred from the
            training targets' dtype if ``None``.
        n_outputs: Number of classes or outputs; inferred if ``None``.
        name: Name of the data set; the file's stem if ``None``.

    Returns:
        The path written.

    Raises:
        ValueError: If the contents break a rule of the format.
    """
    path = Path(path)
    given = {
        "train": train,
        "val": val,
        "test": test,
        "ood": ood,
        "shift": shift,
        "likelihood": likelihood,
        "n_outputs": n_outputs,
        "name": name,
    }
    content = {key: value for key, value in given.items() if value is not None}
    _checked(content, f"Data for {str(path)!r}")

    def plain(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.detach().cpu().clone()
        if isinstance(value, (tuple, list)):
            return tuple(plain(part) for part in value)
        if isinstance(value, Mapping):
            return {key: plain(part) for key, part in value.items()}
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: plain(value) for key, value in content.items()}, path)
    return path
