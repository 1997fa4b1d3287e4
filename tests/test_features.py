import os

import pytest
import torch

from architectures import create_encoder
from benchmark.data import load_karpathy
from benchmark.errors import DatasetError, StorageError
from benchmark.features import (
    FeatureStats,
    FeatureStore,
    channel_stats,
    feature_cache_key,
    load_or_extract,
    open_store,
    store_folder,
    store_identity,
)


def test_cache_miss_hit_and_invalidation(tiny_shapes, tmp_path):
    ds = load_karpathy(tiny_shapes)
    images = ds.images[:6]
    enc = create_encoder("resnet18", pretrained=False)
    first = load_or_extract(enc, images, cache_dir=tmp_path, batch_size=4)
    assert not first.cache_hit and first.grid.shape == (6, 49, 512)
    again = load_or_extract(enc, images, cache_dir=tmp_path)
    assert again.cache_hit and torch.equal(again.grid.all(), first.grid.all())
    assert again.key == first.key and len(list(tmp_path.glob("resnet18-*/manifest.json"))) == 1
    # features match a direct forward pass (float16 storage tolerance)
    x = torch.stack([enc.transform(__import__("PIL.Image").Image.open(images[0].path).convert("RGB"))])
    torch.testing.assert_close(first.grid.all()[0].float(), enc(x)[0][0], atol=2e-2, rtol=2e-3)

    other_weights = create_encoder("resnet18", pretrained=False, init_seed=7)
    assert feature_cache_key(other_weights.cache_identity(), images) != first.key
    assert not load_or_extract(other_weights, images, cache_dir=tmp_path).cache_hit

    assert feature_cache_key(enc.cache_identity(), images[:5]) != first.key  # image set
    # CUDA extraction runs under bf16 autocast: its store is another one; CPU keys stay
    assert store_identity(enc, "pil", "cpu") == enc.cache_identity()
    assert store_identity(enc, "pil", "cuda") == {**enc.cache_identity(), "autocast": "bfloat16"}
    assert store_folder(enc, images, tmp_path, "pil", "cuda") != first.path

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


def test_streaming_statistics_equal_the_two_pass_values(tiny_shapes, tmp_path):
    """Chan/Welford in float64 over chunks = mean/std of all values at once, to 1e-6."""
    g = torch.Generator().manual_seed(0)
    grid = (torch.randn(37, 5, 8, generator=g) * 30 + 1000).half()  # large mean: cancellation
    rows = torch.tensor([3, 0, 36, 17, 5, 9, 22, 30, 11])
    for chunk in (1, 2, 4, 64):
        mean, std = channel_stats(grid, rows, flatten_tokens=True, chunk_rows=chunk)
        flat = grid[rows].double().flatten(0, 1)
        torch.testing.assert_close(mean.double(), flat.mean(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(std.double(), flat.std(0), rtol=1e-6, atol=0)


def test_the_store_streams_from_shards_and_resumes_a_killed_extraction(tiny_shapes, tmp_path):
    ds = load_karpathy(tiny_shapes)
    images = ds.images[:11]
    enc = create_encoder("resnet18", pretrained=False)
    whole = load_or_extract(enc, images, cache_dir=tmp_path / "one", shard_size=100)
    calls = []
    real_forward = enc.forward

    def counted(pixels):
        calls.append(len(pixels))
        if sum(calls) > 6:  # killed while encoding the third shard
            raise KeyboardInterrupt
        return real_forward(pixels)

    enc.forward = counted
    with pytest.raises(KeyboardInterrupt):
        load_or_extract(enc, images, cache_dir=tmp_path / "two", batch_size=2, shard_size=3)
    folder = store_folder(enc, images, tmp_path / "two")
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.safetensors",
                                                         "shard-00001.safetensors"]
    assert open_store(folder) is None  # no manifest: never read as a store
    calls.clear()
    enc.forward = real_forward
    enc.forward = lambda pixels: (calls.append(len(pixels)), real_forward(pixels))[1]
    store = load_or_extract(enc, images, cache_dir=tmp_path / "two", batch_size=2, shard_size=3)
    assert sum(calls) == 5  # only the shards 3..4 (images 6..10) were encoded
    assert store.sharded and not store.cache_hit and len(store.grid.files) == 4
    assert store.nbytes == whole.nbytes == 11 * (49 * 512 + 512) * 2
    assert torch.equal(store.grid.all(), whole.grid.all())
    assert torch.equal(store.pooled.all(), whole.pooled.all())
    rows = torch.tensor([10, 0, 4, 5, 3, 9])  # across shards, out of order
    g, p = store.rows(rows)
    assert torch.equal(g, whole.grid.all()[rows].float())
    # normalisation from shards = from memory
    memory = FeatureStore(whole.grid.all(), whole.pooled.all(), whole.image_ids, "m")
    a, b = store.standardize(rows), memory.standardize(rows)
    for k in FeatureStats.KEYS:
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-6, atol=1e-7)
    batches = [rows[:4], rows[4:]]
    for (g1, p1), (g2, p2) in zip(store.batches(batches, "cpu", num_workers=1),
                                  memory.batches(batches, "cpu"), strict=True):
        assert torch.equal(g1, g2) and torch.equal(p1, p2)


def test_a_resumed_extraction_needs_room_only_for_the_missing_shards(tiny_shapes, tmp_path,
                                                                      monkeypatch):
    from benchmark import fsutil

    images = load_karpathy(tiny_shapes).images[:11]
    enc = create_encoder("resnet18", pretrained=False)
    row = (49 * 512 + 512) * 2  # bytes of one image's float16 features
    load_or_extract(enc, images, cache_dir=tmp_path / "a", batch_size=4, shard_size=4)
    folder = store_folder(enc, images, tmp_path / "a")
    (folder / "manifest.json").unlink()
    (folder / "shard-00002.safetensors").unlink()  # 3 of 11 images left to encode
    free = type("Usage", (), {"free": 5 * row})()  # room for 3 (with 10% to spare), not 11
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda path: free)
    with pytest.raises(StorageError, match="free but this run needs about"):
        load_or_extract(enc, images, cache_dir=tmp_path / "b", shard_size=4)  # all 11
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").rglob("shard-*"))
    resumed = load_or_extract(enc, images, cache_dir=tmp_path / "a", shard_size=4)
    assert not resumed.cache_hit and resumed.extraction_images_per_s is not None
    assert len(resumed.grid) == 11 and (folder / "manifest.json").exists()


def test_a_shard_that_does_not_match_its_manifest_is_encoded_again(tiny_shapes, tmp_path):
    """A shard that holds other images than the manifest says (as when another job rewrote it),
    or one whose header is damaged, is never read as this store's rows: the store is refused
    and that shard re-encoded."""
    images = load_karpathy(tiny_shapes).images[:11]
    enc = create_encoder("resnet18", pretrained=False)
    whole = load_or_extract(enc, images, cache_dir=tmp_path / "a", batch_size=4, shard_size=3)
    folder = whole.path
    (folder / "shard-00001.safetensors").write_bytes(  # rows 6..8 where 3..5 belong: same size
        (folder / "shard-00002.safetensors").read_bytes())
    assert open_store(folder) is None
    store = load_or_extract(enc, images, cache_dir=tmp_path / "a", batch_size=4, shard_size=3)
    assert store.extraction_images_per_s is not None and torch.equal(store.grid.all(),
                                                                      whole.grid.all())
    damaged = folder / "shard-00002.safetensors"  # a header length of 2**40 bytes
    damaged.write_bytes((2**40).to_bytes(8, "little") + damaged.read_bytes()[8:])
    assert open_store(folder) is None
    again = load_or_extract(enc, images, cache_dir=tmp_path / "a", batch_size=4, shard_size=3)
    assert torch.equal(again.pooled.all(), whole.pooled.all())
    with pytest.raises(DatasetError, match="no images to encode"):
        load_or_extract(enc, [], cache_dir=tmp_path / "a")


def test_extraction_uses_one_dataloader_for_all_shards(tiny_shapes, tmp_path, monkeypatch):
    """One worker pool for the whole extraction, not one per shard (a COCO store has ~100)."""
    from benchmark import pixels

    made = []
    real = pixels.DataLoader

    def counting(*args, **kwargs):
        made.append(kwargs.get("batch_sampler"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pixels, "DataLoader", counting)
    images = load_karpathy(tiny_shapes).images[:11]
    store = load_or_extract(create_encoder("resnet18", pretrained=False), images,
                            cache_dir=tmp_path, batch_size=2, shard_size=4)
    assert len(made) == 1 and len(store.grid.files) == 3
    # batches never straddle two shards: 2 + 2 | 2 + 2 | 2 + 1
    assert [len(b) for b in made[0]] == [2, 2, 2, 2, 2, 1]


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_a_seeded_training_crop_depends_on_its_seed_alone(tiny_shapes, name):
    """torchvision's and timm's random crops: the same seed gives the same pixels whatever
    the generators' state, through DataLoader workers too, and the caller's generators are
    left as they were."""
    import random

    from torch.utils.data import DataLoader

    from benchmark.pixels import ImageFolderDataset

    images = load_karpathy(tiny_shapes).split("train")[:4]
    transform = create_encoder(name, pretrained=False).train_transform()
    ds = ImageFolderDataset(images, transform, seeds=[7, 8, 9, 7])
    torch.manual_seed(0)
    random.seed(0)
    first = torch.stack([ds[i] for i in range(4)])
    after = (torch.rand(1), random.random())
    torch.manual_seed(0)
    random.seed(0)
    assert (torch.rand(1), random.random()) == after  # the caller's generators untouched
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(torch.stack([ds[i] for i in (0, 1, 2, 3)]), first)
    assert torch.equal(next(iter(DataLoader(ds, batch_size=4, num_workers=2))), first)
    other = ImageFolderDataset(images[:1], transform, seeds=[8])
    assert not torch.equal(other[0], first[0])  # another seed, another crop of image 0
    with pytest.raises(ValueError, match="2 seeds for 4 images"):
        ImageFolderDataset(images, transform, seeds=[1, 2])
