"""gitfast.captioning.ray_data on a local Ray instance (CPU): image folders, Parquet tables and webdataset shards
captioned by an actor pool of GitCaptioners give exactly `Captioner.caption`'s results."""
import os

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("ray.data")

from gitfast import Captioner  # noqa: E402
from gitfast.defaults import EMBEDDED_MODEL  # noqa: E402
from gitfast.captioning.ray_data import caption_dataset  # noqa: E402
from image_factory import (broken_files, mode_images, small_images, webdataset_samples,  # noqa: E402
                           write_files, write_tar)

NEW = 6


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_files(str(root), mode_images())
    write_files(str(root / "bad"), broken_files())
    return str(root)


def read_rows(out):
    return {r["source"]: r for r in pq.read_table(out).to_pylist()}


def expected(captioner, inputs, ids):
    return {i: (r.text, r.error) for i, r in zip(ids, captioner.caption(inputs, max_new_tokens=NEW))}


def test_image_folder_to_parquet_through_two_actors_matches_captioner(local_ray, checkpoint, folder, tmp_path):
    out = caption_dataset(folder, str(tmp_path / "out"), model=checkpoint, batch_size=5, max_batch_size=4,
                          max_new_tokens=NEW, concurrency=2, num_cpus=0.5)
    rows = read_rows(out)
    paths = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    want = expected(Captioner(checkpoint, device="cpu"), paths, paths)
    assert len(rows) == len(want) == 13
    assert {s: (r["caption"], r["error"]) for s, r in rows.items()} == want
    assert sum(r["error"] is not None for r in rows.values()) == 3  # the broken files are rows with errors
    assert set(rows[paths[0]]) == {"path", "source", "caption", "error"}  # the bytes column is dropped


def test_parquet_table_and_webdataset_shards(local_ray, checkpoint, tmp_path):
    import pyarrow as pa

    from gitfast.captioning.records import Source

    imgs = small_images(12)
    names, data = list(imgs), list(imgs.values())
    on_disk = write_files(str(tmp_path / "disk"), dict(list(imgs.items())[:2]))
    captioner = Captioner(checkpoint, device="cpu")
    want = expected(captioner, [Source(n, (lambda d=d: d)) for n, d in zip(names, data)], names)

    # Hugging Face datasets' Image feature: {"bytes", "path"} structs; the first two only name a file
    image = [{"bytes": None, "path": p} for p in on_disk] + [{"bytes": d, "path": n} for d, n in zip(data[2:], names[2:])]
    table = pa.table({"name": names, "image": image, "extra": list(range(12))})
    pq.write_table(table, tmp_path / "in.parquet")
    out = caption_dataset(str(tmp_path / "in.parquet"), str(tmp_path / "from_parquet"), input="parquet",
                          id_column="name", model=checkpoint, max_new_tokens=NEW, batch_size=8)
    rows = read_rows(out)
    assert {s: (r["caption"], r["error"]) for s, r in rows.items()} == want
    assert all(rows[n]["extra"] == i for i, n in enumerate(names))  # other columns ride along

    shards = tmp_path / "shards"
    write_tar(str(shards / "00000.tar"), webdataset_samples(dict(list(imgs.items())[:7])))
    write_tar(str(shards / "00001.tar"), webdataset_samples(dict(list(imgs.items())[7:]), start=7))
    out = caption_dataset(str(shards), str(tmp_path / "from_wds"), input="webdataset", model=checkpoint,
                          max_new_tokens=NEW, batch_size=4)
    rows = read_rows(out)
    assert sorted(rows) == [f"{k:09d}" for k in range(12)]
    assert [(rows[f"{k:09d}"]["caption"], rows[f"{k:09d}"]["error"]) for k in range(12)] == [want[n] for n in names]


@pytest.mark.skipif(not (EMBEDDED_MODEL / "model.safetensors").is_file(), reason="embedded model not in this tree")
def test_embedded_model_through_ray(local_ray, folder, tmp_path):
    out = caption_dataset(folder, str(tmp_path / "out"), max_new_tokens=12, batch_size=16)
    rows = read_rows(out)
    paths = list(rows)
    want = {p: (r.text, r.error) for p, r in zip(paths, Captioner(device="cpu").caption(paths, max_new_tokens=12))}
    assert {s: (r["caption"], r["error"]) for s, r in rows.items()} == want
    assert any(r["caption"] for r in rows.values())
