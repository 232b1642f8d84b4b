from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from fedrec.data import PurchaseLog
from fedrec.datasets import movielens
from fedrec.datasets.protocol import temporal_split
from fedrec.datasets.synthetic import SyntheticConfig, generate

TINY = SyntheticConfig(
    n_products=200,
    merchants=(("big", 700), ("small_a", 200), ("small_b", 150)),
    mean_baskets=8.0,
    style_weight=4.0,
    seed=7,
)


@pytest.fixture(scope="session")
def tiny_frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    return generate(TINY)


@pytest.fixture(scope="session")
def tiny_log(tiny_frames) -> PurchaseLog:
    purchases, products = tiny_frames
    items = products.with_columns(tags=pl.lit(None, dtype=pl.String))
    return PurchaseLog("tiny", purchases, items)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_log):
    return temporal_split(tiny_log)


@pytest.fixture
def tiny_csv(tiny_frames, tmp_path) -> Path:
    """The tiny shop as a merchant would hand it over: one CSV with item metadata columns."""
    purchases, products = tiny_frames
    path = tmp_path / "purchases.csv"
    purchases.join(products, on="item").write_csv(path)
    return path


def train_tiny_export(tmp_path: Path, tiny_csv: Path, *settings: str) -> Path:
    """`fedrec train` on the tiny shop's file (`test_cli.tiny_args`, temperature 1) with `settings`
    added; its first export's folder."""
    from typer.testing import CliRunner

    from fedrec.training.cli import app
    from tests.test_cli import tiny_args

    args = ["train", *tiny_args(tmp_path, tiny_csv)]
    for setting in ("local.temperature=1.0", *settings):
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp_path / "artifacts" / "file" / "exports" / "v0001"


def movielens_dir() -> Path:
    try:
        return movielens.resolve_dir()
    except Exception:
        pytest.skip("MovieLens-100K not found (../shared/datasets absent): skipped")


@pytest.fixture(scope="session")
def ml_dataset():
    return temporal_split(movielens.load(movielens_dir()))


@pytest.fixture(scope="session")
def served_root(tmp_path_factory, tiny_frames) -> Path:
    """artifacts/<dataset> of two tiny training runs (seeds 0 and 1): exports v0001 and v0002.

    Two seeds give two genuinely different models, so a test can tell which version answered.
    """
    from typer.testing import CliRunner

    from fedrec.training.cli import app

    base = tmp_path_factory.mktemp("served")
    purchases, products = tiny_frames
    csv = base / "purchases.csv"
    purchases.join(products, on="item").write_csv(csv)
    for seed in (0, 1):
        args = ["train", "--dataset", "file", "--set", f"data.path={csv}"]
        for setting in (
            f"output.artifacts_dir={base / 'artifacts'}",
            f"output.results_dir={base / 'results'}",
            "federation.rounds=3",
            f"federation.seed={seed}",
            "model.dim=16",
            "model.hash_buckets=1024",
            # One fixed softmax model, not the file default's choice: these exports rank by u . v, and
            # the choice could pick a candidate with a merchant item bias (served and tested apart).
            "local.temperature=1.0",
            # Nor the file default's co-purchase term, whose block serving tests apart (test_copurchase.py).
            "model.copurchase_weights=[]",
        ):
            args += ["--set", setting]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return base / "artifacts" / "file"
