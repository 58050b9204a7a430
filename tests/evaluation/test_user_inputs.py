"""A user's model function and data file: loading, calling, checking."""

from __future__ import annotations

import sys
import textwrap
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.data import RandomSampler, SequentialSampler

from ekfac_laplace.evaluation.user_inputs import (
    DATA_KEYS,
    build_user_model,
    load_data_file,
    load_model_function,
    save_data_file,
)

MODELS = """
from torch import nn

from user_models_helper import WIDTH  # a sibling module


def build(input_shape, n_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], n_outputs))


def _private():
    return None


NUMBER = 3
Linear = nn.Linear
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """``tmp_path`` as the current directory, with a model module and its helper;
    every module imported from it is forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_models_helper.py").write_text("WIDTH = 8\n")
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith(("user_models", "_ekfac_laplace_user_model_")):
            del sys.modules[name]


def write_module(directory, name, source):
    path = directory / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


# ------------------------------------------------------------ load_model_function


def test_a_module_in_the_current_directory_loads_by_name(workdir):
    write_module(workdir, "user_models_by_name", MODELS)
    path_before = list(sys.path)
    build = load_model_function("user_models_by_name:build")
    assert sys.path == path_before
    model = build_user_model(build, (4,), 3)
    assert model(torch.zeros(2, 4)).shape == (2, 3)


def test_a_file_loads_by_path_relative_or_absolute(workdir):
    path = write_module(workdir / "nets", "models", MODELS)
    (workdir / "nets" / "user_models_helper.py").write_text("WIDTH = 8\n")
    path_before = list(sys.path)
    relative = load_model_function("nets/models.py:build")
    absolute = load_model_function(f"{path}:build")
    assert sys.path == path_before
    assert relative is not absolute  # each load runs the file as a fresh module
    assert isinstance(build_user_model(relative, (4,), 2), nn.Sequential)


def test_a_class_is_a_model_function(workdir):
    write_module(workdir, "user_models_class", MODELS)
    linear = load_model_function("user_models_class:Linear")
    assert linear is nn.Linear


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("user_models_errors", r"names no function; write module:function"),
        (":build", "has an empty part; write module:function"),
        ("user_models_errors: ", "has an empty part"),
        ("missing.py:build", r"Model file 'missing.py' .* does not exist"),
        ("nets/models:build", r"looks like a path but does not end in \.py"),
        ("no_such_module_xyz:build", r"Cannot find module 'no_such_module_xyz'"),
        ("no_such_package_xyz.models:build", r"Cannot find module 'no_such_pack"),
        (
            "user_models_raising:build",
            r"Importing 'user_models_raising' .* raised RuntimeError: no GPU here;",
        ),
        (
            "user_models_missing_dependency:build",
            r"raised ModuleNotFoundError: No module named 'not_installed_xyz'",
        ),
        ("user_models_raising.py:build", r"Running model file .* raised RuntimeError"),
        (
            "user_models_errors:biuld",
            r"no attribute 'biuld'; its public callables: build, Linear\. Write "
            r"user_models_errors:<one of them>",
        ),
        ("user_models_errors:NUMBER", r"NUMBER is not callable \(a int object\)"),
    ],
)
def test_model_spec_errors(workdir, spec, match):
    write_module(workdir, "user_models_errors", MODELS)
    write_module(workdir, "user_models_raising", "raise RuntimeError('no GPU here')")
    write_module(workdir, "user_models_missing_dependency", "import not_installed_xyz")
    path_before = list(sys.path)
    with pytest.raises(ValueError, match=match):
        load_model_function(spec)
    assert sys.path == path_before


def test_at_most_ten_callables_are_listed(workdir):
    source = "".join(f"def f{i:02d}():\n    pass\n" for i in range(12))
    write_module(workdir, "user_models_many", source)
    with pytest.raises(ValueError, match=r"f00, .*, f09 and 2 more\."):
        load_model_function("user_models_many:g")


# --------------------------------------------------------------- build_user_model


class Recorder(nn.Module):
    def __init__(self, **keywords):
        super().__init__()
        self.keywords = keywords
        self.linear = nn.Linear(3, 2)


def no_arguments():
    return nn.Linear(3, 2)


def only_outputs(n_outputs):
    return nn.Linear(3, n_outputs)


def with_dropout(input_shape, n_outputs, dropout=0.0):
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(input_shape[0], n_outputs))


def test_the_function_gets_the_keywords_it_takes():
    assert build_user_model(no_arguments, (3,), 5).out_features == 2
    assert build_user_model(only_outputs, (3,), 5).out_features == 5
    recorded = build_user_model(Recorder, [1, 8, 8], 10).keywords
    assert recorded == {"input_shape": (1, 8, 8), "n_outputs": 10}
    recorded = build_user_model(Recorder, (2,), 1, dropout=0.25).keywords
    assert recorded == {"input_shape": (2,), "n_outputs": 1, "dropout": 0.25}
    model = build_user_model(with_dropout, (4,), 3, dropout=0.1)
    assert model[0].p == 0.1


def test_the_initialisation_is_seeded_and_the_global_state_kept():
    state = torch.get_rng_state()
    first = build_user_model(with_dropout, (4,), 3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = build_user_model(with_dropout, (4,), 3, seed=7)
    other = build_user_model(with_dropout, (4,), 3, seed=8)
    assert torch.equal(first[1].weight, again[1].weight)
    assert not torch.equal(first[1].weight, other[1].weight)


class Unreadable:
    __signature__ = "not a signature"

    def __call__(self):
        return nn.Linear(3, 2)


def raising(input_shape, n_outputs):
    raise RuntimeError("width 0\nsecond line")


@pytest.mark.parametrize(
    ("function", "keywords", "error", "match"),
    [
        (
            only_outputs,
            {"dropout": 0.1},
            ValueError,
            r"MC dropout needs a model function with a 'dropout' parameter; "
            r".*only_outputs has none",
        ),
        (
            raising,
            {},
            ValueError,
            r"Model function .*:raising raised RuntimeError: width 0 when called "
            r"with \{'input_shape': \(3,\), 'n_outputs': 2\}; fix",
        ),
        (lambda n_outputs: "a net", {}, TypeError, r"returned a str, not a torch"),
        (
            lambda n_outputs, hidden: None,
            {},
            ValueError,
            r"requires \['hidden'\], which the command line cannot give",
        ),
        (with_dropout, {"dropout": 1.0}, ValueError, r"dropout must lie in \[0, 1\)"),
        (with_dropout, {"seed": -1}, ValueError, r"seed must lie in \[0, 2\*\*32\)"),
        (Unreadable(), {}, ValueError, "Cannot read the signature"),
    ],
)
def test_model_function_errors(function, keywords, error, match):
    with pytest.raises(error, match=match) as raised:
        build_user_model(function, (3,), 2, **keywords)
    assert "second line" not in str(raised.value)
    if function is raising:
        assert isinstance(raised.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("input_shape", "n_outputs", "match"),
    [
        ((3,), 0, "n_outputs must be at least 1"),
        ((), 2, r"input_shape must be one or more positive ints, got \(\)"),
        ((3, 0), 2, r"input_shape must be one or more positive ints, got \(3, 0\)"),
        ((3.0,), 2, "input_shape must be one or more positive ints"),
    ],
)
def test_bad_sizes_are_refused(input_shape, n_outputs, match):
    with pytest.raises(ValueError, match=match):
        build_user_model(no_arguments, input_shape, n_outputs)


# ------------------------------------------------------------------- data files


def classification(n=40, counts=(20, 10, 10), features=4, dtype=torch.int32):
    """Distinct rows (first feature = row index + offset) and labels by counts."""
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    inputs = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, features)
    return inputs, labels[:n].to(dtype)


def regression(n=30, outputs=None, features=3, offset=0.0):
    inputs = torch.linspace(-1, 1, n)[:, None].repeat(1, features) + offset
    targets = inputs.sum(1) if outputs is None else inputs[:, :outputs] ** 2
    return inputs, targets


def test_classification_round_trip_splits_off_a_stratified_validation_set(tmp_path):
    train, test = classification(), classification(12, (4, 4, 4))
    path = save_data_file(tmp_path / "my_data.pt", train=train, test=test)
    assert set(torch.load(path, weights_only=True)) == {"train", "test"}
    problem = load_data_file(path, seed=3, batch_size=16)
    splits = problem.splits
    assert problem.name == "my_data" and problem.likelihood == "classification"
    assert (splits.n_outputs, splits.input_shape) == (3, (4,))
    assert splits.description == (
        "my_data.pt (classification, 3 classes): train 32 / val 8 / test 12; "
        "val: stratified 20% of train (seed 3)"
    )
    (x_train, y_train), (x_val, y_val) = splits.train.tensors, splits.val.tensors
    assert y_train.dtype == y_val.dtype == splits.test.tensors[1].dtype == torch.long
    rows_train, rows_val = set(x_train[:, 0].tolist()), set(x_val[:, 0].tolist())
    assert not rows_train & rows_val and len(rows_train | rows_val) == 40
    assert Counter(y_val.tolist()) == {0: 4, 1: 2, 2: 2}
    assert isinstance(problem.train_loader.sampler, RandomSampler)
    assert isinstance(problem.val_loader.sampler, SequentialSampler)
    assert problem.train_loader.batch_size == 16
    assert problem.ood_loader is None and problem.shift_loaders == {}
    again = load_data_file(path, seed=3).splits.val.tensors[0]
    other = load_data_file(path, seed=4).splits.val.tensors[0]
    assert torch.equal(again, x_val) and not torch.equal(other, x_val)


def test_a_class_with_one_example_gives_a_random_validation_split(tmp_path):
    train = classification(11, (10, 1))
    path = save_data_file(tmp_path / "d.pt", train=train, test=train, name="tiny")
    problem = load_data_file(path)
    assert problem.name == "tiny"
    assert problem.splits.description.startswith(
        "tiny (d.pt) (classification, 2 classes): train 9 / val 2"
    )
    assert "val: random 20% of train" in problem.splits.description


def test_regression_round_trip_with_a_validation_set(tmp_path):
    path = save_data_file(
        tmp_path / "reg.pt", train=regression(), val=regression(5), test=regression(7)
    )
    splits = load_data_file(path).splits
    assert (splits.likelihood, splits.n_outputs, splits.input_shape) == (
        "regression",
        1,
        (3,),
    )
    assert splits.description == (
        "reg.pt (regression, 1 output): train 30 / val 5 / test 7; val given"
    )
    for split in (splits.train, splits.val, splits.test):
        assert split.tensors[1].dtype == torch.float32
        assert split.tensors[1].shape == (len(split), 1)


def test_regression_with_several_outputs_and_explicit_keys(tmp_path):
    path = save_data_file(
        tmp_path / "two.pt",
        train=regression(20, outputs=2),
        test=regression(6, outputs=2),
        likelihood="regression",
        n_outputs=2,
    )
    splits = load_data_file(path).splits
    assert splits.n_outputs == 2 and splits.val.tensors[1].shape == (4, 2)
    assert "(regression, 2 outputs): train 16 / val 4 / test 6" in splits.description


def test_shift_and_ood_loaders(tmp_path):
    test = classification(12, (4, 4, 4))
    shifted = (test[0] + 0.5, test[1])
    path = save_data_file(
        tmp_path / "s.pt",
        train=classification(),
        test=test,
        ood=torch.rand(5, 4),
        shift={"noise": {0.5: shifted, 1: shifted}, "blur": {2.0: shifted}},
        n_outputs=4,
    )
    problem = load_data_file(path, batch_size=8)
    assert problem.splits.n_outputs == 4
    assert {k: sorted(v) for k, v in problem.shift_loaders.items()} == {
        "noise": [0.5, 1.0],
        "blur": [2.0],
    }
    inputs, labels = next(iter(problem.shift_loaders["noise"][0.5]))
    assert torch.equal(inputs, shifted[0][:8]) and labels.dtype == torch.long
    inputs, labels = next(iter(problem.ood_loader))
    assert inputs.shape == (5, 4) and labels.tolist() == [-1] * 5
    assert "ood 5; shifts: noise, blur" in problem.splits.description
    data = problem.evaluation_data()
    assert data.ood_loader is problem.ood_loader


def test_ood_labels_are_ignored(tmp_path):
    ood = (torch.rand(3, 4), torch.tensor([7, 8, 9]))
    path = save_data_file(
        tmp_path / "o.pt", train=classification(), test=classification(), ood=ood
    )
    assert next(iter(load_data_file(path).ood_loader))[1].tolist() == [-1] * 3


def test_a_saved_slice_keeps_only_its_rows(tmp_path):
    inputs, labels = classification()
    big = torch.zeros(100_000, 4)
    path = save_data_file(
        tmp_path / "slice.pt", train=(big[:40], labels), test=(inputs, labels)
    )
    assert path.stat().st_size < 100_000


def train_test(**extra):
    return {"train": classification(), "test": classification(12, (4, 4, 4)), **extra}


def reg_train_test(**extra):
    return {"train": regression(), "test": regression(6), **extra}


X, Y = classification()
CONTENT_ERRORS = [
    ("not_a_dict", lambda: [X, Y], r"holds a list, not a dict"),
    (
        "unknown_key",
        lambda: train_test(labels=Y),
        r"unknown key\(s\) \['labels'\]; the allowed keys are train, val, test",
    ),
    ("no_test", lambda: {"train": (X, Y)}, r"has no 'test' split; add 'test'"),
    ("one_tensor", lambda: train_test(train=X), r"'train' must be a pair \(X, y\)"),
    (
        "triple",
        lambda: train_test(val=(X, Y, Y)),
        r"'val' must be a pair .* got a tuple of \(Tensor, Tensor, Tensor\)",
    ),
    ("rows", lambda: train_test(test=(X, Y[:-1])), r"X has 40 rows but y has shape"),
    ("empty", lambda: train_test(test=(X[:0], Y[:0])), r"'test' is empty \(0 rows\)"),
    ("int_inputs", lambda: train_test(train=(X.long(), Y)), r"with X\.float\(\)"),
    ("1d_inputs", lambda: train_test(train=(X[:, 0], Y)), r"X\.unsqueeze\(1\)"),
    ("nan_inputs", lambda: train_test(test=(X * torch.nan, Y)), r"NaN or infinite"),
    (
        "input_shapes",
        lambda: train_test(test=(X[:, :3], Y)),
        r"'test': inputs have shape \(3,\) per example, but the training inputs "
        r"\(4,\)",
    ),
    (
        "float_labels",
        lambda: train_test(test=(X, Y.float())),
        r"'test': classification targets must be integer labels.*y\.long\(\)",
    ),
    (
        "2d_labels",
        lambda: train_test(val=(X, Y[:, None])),
        r"'val': classification targets must be labels of shape \(N,\)",
    ),
    ("negative", lambda: train_test(val=(X, Y - 1)), r"'val': labels must be non-neg"),
    (
        "label_range",
        lambda: train_test(n_outputs=2),
        r"'train': labels must lie in \[0, 1\] for n_outputs = 2, got 2",
    ),
    ("one_class", lambda: {"train": (X, Y * 0), "test": (X, Y * 0)}, "2 classes"),
    ("bool_labels", lambda: train_test(train=(X, Y > 0)), r"dtype torch\.bool"),
    (
        "int_regression",
        lambda: train_test(likelihood="regression"),
        r"'train': regression targets must be floating.*y\.float\(\)",
    ),
    (
        "regression_width",
        lambda: reg_train_test(test=regression(6, outputs=2)),
        r"'test': targets have 2 outputs per example, the training targets 1",
    ),
    (
        "regression_3d",
        lambda: reg_train_test(test=(regression(40)[0], torch.zeros(40, 1, 1))),
        r"\(N,\) or \(N, K\), got \(40, 1, 1\)",
    ),
    (
        "regression_n_outputs",
        lambda: reg_train_test(n_outputs=2),
        r"'n_outputs' is 2, but the targets have 1 outputs",
    ),
    (
        "regression_ood",
        lambda: reg_train_test(ood=regression()[0]),
        r"'ood': out-of-distribution inputs are only used for classification",
    ),
    (
        "likelihood",
        lambda: train_test(likelihood="binary"),
        r"'likelihood' is 'binary'; choose one of",
    ),
    (
        "n_outputs_type",
        lambda: train_test(n_outputs=3.0),
        r"'n_outputs' must be an int",
    ),
    ("n_outputs_small", lambda: train_test(n_outputs=1), r"must be at least 2"),
    ("name", lambda: train_test(name=""), r"'name' must be a non-empty str"),
    ("shift_type", lambda: train_test(shift=[X, Y]), r"'shift' must be a dict"),
    (
        "shift_strength",
        lambda: train_test(shift={"noise": {"high": (X, Y)}}),
        r"strength 'high' must be a number",
    ),
    (
        "shift_empty",
        lambda: train_test(shift={"noise": {}}),
        r"'shift'\['noise'\] has no strengths",
    ),
    (
        "shift_pair",
        lambda: train_test(shift={"noise": {0.5: (X, Y[:3])}}),
        r"key 'shift'\['noise'\]\[0\.5\]: X has 40 rows",
    ),
    ("ood_ints", lambda: train_test(ood=X.long()), r"'ood': X has dtype torch\.int64"),
    ("ood_shape", lambda: train_test(ood=X[:, :2]), r"'ood': inputs have shape \(2,\)"),
    ("ood_type", lambda: train_test(ood=3), r"'ood' must be a tensor X"),
    (
        "one_example",
        lambda: {"train": (X[:1], Y[:1] + 1), "test": (X, Y)},
        r"'train' has 1 example and no 'val' split",
    ),
]


@pytest.mark.parametrize(
    ("case", "make", "match"), CONTENT_ERRORS, ids=[case[0] for case in CONTENT_ERRORS]
)
def test_data_file_errors_name_the_file_and_the_key(tmp_path, case, make, match):
    path = tmp_path / "bad.pt"
    content = make()
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"Data file '.*bad\.pt'.*" + match):
        load_data_file(path)
    saveable = (
        isinstance(content, dict)
        and set(content) <= set(DATA_KEYS)
        and {"train", "test"} <= set(content)
    )
    if saveable and case != "one_example":  # the split happens on loading
        target = tmp_path / "new" / "bad.pt"
        with pytest.raises(ValueError, match=match):
            save_data_file(target, **content)
        assert not target.parent.exists()  # nothing written


@pytest.mark.parametrize(
    ("make_path", "match"),
    [
        (lambda tmp: tmp / "absent.pt", r"'.*absent\.pt' does not exist"),
        (lambda tmp: tmp, r"is not a file; give the \.pt file itself"),
        (
            lambda tmp: tmp / "text.pt",
            r"cannot be read by torch\.load\(weights_only=True\) .*torch\.save of a "
            r"dict of plain tensors.*save_data_file",
        ),
        (
            lambda tmp: tmp / "numpy.pt",
            r"cannot be read by torch\.load\(weights_only=True\) \(UnpicklingError",
        ),
    ],
)
def test_unreadable_data_files(tmp_path, make_path, match):
    (tmp_path / "text.pt").write_text("X, y\n1, 2\n")
    torch.save({"train": (X.numpy(), Y.numpy())}, tmp_path / "numpy.pt")
    with pytest.raises(ValueError, match=match):
        load_data_file(make_path(tmp_path))
