"""Every example script runs (at small sizes), prints its summary and its figures."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.image
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMALL_ARGUMENTS = {
    "example_quickstart.py": [
        *("--n-train", "200", "--n-test", "200", "--hidden", "16", "--epochs", "2"),
    ],
    "example_regression.py": ["--n-train", "30", "--hidden", "8", "--epochs", "20"],
    "example_classification_2d.py": [
        *("--n-train", "40", "--hidden", "8", "--epochs", "3"),
        *("--resolution", "20"),
    ],
    "example_calibration.py": [
        *("--n-train", "100", "--n-test", "60", "--hidden", "8", "--epochs", "2"),
    ],
    "example_sampling.py": [
        *("--hidden", "8", "--epochs", "2"),
        *("--n-samples", "50", "--n-predictive-samples", "5"),
    ],
    "example_distributed.py": ["--hidden", "8", "--epochs", "2"],
    "example_own_data.py": ["--epochs", "3"],
    "example_continual.py": [
        *("--n-train", "60", "--hidden", "8", "--epochs", "2"),
        *("--strengths", "1"),
    ],
    "example_lora_transformer.py": [
        *("--n-train", "60", "--n-test", "40", "--n-base", "60", "--hidden", "8"),
        *("--layers", "1", "--rank", "2", "--epochs", "1", "--base-epochs", "1"),
    ],
    "example_laplace_lora.py": [
        *("--n-train", "60", "--n-test", "40", "--n-base", "60", "--width", "8"),
        *("--heads", "2", "--layers", "1", "--rank", "2", "--epochs", "1"),
        *("--base-epochs", "1"),
    ],
}

#: Substrings each script's standard output must contain.
EXPECTED_OUTPUT = {
    "example_quickstart.py": ("all ekfac", "acc"),
    "example_regression.py": ("EKFAC", "cov90", "std_gap"),
    "example_classification_2d.py": ("all EKFAC", "LL EKFAC", "max_prob@r=10"),
    "example_calibration.py": ("all KFAC", "brier", "Rotated test set: ece"),
    "example_sampling.py": ("last-layer bias", "marginal variances", "NN samples"),
    "example_continual.py": ("A's eigenbasis kept: True", "after B, Laplace s=1"),
    "example_distributed.py": ("1 process: N = 1077", "test set: accuracy"),
    "example_own_data.py": (
        "Breast cancer (your classifier)",
        "Diabetes (your regression model)",
        "all_ekfac@marglik",
        "ekfac-laplace compare --data",
    ),
    "example_lora_transformer.py": (
        "fitted and tuned: LoRA-KFAC, LoRA-EKFAC, LL-EKFAC",
        "shifted test set",
    ),
    "example_laplace_lora.py": (
        "4 answer tokens at the last prompt token",
        "LoRA-EKFAC",
        "shifted test set",
    ),
}

#: Figures each script writes by default, relative to the working directory.
EXPECTED_FIGURES = {
    "example_quickstart.py": (),
    "example_regression.py": ("example-output/regression/regression_bands.png",),
    "example_classification_2d.py": (
        "example-output/classification_2d/confidence_maps.png",
    ),
    "example_calibration.py": (
        "example-output/calibration/reliability.png",
        "example-output/calibration/rotation.png",
    ),
    "example_sampling.py": ("example-output/sampling/sampling.png",),
    "example_continual.py": ("example-output/continual/continual.png",),
    "example_distributed.py": (),
    "example_own_data.py": (),
    "example_lora_transformer.py": ("example-output/lora_transformer/reliability.png",),
    "example_laplace_lora.py": ("example-output/laplace_lora/reliability.png",),
}


def test_every_example_has_small_arguments():
    scripts = sorted(p.name for p in EXAMPLES.glob("example_*.py"))
    assert scripts and set(scripts) == set(SMALL_ARGUMENTS)
    assert set(EXPECTED_OUTPUT) == set(SMALL_ARGUMENTS) == set(EXPECTED_FIGURES)


@pytest.mark.parametrize("script", sorted(SMALL_ARGUMENTS))
def test_example_runs(script: str, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # figures go to ./example-output/ by default
    monkeypatch.setattr(sys, "argv", [script, *SMALL_ARGUMENTS[script]])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    for expected in EXPECTED_OUTPUT[script]:
        assert expected in out, expected
    for figure in EXPECTED_FIGURES[script]:
        image = matplotlib.image.imread(tmp_path / figure)
        assert image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 0


def test_example_out_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(EXAMPLES / "example_regression.py"))
    out = tmp_path / "figures"
    namespace["main"]([*SMALL_ARGUMENTS["example_regression.py"], "--out", str(out)])
    assert (out / "regression_bands.png").is_file()
    assert not (tmp_path / "example-output").exists()


#: Peak resident memory allowed for an example or the CLI at its defaults: an 8 GB
#: laptop must run them (torch's CUDA build alone takes about 1 GB when imported).
PEAK_LIMIT_MIB = 2048


def _peak_mib(command: list[str], cwd: Path) -> tuple[int, float, str]:
    """Run a command; its exit status, peak resident memory (MiB) and stderr tail."""
    with open(cwd / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        tail = stderr.read()[-2000:]
    return process.returncode, usage.ru_maxrss / 1024, tail  # Linux: KiB


def test_examples_and_the_cli_stay_under_2_gb_at_their_defaults(tmp_path):
    """Every example and ``ekfac-laplace compare`` / ``sample`` at their defaults,
    two at a time with one thread each, each in its own process; peak RSS from
    ``wait4``; no warnings on stderr."""
    cli = "from ekfac_laplace.evaluation.cli import main; main()"
    commands = {
        script: [sys.executable, str(EXAMPLES / script)] for script in SMALL_ARGUMENTS
    }
    commands["ekfac-laplace compare"] = [sys.executable, "-c", cli, "compare"]
    commands["ekfac-laplace sample"] = [sys.executable, "-c", cli, "sample"]
    # Longest first (measured: compare 90 s, the two LoRA examples 45 and 41 s; the
    # others 8-25 s), so that the two workers finish together.
    longest = (
        "ekfac-laplace compare",
        "example_lora_transformer.py",
        "example_laplace_lora.py",
    )
    commands = {
        name: commands[name] for name in (*longest, *commands) if name in commands
    }
    folders = {}
    for index, name in enumerate(commands):
        folders[name] = tmp_path / str(index)
        folders[name].mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(
            zip(
                commands,
                pool.map(lambda n: _peak_mib(commands[n], folders[n]), commands),
            )
        )
    for name, (status, peak, stderr) in results.items():
        assert status == 0, (name, stderr)
        assert peak < PEAK_LIMIT_MIB, f"{name}: peak {peak:.0f} MiB"
        assert "Warning" not in stderr, (name, stderr)


def test_the_distributed_example_under_torchrun_matches_one_process(tmp_path):
    """Two gloo processes launched by torchrun print the single-process results."""
    script = str(EXAMPLES / "example_distributed.py")
    arguments = SMALL_ARGUMENTS["example_distributed.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    outputs = {}
    for name, command in (
        ("one", [sys.executable, script, *arguments]),
        ("two", [*launcher, "--nproc_per_node=2", script, *arguments]),
    ):
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = [
            line.split(": ", 1)[1] if ": " in line else line
            for line in done.stdout.splitlines()
            if line.startswith(("1 process", "2 processes", "test set"))
        ]
    assert len(outputs["two"]) == 2, outputs  # rank 0 prints, once
    one_fit, two_fit = outputs["one"][0].split(", "), outputs["two"][0].split(", ")
    assert one_fit[0] == two_fit[0] == "N = 1077"
    assert one_fit[2:] == two_fit[2:]  # prior precision and evidence (not the time)
    assert outputs["one"][1] == outputs["two"][1]  # the test metrics
