"""Extraction and text encoding on a Ray cluster (`RayEngine`; `pip install 'textspan[ray]'`).

Extraction is a Ray Data pipeline over *shards*, ranges of image files that the store has not
done yet (`StoreWriter.pending`). Each row of the dataset names one shard; `map_batches`
sends it to an actor of a pool in which every actor holds the model on its device (a GPU
when it was given one). The actor reads the shard's images, decomposes them and writes the
shard as a part of the store (`PartWriter`: there whole or not at all). Ray restarts an
actor that dies and retries its shard. When every shard is there, the driver's writer
absorbs them, in file order, into the store. A driver killed anywhere resumes when rerun
with the same arguments — with either engine: parts already written are not computed again.

The store must be on storage every worker and the driver can reach (a shared file system).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import ImageSet
from ..errors import InputError, MissingDependencyError
from ..models import Decomposer, encode_texts, load, skeleton, tower_of
from ..models.texts import checked_texts
from ..store.images import MEMBER_SEPARATOR, TolerantImages, collate_readable, why_unreadable
from ..store.manifest import Manifest
from ..store.reader import StoreReader
from ..store.writer import DECOMPOSED, PartWriter, StoreWriter
from .job import ExtractJob

__all__ = ["RayEngine"]


def _ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "engine='ray' needs Ray Data: pip install 'textspan[ray]' (or the default "
            "engine, which needs nothing more)"
        ) from None
    return ray


def _connect(ray: Any, address: str | None) -> None:
    """Joins the cluster at `address`, or the instance already running in this process, or
    starts a local one."""
    if ray.is_initialized():
        return
    ray.init(
        address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True
    )


def _actor_pool(
    ray: Any,
    dataset: Any,
    actor: type,
    workers: int,
    num_gpus_per_worker: float | None,
    rows_per_call: int = 1,
    spare_cpu: bool = False,
    **constructor_kwargs: Any,
) -> Any:
    """`dataset` mapped `rows_per_call` rows at a time by a pool of `workers` actors of class
    `actor`.

    Each actor gets `num_gpus_per_worker` GPUs (default: 1 when the cluster has GPUs; its
    constructor is told by `use_gpu`), else an equal share of the CPUs — of all but one with
    `spare_cpu`, which the dataset's own read tasks need or they would wait for ever. An
    actor that dies is restarted and its rows retried, however often."""
    gpus = num_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if gpus > 0:
        resources = {"num_gpus": gpus, "num_cpus": 1}
    elif spare_cpu:
        cpus = ray.available_resources().get("CPU", 1) - 1
        resources = {"num_cpus": max(0.25, cpus / workers)}
    else:
        cpus = ray.available_resources().get("CPU", 1)
        resources = {"num_cpus": max(1, int(cpus // workers))}
    return dataset.map_batches(
        actor,
        batch_size=rows_per_call,
        concurrency=workers,
        fn_constructor_kwargs={**constructor_kwargs, "use_gpu": gpus > 0},
        max_restarts=-1,
        max_task_retries=-1,
        **resources,
    )


def _use_assigned_cpus() -> None:
    """Inside an actor: as many PyTorch threads as the CPUs Ray assigned to it."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


@dataclass(frozen=True)
class RayEngine:
    """Runs the model on a Ray cluster, in a pool of actors each holding the model.

    Args:
        address: the cluster to join ("auto", "ray://host:10001", …); by default the instance
            running in this process, or a new local one.
        workers: actors.
        num_gpus_per_worker: GPUs per actor (default: 1 when the cluster has GPUs).
        shard_size: images per shard, the unit of work and of resumption.
        before_shard: called in the actor with a shard's first file index before the shard
            is computed (the tests kill an actor with it).
    """

    address: str | None = None
    workers: int = 2
    num_gpus_per_worker: float | None = None
    shard_size: int = 1024
    before_shard: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.shard_size < 1:
            raise InputError(
                f"RayEngine: workers and shard_size >= 1 expected, got {self.workers} and "
                f"{self.shard_size}"
            )

    def extract(self, source: ImageSet, out: Path, job: ExtractJob) -> StoreReader:
        """`textspan.extract` on the cluster. `job.on_progress(files)` is called on the
        driver after each shard, with the number of image files done so far."""
        ray = _ray()
        samples = source.name == "webdataset"
        if source.reader is not None and not samples:
            raise InputError(f"the Ray engine cannot read the items of {source.name}")
        if samples and job.strict:
            raise InputError(
                "strict: the Ray engine reads WebDataset samples in no fixed order, so it "
                "cannot stop at the first unreadable one; use the local engine"
            )
        # The tower's shape, checked for support, without loading weights where it can.
        tower = tower_of(skeleton(job.model, job.pretrained))
        with StoreWriter.open(out, job.manifest(source, tower)) as writer:
            writer.absorb(strict=job.strict)  # rows another run or engine wrote
            if samples:
                self._write_samples(ray, writer, job)
            else:
                self._write_shards(ray, writer, job)
            writer.absorb(strict=job.strict)
            print(f"done: {out}", flush=True)
            return writer.finish()

    def _write_shards(self, ray: Any, writer: StoreWriter, job: ExtractJob) -> None:
        """The files the store has not done, in shards written by a pool of actors."""
        from tqdm.auto import tqdm

        todo = writer.pending(self.shard_size)
        count = writer.manifest.count
        print(
            f"textspan extract (ray): {count} images into {writer.out}, "
            f"{writer.parts_found + len(todo)} shards, {writer.parts_found} done before",
            flush=True,
        )
        if not todo:
            return
        _connect(ray, self.address)
        written = _actor_pool(
            ray,
            ray.data.from_items([{"start": s, "end": e} for s, e in todo]),
            _ShardWriter,
            self.workers,
            self.num_gpus_per_worker,
            manifest=ray.put(writer.manifest),
            out=str(writer.out.resolve()),
            batch_size=job.batch_size,
            strict=job.strict,
            before_shard=self.before_shard,
        )
        done = count - sum(e - s for s, e in todo)
        bar = tqdm(total=count, initial=done, desc="extracting", unit="img",
                   disable=not job.progress)  # fmt: skip
        for row in written.iter_rows():
            n = int(row["end"]) - int(row["start"])
            bar.update(n)
            done += n
            job.report(done)
        bar.close()

    def _write_samples(self, ray: Any, writer: StoreWriter, job: ExtractJob) -> None:
        """WebDataset shards through Ray Data's reader (`ray.data.read_webdataset`,
        undecoded): a pool of actors decodes each sample's image, decomposes a batch of them
        and writes it as a part. A rerun skips the samples already done."""
        from tqdm.auto import tqdm

        manifest = writer.manifest
        done = writer.covered()
        print(
            f"textspan extract (ray, WebDataset): {manifest.count} images into {writer.out}, "
            f"{int(done.sum())} done before",
            flush=True,
        )
        if done.all():
            return
        _connect(ray, self.address)
        root = Path(manifest.images)
        shards = sorted({f.split(MEMBER_SEPARATOR, 1)[0] for f in manifest.files})
        # The samples are bytes, never tensors; and Ray's casting of pandas blocks to its
        # tensor type fails with pandas 3 (it looks for a warning class pandas removed).
        ray.data.DataContext.get_current().enable_tensor_extension_casting = False
        samples = ray.data.read_webdataset(
            [str(root / s) for s in shards], decoder=None, include_paths=False
        )
        written = _actor_pool(
            ray,
            samples,
            _SampleWriter,
            self.workers,
            self.num_gpus_per_worker,
            rows_per_call=job.batch_size,
            spare_cpu=True,
            manifest=ray.put(manifest),
            done=ray.put(set(np.flatnonzero(done).tolist())),
            out=str(writer.out.resolve()),
            batch_size=job.batch_size,
        )
        count = int(done.sum())
        bar = tqdm(total=manifest.count, initial=count, desc="extracting", unit="img",
                   disable=not job.progress)  # fmt: skip
        for row in written.iter_rows():
            bar.update(int(row["rows"]))
            count += int(row["rows"])
            job.report(count)
        bar.close()

    def encode_texts(
        self, model: Any, tokenizer: Any, texts: Any, *, batch_size: int, progress: bool
    ) -> np.ndarray:
        """The pool in chunks over an actor pool, each actor holding the model; one array
        [M, D] in the pool's order."""
        return _encode_texts(
            model,
            tokenizer,
            checked_texts(texts, batch_size),
            batch_size=batch_size,
            workers=self.workers,
            address=self.address,
            num_gpus_per_worker=self.num_gpus_per_worker,
            progress=progress,
        )


class _Decomposing:
    """What both writing actors share: the model on the actor's device, and the store's
    manifest, and a `PartWriter` for what they decompose."""

    def __init__(
        self, manifest: Any, out: str, batch_size: int, use_gpu: bool, strict: bool = False
    ) -> None:
        import ray
        import torch

        _use_assigned_cpus()
        m: Manifest = ray.get(manifest)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        net, self.preprocess, _ = load(
            m.model, pretrained=m.pretrained, device=device, precision=m.precision
        )
        self.device = next(net.parameters()).device
        self.decomposer = Decomposer(net)
        self.manifest, self.root, self.batch_size = m, Path(m.images), batch_size
        self.part = PartWriter(out, m, device=self.device, strict=strict)

    def _decompose(self, batches: Iterable[tuple[Any, list[int], list[tuple[int, str]]]]) -> None:
        """Each (images, their file indices, unreadable files) batch into the part."""
        for images, indices, unreadable in batches:
            rows = {}
            if images is not None:
                d = self.decomposer.decompose(
                    images.to(self.device), convention=self.manifest.convention
                )
                rows = {k: getattr(d, k) for k in DECOMPOSED}
            self.part.add(rows, indices, unreadable)
            if self.part.stopped:
                break
        self.part.commit()


class _ShardWriter(_Decomposing):
    """A Ray Data actor: holds the model, writes the shards it is given."""

    def __init__(
        self,
        manifest: Any,
        out: str,
        batch_size: int,
        use_gpu: bool,
        strict: bool = False,
        before_shard: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(manifest, out, batch_size, use_gpu, strict)
        self.files = list(self.manifest.files)
        self.before_shard = before_shard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for start, end in zip(batch["start"], batch["end"], strict=True):
            self._write(int(start), int(end))
        return {"start": batch["start"], "end": batch["end"]}

    def _write(self, start: int, end: int) -> None:
        import torch

        if self.before_shard is not None:
            self.before_shard(start)
        loader = torch.utils.data.DataLoader(
            TolerantImages(self.root, self.files[:end], self.preprocess, start),
            batch_size=self.batch_size,
            num_workers=0,
            collate_fn=collate_readable,
        )
        self._decompose((b.images, b.indices, b.unreadable) for b in loader)


class _SampleWriter(_Decomposing):
    """A Ray Data actor: holds the model, writes each batch of WebDataset samples as a part."""

    def __init__(self, manifest: Any, done: Any, out: str, batch_size: int, use_gpu: bool) -> None:
        import ray

        super().__init__(manifest, out, batch_size, use_gpu)
        self.index = {f: i for i, f in enumerate(self.manifest.files)}
        self.done = ray.get(done)
        self.shards: dict[str, str] = {}  # shard path as Ray Data gives it → name in the index

    def _image(self, batch: dict[str, Any], row: int) -> tuple[str | None, bytes | None]:
        """The sample's listed name and image bytes (its first image member)."""
        url = str(batch["__url__"][row])
        if url not in self.shards:  # once per shard, not per sample
            self.shards[url] = str(Path(url).resolve().relative_to(self.root))
        shard, key = self.shards[url], str(batch["__key__"][row])
        for column, values in batch.items():
            if column.startswith("__") or values[row] is None:
                continue
            name = f"{shard}{MEMBER_SEPARATOR}{key}.{column}"
            if name in self.index:
                return name, values[row]
        return None, None

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        images, indices, unreadable = [], [], []
        for row in range(len(batch["__key__"])):
            name, data = self._image(batch, row)
            if name is None or self.index[name] in self.done:
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    images.append(self.preprocess(im.convert("RGB")))
                indices.append(self.index[name])
            except (OSError, ValueError, SyntaxError) as e:
                unreadable.append((self.index[name], why_unreadable(self.root / name, e)))
        step = self.batch_size
        batches = [
            (torch.stack(images[i : i + step]), indices[i : i + step], [])
            for i in range(0, len(images), step)
        ]
        if unreadable:
            batches.append((None, [], unreadable))
        if batches:
            self._decompose(batches)
        return {"rows": np.array([len(indices) + len(unreadable)])}


class _TextEncoder:
    """A Ray Data actor: holds the model's text tower, encodes chunks of the pool."""

    def __init__(self, payload: Any, texts: Any, chunk: int, use_gpu: bool) -> None:
        import ray
        import torch

        _use_assigned_cpus()
        model, self.tokenizer, self.batch_size = ray.get(payload)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()
        self.texts, self.chunk = ray.get(texts), chunk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = [
            encode_texts(
                self.model,
                self.tokenizer,
                self.texts[int(i) * self.chunk : (int(i) + 1) * self.chunk],
                batch_size=self.batch_size,
                progress=False,
            )
            for i in batch["index"]
        ]
        # One chunk per call (batch_size=1), so the column holds one [n, D] array.
        return {"index": batch["index"], "embeddings": np.stack(out)}


def _on_cpu(model: Any) -> Any:
    """The model itself if it is on the CPU, else a CPU copy (the caller's stays put)."""
    import copy

    if next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu()


def _encode_texts(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int,
    workers: int,
    address: str | None,
    num_gpus_per_worker: float | None,
    progress: bool,
    chunk: int = 8192,
) -> np.ndarray:
    """`RayEngine.encode_texts`: the pool in chunks over an actor pool."""
    from tqdm.auto import tqdm

    ray = _ray()
    if workers < 1 or chunk < 1:
        raise InputError(f"workers and chunk: expected >= 1, got {workers} and {chunk}")
    _connect(ray, address)
    chunks = -(-len(texts) // chunk)
    encoded = _actor_pool(
        ray,
        ray.data.from_items([{"index": i} for i in range(chunks)]),
        _TextEncoder,
        workers,
        num_gpus_per_worker,
        payload=ray.put((_on_cpu(model), tokenizer, batch_size)),
        texts=ray.put(list(texts)),
        chunk=chunk,
    )
    parts: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(texts), desc="encoding texts", unit="text", disable=not progress)
    for row in encoded.iter_rows():
        parts[int(row["index"])] = np.asarray(row["embeddings"])
        bar.update(len(parts[int(row["index"])]))
    bar.close()
    return np.concatenate([parts[i] for i in range(chunks)])
