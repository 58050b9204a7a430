"""The ``ekfac-laplace`` command at small sizes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

import ekfac_laplace
from ekfac_laplace.evaluation import cli, models
from ekfac_laplace.evaluation.candidates import Candidate
from ekfac_laplace.evaluation.cli import COMPARE_DURATION, main
from ekfac_laplace.evaluation.settings import DEFAULT_SWEEP_GRID
from tests.evaluation.commands import QUICK, Terminal
from tests.evaluation.images import image_ok


def test_compare_digits_writes_table_files_and_plots(tmp_path, capsys):
    out = tmp_path / "results"
    status = main(
        [
            "compare",
            *QUICK,
            "--candidates",
            "map",
            "ll_kron",
            "all_ekfac",
            "--sweep",
            "none",  # the sweep's figures: test_compare_runs_a_users_model_...
            "--out",
            str(out),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "all_ekfac" in printed and "Recommended (val_nll)" in printed
    payload = json.loads((out / "results.json").read_text())
    assert [row["candidate"] for row in payload["rows"]] == [
        "map",
        "ll_kron",
        "all_ekfac",
    ]
    assert all(row["status"] == "ok" for row in payload["rows"])
    assert payload["config"]["dataset"] == "digits"
    assert payload["config"]["selection"]["candidate"] in (
        "map",
        "ll_kron",
        "all_ekfac",
    )
    record = payload["records"][2]
    for key in ("test_nll", "test_ece", "ood_auroc_entropy", "shift_rotation_nll"):
        assert isinstance(record[key], float), key
    assert set(payload["config"]["shifts"]) == {"rotation", "noise"}
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert (out / "results.md").read_text().startswith("| candidate |")
    for name in (
        "reliability",
        "confidence",
        "ood_entropy",
        "shift_rotation",
        "shift_noise",
    ):
        assert image_ok(out / f"{name}.png"), name


def test_compare_moons_gridsearch_and_toy_regression_plots(tmp_path):
    out = tmp_path / "moons"
    status = main(
        [
            "compare",
            "--dataset",
            "moons",
            *QUICK,
            "--candidates",
            "map",
            "ll_ekfac",
            "--prior-tuning",
            "gridsearch",
            "--select-by",
            "val_nll",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    assert image_ok(out / "confidence_maps.png")
    assert not (out / "shift_noise.png").exists()
    out = tmp_path / "toy"
    status = main(
        [
            "compare",
            "--dataset",
            "toy1d",
            *QUICK,
            "--candidates",
            "map",
            "all_ekfac",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    assert image_ok(out / "bands.png")
    record = json.loads((out / "results.json").read_text())["records"][1]
    assert record["test_coverage_90"] is not None
    out = tmp_path / "diabetes"
    argv = ["compare", "--dataset", "diabetes", *QUICK, "--out", str(out)]
    assert main([*argv, "--candidates", "map", "all_ekfac"]) == 0
    for name in ("coverage", "residuals"):
        assert image_ok(out / f"{name}.png"), name
    assert not (out / "bands.png").exists()  # 10-D inputs: no 1-D bands


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["compare", "--model", "cnn", "--dataset", "moons"],
            "needs an image data set",
        ),
        (["compare", "--candidates", "all_block"], "Unknown candidate 'all_block'"),
        (
            ["compare", "--candidates", "all_ekfac", "all_lowrank"],
            "'all_lowrank' is not offered",
        ),
        (["compare", "--candidates", "ll_lowrank"], "diag, kron, ekfac, full"),
        (["compare", "--candidates", "map", "map"], "lists a candidate twice"),
        (["compare", "--epochs", "-1"], "expected a non-negative integer, got -1"),
        (["compare", "--epochs", "0"], "--epochs 0 would evaluate an untrained mlp"),
        (["compare", "--data", "missing.pt"], "--data missing.pt is not a file"),
        (["compare", "--model", "resnet"], "neither a reference model"),
        (["compare", "--model", "no_such_module:build"], "no_such_module"),
        (["compare", "--val-tolerance", "-1"], "non-negative finite number"),
        (["compare", "--candidates", "ensemble1"], "M ≥ 2"),
        (["compare", "--candidates", "all_ekfac@often"], "Unknown prior tuning"),
        (
            ["compare", "--prior-structure", "layerwise"],
            "--prior-tuning validation tunes a scalar prior",
        ),
        (["compare", "--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["compare", "--checkpoint", "missing.pt"], "is not a file"),
        (
            [
                "compare",
                "--prior-tuning",
                "gridsearch",
                "--prior-structure",
                "layerwise",
            ],
            "tunes a scalar prior",
        ),
        (["sample", "--prior-tuning", "gridsearch"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err


def test_console_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "ekfac_laplace.evaluation.cli", "compare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--candidates" in result.stdout and COMPARE_DURATION in result.stdout
    assert "lowrank" not in result.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert (
        capsys.readouterr().out.strip() == f"ekfac-laplace {ekfac_laplace.__version__}"
    )


TINY = ["--dataset", "moons", "--epochs", "3", "--no-plots"]


def test_exit_status_1_when_every_laplace_candidate_fails(
    tmp_path, monkeypatch, capsys
):
    def fail(self, *args, **kwargs):
        raise RuntimeError(f"no curvature for {self.name}")

    monkeypatch.setattr(Candidate, "build", fail)
    argv = ["compare", *TINY, "--quiet", "--out", str(tmp_path)]
    status = main([*argv, "--candidates", "map", "ll_kron", "all_ekfac"])
    assert status == 1
    captured = capsys.readouterr()
    tail = captured.out.strip().splitlines()[-3:]
    assert tail == [
        "Failed candidates (2 of 3):",
        "  ll_kron: RuntimeError: no curvature for ll_kron",
        "  all_ekfac: RuntimeError: no curvature for all_ekfac",
    ]
    assert "no Laplace candidate succeeded" in captured.err
    # Only the MAP asked for: nothing failed, nothing to complain about.
    assert main([*argv, "--candidates", "map"]) == 0


def test_some_failed_candidates_are_listed_at_the_end(tmp_path, monkeypatch, capsys):
    build = Candidate.build

    def fail_kron(self, *args, **kwargs):
        if self.hessian_structure == "kron":
            raise MemoryError("too big")
        return build(self, *args, **kwargs)

    monkeypatch.setattr(Candidate, "build", fail_kron)
    argv = ["compare", *TINY, "--quiet", "--out", str(tmp_path)]
    assert main([*argv, "--candidates", "ll_kron", "ll_ekfac"]) == 0
    tail = capsys.readouterr().out.strip().splitlines()[-2:]
    assert tail == ["Failed candidates (1 of 2):", "  ll_kron: MemoryError: too big"]


def test_commands_write_into_their_own_default_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    progress = []
    real_compare, real_train = cli.compare, models.train_map

    def spy_compare(*args, settings, **kwargs):
        progress.append(settings.progress_bar)
        return real_compare(*args, settings=settings, **kwargs)

    def spy_train(*args, progress_bar, **kwargs):
        progress.append(progress_bar)
        return real_train(*args, progress_bar=progress_bar, **kwargs)

    monkeypatch.setattr(cli, "compare", spy_compare)
    monkeypatch.setattr(models, "train_map", spy_train)
    # Not --quiet: the bars are off because the output is not a terminal.
    assert main(["compare", *TINY, "--candidates", "map", "ll_ekfac"]) == 0
    assert main(["sample", *TINY, "--n-samples", "20"]) == 0
    root = tmp_path / "ekfac-laplace-results"
    assert (root / "compare" / "moons" / "results.json").is_file()
    assert (root / "sample" / "moons" / "samples.json").is_file()
    assert not list(root.glob("*.json"))
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "step/s" not in err
    assert progress == [False, False, False, False]


def test_on_a_terminal_the_command_shows_one_progress_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", stderr := Terminal())
    argv = [
        "compare",
        *TINY,
        "--candidates",
        "map",
        "all_ekfac",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    bars = stderr.getvalue()
    assert "ekfac-laplace compare" in bars and "candidate all_ekfac" in bars
    assert "3/3" in bars  # the MAP training and two candidates
    # Nothing inside draws its own bar: MAP training, the fit, the prior tuning.
    for inner in ("Training MAP", "Candidates", "Hessian", "EKFAC", "marginal"):
        assert inner not in bars, inner


class _Evil:
    """A pickle that would run a command when unpickled without weights_only."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--checkpoint", "junk.pt"], "not a state_dict of tensors"),
        (["compare", "--checkpoint", "evil.pt"], "not a state_dict of tensors"),
        (["compare", "--out", "junk.pt/results"], "junk.pt is a file, not a folder"),
        (["compare", "--out", ""], "expected a path, got an empty string"),
        (["compare", "--save-checkpoint", "."], "is a folder; give a file name"),
        (
            ["compare", "--save-checkpoint", "junk.pt/map.pt"],
            "junk.pt is a file, not a folder",
        ),
        (["compare", "--seed", "-1"], "expected a seed from 0 to 2**32 - 1"),
        (["compare", "--seed", "1e23"], "expected an integer, got '1e23'"),
        (["compare", "--seed", str(10**23)], "expected a seed from 0"),
        (["sample", "--n-samples", "1"], "needs at least 2"),
    ],
)
def test_unusable_files_and_values_are_refused_before_any_work(
    argv, message, tmp_path, monkeypatch, capsys
):
    """Exit 2 with one line, before training (the table would be lost after)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 3)
    torch.save(_Evil(str(tmp_path / "marker")), tmp_path / "evil.pt")
    for module in ("cli", "sample_command"):
        monkeypatch.setattr(
            f"ekfac_laplace.evaluation.{module}.problem_and_model",
            lambda *args: pytest.fail("work started"),
        )
    try:
        status = main([*argv, "--quiet"])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "junk.pt"]


USER_MODELS = """
import torch
from torch import nn


def build(input_shape, n_outputs, dropout=0.0):
    layers = [nn.Flatten(), nn.Linear(input_shape[0], 16), nn.Tanh()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(16, n_outputs))


def trained():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))
"""


def _user_files(tmp_path, likelihood="classification"):
    from ekfac_laplace.evaluation.user_inputs import save_data_file

    (tmp_path / "my_models.py").write_text(USER_MODELS)
    generator = torch.Generator().manual_seed(0)

    def split(n):
        X = torch.randn(n, 4, generator=generator)
        if likelihood == "classification":
            return X, (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
        return X, X[:, :1].sin() + 0.1 * torch.randn(n, 1, generator=generator)

    extra = {"ood": 4 * torch.randn(20, 4, generator=generator)}
    if likelihood == "regression":
        extra = {}
    return save_data_file(
        tmp_path / "my_data.pt",
        train=split(80),
        val=split(30),
        test=split(40),
        shift={"scaled": {2.0: split(40)}} if likelihood == "classification" else None,
        **extra,
    )


def test_compare_runs_a_users_model_and_data_in_one_command(
    tmp_path, monkeypatch, capsys
):
    data = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    status = main(
        [
            "compare",
            "--data",
            str(data),
            "--model",
            "my_models:build",
            "--epochs",
            "5",
            "--quiet",
            "--candidates",
            "map",
            "map_ts",
            "ensemble2",
            "mc_dropout",
            "all_ekfac",
            "all_ekfac@marglik",
        ]
    )
    assert status == 0, capsys.readouterr()
    out = tmp_path / "ekfac-laplace-results" / "compare" / "my_data"
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["dataset"] == "my_data"
    assert payload["config"]["data_file"] == str(data)
    rows = {row["candidate"]: row for row in payload["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["all_ekfac"]["prior_tuning"] == "validation"
    assert rows["all_ekfac@marglik"]["prior_tuning"] == "marglik"
    assert "ood_auroc_entropy" in payload["records"][0]
    assert "shift_scaled_nll" in payload["records"][0]
    assert len(rows["all_ekfac"]["sweep"]) == len(DEFAULT_SWEEP_GRID)
    for name in ("prior_tradeoff", "prior_sweep", "reliability"):
        assert image_ok(out / f"{name}.png"), name


def test_a_trained_user_model_as_it_comes_and_regression_data(
    tmp_path, monkeypatch, capsys
):
    data = _user_files(tmp_path, "regression")
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--data", str(data), "--quiet", "--no-plots"]
    argv += ["--model", f"{tmp_path / 'my_models.py'}:build", "--epochs", "3"]
    assert main([*argv, "--candidates", "map", "map_ts", "ll_ekfac"]) == 0
    printed = capsys.readouterr().out
    assert "my_data.pt (regression" in printed
    # --epochs 0 takes the network as its function returns it: no training
    data = _user_files(tmp_path)
    argv = ["compare", "--data", str(data), "--model", "my_models:trained"]
    argv += ["--epochs", "0", "--quiet", "--no-plots", "--out", str(tmp_path / "o")]
    assert main([*argv, "--candidates", "map", "all_ekfac", "ensemble2"]) == 0
    payload = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {row["candidate"]: row for row in payload["rows"]}
    assert rows["all_ekfac"]["status"] == "ok"
    assert "--epochs 0 takes the MAP network as it comes" in rows["ensemble2"]["error"]


def test_user_inputs_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    data = _user_files(tmp_path)
    (tmp_path / "junk.pt").write_text("not a tensor file")
    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (["--data", "junk.pt"], "--data: Data file"),
        (["--data", str(data), "--dataset", "digits"], "give one"),
        (["--data", str(data), "--model", "my_models:missing"], "missing"),
        (["--data", str(data), "--model", "cnn"], "--model cnn"),
    ):
        assert main(["compare", "--quiet", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
