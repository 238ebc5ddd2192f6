"""The demo's factories for ``infkit run``: the digits data and the trained models.

``infkit demo`` writes ``report.toml`` into its run directory, naming these factories, and runs
it: the report of the last model's analysis, and a config to copy for your own model
(docs/report.md §1).
"""

from __future__ import annotations

import functools

import numpy as np
from torch import Tensor, nn

from infkit.demo.data import DigitsData, load_data
from infkit.demo.models import LOGREG, MLP, ModelSpec, build_model
from infkit.task import Task
from infkit.training import train_to_optimum

TEST_FRACTION = 0.2
FLIP_FRACTION = 0.05


@functools.lru_cache(maxsize=4)
def digits(seed: int = 0) -> DigitsData:
    """The demo's split of the digits (seed ``seed``), 5% of training labels flipped."""
    return load_data(seed, TEST_FRACTION, FLIP_FRACTION)


def splits(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(train, test): standardised pixels [n, 64], float64, and labels (training labels noisy)."""
    data = digits(seed)
    return data.train, data.test


def images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The raw 8x8 images of the training and test examples, for the report's thumbnails."""
    data = digits(seed)
    return data.images_train, data.images_test


SPECS = {spec.name: spec for spec in (LOGREG, MLP)}


def trained(name: str = "mlp", seed: int = 0) -> nn.Module:
    """The demo's model ``name`` (``"mlp"``: 64-16-10 tanh, ``"logreg"``), trained to a tight
    optimum of its objective."""
    spec = SPECS[name]
    model = build_model(spec, seed)
    train_to_optimum(
        Task.classification(model), digits(seed).train, spec.l2, tolerance=1e-10, progress=False
    )
    return model


def report_config(
    spec: ModelSpec, seed: int, flipped: list[int], n_retrain: int, workdir: str
) -> str:
    """The TOML text of the demo's report on model ``spec``, the flipped labels flagged."""
    what = "a tanh MLP" if spec.hidden else "logistic regression"
    return f"""# The demo's report: `infkit run report.toml` runs it again (`infkit run --help` lists
# every key). Copy it and name your own factories to analyse your own model.
[model]
factory = "infkit.demo.project:trained"
args = {{ name = "{spec.name}", seed = {seed} }}

[data]
factory = "infkit.demo.project:splits"
args = {{ seed = {seed} }}
display = "infkit.demo.project:images"   # raw 8x8 pixels as thumbnails

[task]
kind = "classification"

[influence]
method = "exact"
l2 = {spec.l2}

[report]
title = "Digits: {what}, 5% of training labels flipped (infkit demo)"
n_queries = 3
top_k = 6

[self_influence]
flagged = {flipped}   # the flipped labels
top = 20

[retraining]
n = {n_retrain}
tolerance = {spec.retrain_tolerance}

[output]
workdir = "{workdir}"
"""
