import os

import torch

from architectures import create_encoder
from benchmark.data import load_karpathy
from benchmark.features import feature_cache_key, load_or_extract


def test_cache_miss_hit_and_invalidation(tiny_shapes, tmp_path):
    ds = load_karpathy(tiny_shapes)
    images = ds.images[:6]
    enc = create_encoder("resnet18", pretrained=False)
    first = load_or_extract(enc, images, cache_dir=tmp_path, batch_size=4)
    assert not first.cache_hit and first.grid.shape == (6, 49, 512)
    again = load_or_extract(enc, images, cache_dir=tmp_path)
    assert again.cache_hit and torch.equal(again.grid, first.grid)
    assert again.key == first.key and len(list(tmp_path.glob("*.safetensors"))) == 1
    # features match a direct forward pass (float16 storage tolerance)
    x = torch.stack([enc.transform(__import__("PIL.Image").Image.open(images[0].path).convert("RGB"))])
    torch.testing.assert_close(first.grid[0].float(), enc(x)[0][0], atol=2e-2, rtol=2e-3)

    other_weights = create_encoder("resnet18", pretrained=False, init_seed=7)
    assert feature_cache_key(other_weights.cache_identity(), images) != first.key
    assert not load_or_extract(other_weights, images, cache_dir=tmp_path).cache_hit

    assert feature_cache_key(enc.cache_identity(), images[:5]) != first.key  # image set

    st = images[2].path.stat()  # an image file changes on disk
    os.utime(images[2].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    changed = load_or_extract(enc, images, cache_dir=tmp_path)
    assert not changed.cache_hit and changed.key != first.key


def test_standardize_uses_train_rows_only(tiny_shapes, tmp_path):
    ds = load_karpathy(tiny_shapes)
    enc = create_encoder("resnet18", pretrained=False)
    store = load_or_extract(enc, ds.images, cache_dir=tmp_path)
    train_rows = store.row_ids(ds.split("train"))
    store.standardize(train_rows)
    g, p = store.rows(train_rows)
    flat = g.flatten(0, 1)
    torch.testing.assert_close(flat.mean(0), torch.zeros(512), atol=1e-3, rtol=0)
    torch.testing.assert_close(p.std(0), torch.ones(512), atol=1e-3, rtol=0)
