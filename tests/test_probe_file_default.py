"""The file-default probe writes shipped data as a plain purchase file the generic loader reads back
whole, and records the shipped config's references beside its own numbers."""

import json

import pytest

from fedrec.datasets import movielens, purchases, synthetic
from fedrec.training.probe_file_default import main, shipped_references, write_plain_file
from tests.conftest import movielens_dir


def test_the_synthetic_shop_as_a_file_keeps_every_purchase_and_its_product_columns(tmp_path):
    path = tmp_path / "shop.csv"
    write_plain_file("synthetic", path)
    log = purchases.load(path)
    shipped = synthetic.load()
    assert log.interactions.height == shipped.interactions.height
    assert set(log.interactions["merchant"].unique()) == set(shipped.interactions["merchant"].unique())
    assert log.items["category"].null_count() == 0 and log.items["price"].null_count() == 0
    assert (log.items["title"] != log.items["item"]).all()
    # the loader knows only purchased products, as with a real shop's file
    assert log.items.height == shipped.interactions["item"].n_unique()


def test_movielens_as_a_file_has_no_titles_or_genres(tmp_path):
    movielens_dir()  # skips when ../shared/datasets is absent
    path = tmp_path / "ml.csv"
    write_plain_file("movielens", path)
    log = purchases.load(path)
    assert log.interactions.height == movielens.load().interactions.height
    # no metadata: the loader names each product by its id and knows no category
    assert (log.items["title"] == log.items["item"]).all()
    assert log.items["category"].null_count() == log.items.height


def test_unknown_source_and_the_shipped_references(tmp_path):
    with pytest.raises(ValueError, match="one of movielens, synthetic"):
        write_plain_file("nope", tmp_path / "x.csv")
    assert shipped_references("synthetic", tmp_path) is None
    fake = {
        "federated": {"overall": {"recall@20": 0.27}, "recall@20_std": 0.002},
        "implicit_als": {"overall": {"recall@20": 0.25}, "recall@20_std": 0.001},
        "ease": {"overall": {"recall@20": 0.24}},
    }
    (tmp_path / "evaluation-synthetic.json").write_text(json.dumps(fake))
    refs = shipped_references("synthetic", tmp_path)
    assert refs["federated"] == {"recall@20": 0.27, "recall@20_std": 0.002}
    assert refs["implicit_als"]["recall@20"] == 0.25 and refs["ease"]["recall@20_std"] is None


def test_missing_movielens_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(movielens, "SHARED_DIR", tmp_path / "absent")
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(movielens.ENV_VAR, raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--source", "movielens", "--results", str(tmp_path)])
    assert str(exit_.value).startswith("error: MovieLens-100K: no MovieLens folder was found")
    assert not list(tmp_path.glob("probe-*.json"))


def test_the_large_shop_sits_between_the_full_softmax_and_the_exact_ials_limit(tmp_path):
    """The probe's large shop is there to run the file default where the softmax candidates are
    sampled and the co-purchase term is off but the exact ials still runs: its sold catalogue must
    stay in that band."""
    from fedrec.copurchase import MAX_ITEMS
    from fedrec.federated.local import LocalConfig
    from fedrec.model import ModelConfig

    path = tmp_path / "large.csv"
    write_plain_file("large-shop", path)
    log = purchases.load(path)
    sold = log.interactions["item"].n_unique()
    assert sold > LocalConfig().full_softmax_max_items and sold > MAX_ITEMS
    assert sold <= 2 * ModelConfig().id_rows
    assert log.interactions["merchant"].n_unique() == 8
    assert log.items["category"].null_count() == log.items.height  # no product metadata


def test_references_on_a_generated_file_are_fitted_on_its_split(tmp_path):
    import dataclasses

    from rich.console import Console

    from fedrec.datasets.marketplace import NEW_SHOP, write_purchase_file
    from fedrec.training.probe_file_default import file_references

    path = tmp_path / "small.csv"
    write_purchase_file(path, dataclasses.replace(NEW_SHOP, n_products=600, n_customers=300, mean_baskets=6.0))
    refs = file_references(path, (0,), Console(quiet=True))
    assert set(refs) == {"fitted_on", "implicit_als", "popularity", "ease", "item_knn"}
    for name in ("implicit_als", "popularity", "ease", "item_knn"):
        assert 0.0 < refs[name]["recall@20"] <= 1.0, name
    assert "factors" in refs["implicit_als"]["settings"] and "validation" not in refs["implicit_als"]["settings"]
    assert "lambda" in refs["ease"]["settings"]


def test_a_variant_changes_the_file_default_and_says_so(tmp_path, monkeypatch):
    """`--set` reaches every seed's config, the results name it, and `--out` is where they go."""
    from types import SimpleNamespace

    import fedrec.training.probe_file_default as probe_module

    seen = []

    def fake_train(cfg, console):  # noqa: ANN001, ANN202
        seen.append(cfg)
        result = SimpleNamespace(best_round=1, refit_rounds=1, seconds=0.0)
        return SimpleNamespace(result=result, test={"overall": {"recall@20": 0.1 + cfg.federation.seed}})

    monkeypatch.setattr(probe_module, "train", fake_train)
    for name in ("choice_entry", "content_match_entry", "copurchase_entry"):
        monkeypatch.setattr(probe_module, name, lambda res: None)
    monkeypatch.setattr(probe_module, "file_references", lambda *a: pytest.fail("a variant refits no references"))
    out = tmp_path / "variant.json"
    main(["--source", "complement-shop", "--seeds", "2", "--set", "model.copurchase_weights=[0,2]", "--out", str(out)])
    assert [c.model.copurchase_weights for c in seen] == [(0.0, 2.0), (0.0, 2.0)]
    assert [c.federation.seed for c in seen] == [0, 1]
    res = json.loads(out.read_text())
    assert res["recall@20_per_seed"] == [0.1, 1.1] and "references" not in res
    assert res["what"].endswith("with model.copurchase_weights = [0, 2]")
    assert "--set model.copurchase_weights=[0,2]" in res["command"] and str(out) in res["command"]
