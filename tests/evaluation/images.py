"""Checks that a written figure is a real image (shared by the plotting and command
tests)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.figure import Figure

from ekfac_laplace.evaluation.plotting import save_figure


def image_ok(path) -> bool:
    image = matplotlib.image.imread(path)
    return image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 0


def assert_real_image(fig: Figure, path: Path) -> None:
    written = save_figure(fig, path)
    assert written == path and path.exists()
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 50 and image.shape[1] > 50
    assert np.ptp(image) > 0
