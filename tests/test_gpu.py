"""The GPU pipeline's logic, on the CPU: batches halved on out-of-memory errors (injected), batch sizes
from free memory, loader workers sized from the machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer import ingest
from indexer.models.batching import Backoff, batch_size_from_memory
from indexer.models.vision import CNNEmbedder
from indexer.store import Collection


def _oom_above(limit: int, calls: list[int]):
    """A batch function that runs out of "GPU memory" above `limit` items; it records the sizes it ran."""
    def fn(piece):
        if len(piece) > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory ({len(piece)} items)")
        calls.append(len(piece))
        return np.asarray(piece, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)
    return fn


def test_backoff_halves_and_keeps_every_item_once_in_order():
    calls: list[int] = []
    backoff = Backoff()
    items = list(range(37))
    out = backoff.run(_oom_above(5, calls), items)
    np.testing.assert_array_equal(out[:, 0], items)  # each item once, in input order
    assert sum(calls) == 37 and max(calls) <= 5
    assert backoff.size == 4  # 37 -> 18 -> 9 -> 4: the size that fits is kept
    calls.clear()
    backoff.run(_oom_above(5, calls), list(range(10)))
    assert calls == [4, 4, 2]  # the next batch starts at the kept size: no failed attempt


def test_backoff_gives_up_when_one_item_does_not_fit():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Backoff().run(_oom_above(0, []), [1, 2, 3])


def test_batch_size_from_memory():
    gib, mib = 2**30, 2**20
    assert batch_size_from_memory(8 * gib, 20 * mib, 64) == 128  # 0.6 * 8 GiB / 20 MiB = 245 -> 128
    assert batch_size_from_memory(140 * gib, 1 * mib, 64) == 1024  # capped
    assert batch_size_from_memory(100 * mib, 1 * gib, 64) == 1  # not even one: one at a time
    assert batch_size_from_memory(8 * gib, 0, 64) == 64  # nothing measured: the default


@pytest.mark.slow
def test_ingest_with_injected_oom_stores_the_same_vectors(tmp_path, sample_corpus, resnet18_weights, monkeypatch):
    """A real CNN whose forward pass fails above 5 images: the ingest halves its batches of 16 and stores
    every image once, with the vectors of a run that never ran out of memory."""
    images = [str(sample_corpus["images"])]
    kw = {"model": "resnet18", "weights": str(resnet18_weights), "batch_size": 16, "progress": False, "workers": 0}
    plain = ingest(tmp_path / "plain.idx", images, **kw)

    forward = CNNEmbedder._forward
    sizes: list[int] = []

    def failing_forward(self, inputs):
        if inputs.shape[0] > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        sizes.append(inputs.shape[0])
        return forward(self, inputs)

    monkeypatch.setattr(CNNEmbedder, "_forward", failing_forward)
    s = ingest(tmp_path / "oom.idx", images, **kw)
    assert (s.added, s.errors) == (plain.added, plain.errors) == (16, 0)
    assert sum(sizes) == 16 and max(sizes) <= 5  # every image through the model once, in batches that fit

    def rows(path):
        table = Collection.open(path).dataset().to_table(columns=["id", "vector"]).to_pylist()
        return {r["id"]: np.array(r["vector"]) for r in table}, len(table)

    (a, n_a), (b, n_b) = rows(tmp_path / "plain.idx"), rows(tmp_path / "oom.idx")
    assert n_a == n_b == len(b) == 16 and sorted(a) == sorted(b)
    for rid in a:
        np.testing.assert_allclose(a[rid], b[rid], atol=1e-5)


def test_loader_workers_leave_one_core_to_feed_a_gpu():
    from indexer.ingest.loader import loader_workers

    assert loader_workers(16, cuda=True, batch_size=64) == (15, 6)  # an H200 machine: every core but one decodes
    assert loader_workers(16, cuda=True, batch_size=1024) == (15, 2)  # big batches: fewer ahead (host memory)
    assert loader_workers(128, cuda=True, batch_size=256)[0] == 32
    assert loader_workers(16, cuda=False, batch_size=64) == (4, 4)  # on a CPU the model needs the cores
    assert loader_workers(1, cuda=True, batch_size=64)[0] == loader_workers(1, cuda=False, batch_size=64)[0] == 1


def _vectors(path) -> dict[str, np.ndarray]:
    return {r["id"]: np.array(r["vector"]) for r in
            Collection.open(path).dataset().to_table(columns=["id", "vector"]).to_pylist()}


@pytest.mark.slow
def test_jpegs_decoded_on_the_model_device(tmp_path, sample_corpus, resnet18_weights, monkeypatch):
    """The GPU path (JPEG bytes decoded by torchvision's decoder where the model runs, then transformed
    there), run on the CPU: the same rows and error lines as PIL decoding in the workers, vectors within
    decoding differences, and a JPEG the decoder rejects goes to PIL, which records it."""
    import shutil

    from indexer.ingest import loader, local

    folder = tmp_path / "imgs"
    shutil.copytree(sample_corpus["images"], folder)
    good = (folder / "cat.jpg").read_bytes()
    (folder / "garbage.jpg").write_bytes(good[:700] + np.random.default_rng(0).bytes(3000) + b"\xff\xd9")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "photo.png").write_bytes(b"")
    kw = {"model": "resnet18", "weights": str(resnet18_weights), "batch_size": 8, "progress": False, "workers": 0}
    plain = ingest(tmp_path / "pil.idx", [str(folder)], **kw)

    decoded: list[int] = []
    decode_jpegs = loader._decode_jpegs
    monkeypatch.setattr(loader, "_decode_jpegs", lambda data, device: decoded.append(len(data)) or
                        decode_jpegs(data, device))
    monkeypatch.setattr(local, "_jpeg_device", lambda embedder: torch.device("cpu"))
    deferred = ingest(tmp_path / "dev.idx", [str(folder)], **kw)
    assert sum(decoded) == 17  # the 16 photos and garbage.jpg; truncated.jpg lacks its end marker
    assert (deferred.added, deferred.errors) == (plain.added, plain.errors) == (16, 3)
    errors = lambda p: sorted((e["id"], e["reason"]) for e in Collection.open(p).errors())  # noqa: E731
    assert errors(tmp_path / "dev.idx") == errors(tmp_path / "pil.idx")
    a, b = _vectors(tmp_path / "pil.idx"), _vectors(tmp_path / "dev.idx")
    assert sorted(a) == sorted(b)
    cosines = [float(a[i] @ b[i]) for i in a]  # PIL shrinks big JPEGs in the DCT; the device decodes them whole
    assert min(cosines) > 0.98 and np.mean(cosines) > 0.99, cosines


def test_only_plain_jpegs_are_left_to_the_device_decoder():
    import io

    from PIL import Image

    from indexer.sources.images import plain_jpeg

    def encoded(mode: str, fmt: str = "JPEG", **kw) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (40, 30), 128).save(buf, fmt, **kw)
        return buf.getvalue()

    assert plain_jpeg(encoded("RGB")) and plain_jpeg(encoded("L"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the device decoder ignores EXIF, PIL turns it upright
    assert not plain_jpeg(encoded("RGB", exif=exif))
    assert not plain_jpeg(encoded("CMYK"))
    assert not plain_jpeg(encoded("RGB", "PNG"))
    assert not plain_jpeg(encoded("RGB")[:-200])  # cut short: PIL reports it


# ---- on a CUDA GPU only (skipped elsewhere): the same paths with nvjpeg, fp16 and real out-of-memory errors ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_ingest_decodes_jpegs_with_nvjpeg_and_matches_the_cpu(tmp_path, sample_corpus, resnet18_weights,
                                                                   monkeypatch):
    from indexer.ingest import loader

    kw = {"model": "resnet18", "weights": str(resnet18_weights), "progress": False, "workers": 0}
    cpu = ingest(tmp_path / "cpu.idx", [str(sample_corpus["images"])], device="cpu", **kw)
    devices: list[str] = []
    decode_jpegs = loader._decode_jpegs
    monkeypatch.setattr(loader, "_decode_jpegs", lambda data, device: devices.extend([device.type] * len(data)) or
                        decode_jpegs(data, device))
    gpu = ingest(tmp_path / "gpu.idx", [str(sample_corpus["images"])], device="cuda", **kw)  # fp16 autocast
    assert devices == ["cuda"] * 16
    assert (gpu.added, gpu.errors) == (cpu.added, cpu.errors) == (16, 0)
    a, b = _vectors(tmp_path / "cpu.idx"), _vectors(tmp_path / "gpu.idx")
    cosines = [float(a[i] @ b[i]) for i in a]
    assert min(cosines) > 0.97 and np.mean(cosines) > 0.98, cosines


@needs_cuda
def test_cuda_batches_fit_free_memory_and_back_off_on_real_oom():
    from indexer.models import load_embedder, resolve_runtime

    emb = load_embedder("minilm", resolve_runtime("cuda"))
    size = emb.batch_size()
    assert size & (size - 1) == 0 and emb.default_batch_size <= size <= 1024  # a power of two; a GPU holds 64
    texts = emb.probe_items(512)  # 512 texts of the full 256 tokens
    expected = emb.embed_batch(texts)
    torch.cuda.empty_cache()  # blocks the allocator keeps would otherwise serve the batch below
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - 128 * 2**20, dtype=torch.uint8, device="cuda")  # 128 MiB left: a few texts' worth
    try:
        vectors = emb.embed_batch(texts)
    finally:
        del hog
        torch.cuda.empty_cache()
    assert emb._backoff.size < 512  # it ran out of memory and halved
    np.testing.assert_allclose(vectors, expected, atol=2e-2)  # fp16: batch shapes change the kernels


def test_texts_tokenised_ahead_in_a_thread_give_the_same_vectors(minilm, monkeypatch):
    """The GPU's text path (each batch tokenised by a thread two batches ahead of the model), run on the
    CPU: the same vectors, truncation count and stage items as one batch after another."""
    from indexer.timing import Stages

    texts = [" ".join(["word"] * (i % 20 + 1)) + f" {i}" for i in range(40)] + ["long " * 400]
    before = minilm.truncated
    plain_stages, ahead_stages = Stages(), Stages()
    plain = minilm.embed(texts, batch_size=8, stages=plain_stages)
    truncated = minilm.truncated - before
    threads: set[str] = set()
    prepare = minilm._prepare

    def spying_prepare(items):
        import threading

        threads.add(threading.current_thread().name)
        return prepare(items)

    monkeypatch.setattr(minilm, "_ahead", lambda: 2)
    monkeypatch.setattr(minilm, "_prepare", spying_prepare)
    ahead = minilm.embed(texts, batch_size=8, stages=ahead_stages)
    assert all(name.startswith("prepare") for name in threads) and threads
    np.testing.assert_array_equal(ahead, plain)
    assert minilm.truncated - before == 2 * truncated == 2
    assert ahead_stages.items == plain_stages.items


def test_ray_engine_puts_one_embedding_worker_on_every_gpu():
    from indexer import IndexerError
    from indexer.ingest.ray_engine import RayEngine

    assert RayEngine().split(cpus=16, gpus=1) == (1, 1, 1)  # one H200
    assert RayEngine().split(cpus=128, gpus=8) == (8, 1, 1)  # every GPU of an 8-GPU machine
    assert RayEngine().split(cpus=64, gpus=16) == (16, 1, 1)  # two machines of 8
    assert RayEngine(gpus_per_worker=0.5).split(cpus=64, gpus=8) == (16, 1, 0.5)  # two replicas share a GPU
    assert RayEngine().split(cpus=6, gpus=0) == (6, 1, 0)  # no GPU: one per CPU
    with pytest.raises(IndexerError, match="do not fit"):
        RayEngine(workers=9).split(cpus=128, gpus=8)
