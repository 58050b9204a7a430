"""The ``ekfac-laplace`` command at small sizes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import matplotlib.image
import pytest

from ekfac_laplace.evaluation.cli import main

QUICK = ["--epochs", "3", "--quiet"]


def _image_ok(path) -> bool:
    image = matplotlib.image.imread(path)
    return image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 0


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
            "--out",
            str(out),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "all_ekfac" in printed and "Recommended (evidence)" in printed
    payload = json.loads((out / "results.json").read_text())
    assert [row["candidate"] for row in payload["rows"]] == [
        "map",
        "ll_kron",
        "all_ekfac",
    ]
    assert all(row["status"] == "ok" for row in payload["rows"])
    assert payload["config"]["dataset"] == "digits"
    assert payload["config"]["selection"]["candidate"] in ("ll_kron", "all_ekfac")
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
        assert _image_ok(out / f"{name}.png"), name


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
    assert _image_ok(out / "confidence_maps.png")
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
    assert _image_ok(out / "bands.png")
    record = json.loads((out / "results.json").read_text())["records"][1]
    assert record["test_coverage_90"] is not None


def test_checkpoint_round_trip_gives_the_same_results(tmp_path):
    common = ["compare", "--dataset", "moons", "--quiet", "--no-plots"]
    common += ["--candidates", "all_ekfac"]
    checkpoint = tmp_path / "map.pt"
    assert (
        main(
            [*common, "--epochs", "3", "--save-checkpoint", str(checkpoint)]
            + ["--out", str(tmp_path / "a")]
        )
        == 0
    )
    assert (
        main([*common, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")])
        == 0
    )
    first, second = (
        json.loads((tmp_path / name / "results.json").read_text())["records"][0]
        for name in ("a", "b")
    )
    # Same weights; the float32 sums over a reshuffled loader differ in rounding.
    assert first["log_marginal_likelihood"] == pytest.approx(
        second["log_marginal_likelihood"], rel=1e-4
    )
    assert first["test_nll"] == pytest.approx(second["test_nll"], rel=1e-4)


def test_sample_writes_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "samples"
    status = main(
        [
            "sample",
            "--dataset",
            "moons",
            *QUICK,
            "--n-samples",
            "400",
            "--save-samples",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    summary = json.loads((out / "samples.json").read_text())
    assert set(summary["test_metrics"]) == {"map", "glm", "samples"}
    # 400 samples: the relative error of a variance estimate is ~sqrt(2/399) = 0.07.
    assert summary["sample_variance_relative_error_median"] < 0.15
    assert 0.04 < summary["sample_variance_relative_error_expected_median"] < 0.05
    assert summary["sample_mean_error_in_std"] < 0.2
    assert _image_ok(out / "samples.png")
    import torch

    samples = torch.load(out / "samples.pt")
    assert samples.shape == (400, summary["n_params"])
    assert "sample variance vs analytic" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["compare", "--model", "cnn", "--dataset", "moons"],
            "needs an image data set",
        ),
        (["compare", "--candidates", "all_block"], "Unknown candidate 'all_block'"),
        (["compare", "--candidates", "map", "map"], "lists a candidate twice"),
        (["compare", "--epochs", "0"], "expected a positive integer, got 0"),
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


def test_wrong_checkpoint_is_a_usage_error(tmp_path, capsys):
    checkpoint = tmp_path / "moons.pt"
    main(
        [
            "compare",
            "--dataset",
            "moons",
            *QUICK,
            "--no-plots",
            "--candidates",
            "map",
            "--save-checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    capsys.readouterr()
    status = main(["compare", "--checkpoint", str(checkpoint), "--out", str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load --checkpoint" in err and len(err.splitlines()) == 1


def test_console_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "ekfac_laplace.evaluation.cli", "compare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--candidates" in result.stdout and "two minutes" in result.stdout
