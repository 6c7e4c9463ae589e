"""Extraction and text encoding on a Ray cluster (`engine="ray"`; `pip install 'textspan[ray]'`).

Extraction is a Ray Data pipeline over *shards*, fixed ranges of image rows. Each row of the
dataset names one shard; `map_batches` sends it to an actor of a pool in which every actor
holds the model on its device (a GPU when it was given one). The actor reads the shard's
images, decomposes them, and writes the shard — its contributions and the float64 statistics
of its heads — to a temporary folder that it renames into `out/shards/` when complete, so a
shard is there whole or not at all. Ray restarts an actor that dies and retries its shard
(writing a shard twice gives the same files). When every shard is there, the driver merges
them, in row order, into one ordinary store (`open_store` reads it) and merges the shards'
`HeadStats`; then it removes the shards. A driver killed anywhere resumes when rerun with the
same arguments: shards already written are not computed again.

The store must be on storage every worker and the driver can reach (a shared file system).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.stats import HeadStats
from ..datasets import manifest_of, open_images
from ..errors import InputError, MissingDependencyError, StoreError, UnreadableImageError
from ..models import Decomposer, encode_texts, load, skeleton, term_names, tower_of
from ..store.format import (
    check_resume,
    checksum,
    create_arrays,
    open_store,
    read_json,
    row_shapes,
    write_atomic,
    writer_lock,
)
from ..store.images import MEMBER_SEPARATOR, TolerantImages, collate_readable
from ..store.sums import DeviceStats, save_sums, stats_from_sums

__all__ = ["SHARDS", "encode_texts_ray", "extract_ray"]

SHARDS = "shards"


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


def _shard_name(start: int, end: int) -> str:
    return f"{start:010d}-{end:010d}"


def _plan(count: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(count, s + shard_size)) for s in range(0, count, shard_size)]


class _Decomposing:
    """What both writing actors share: the model on the actor's device, and writing one unit
    of rows — their contributions, file indices, unreadable files and statistics — to a
    temporary folder renamed into place when complete, so it is there whole or not at all."""

    def __init__(
        self,
        model: str,
        pretrained: str | None,
        precision: str,
        root: str,
        out: str,
        dtype: str,
        batch_size: int,
        use_gpu: bool,
        convention: str,
    ) -> None:
        import torch

        _use_assigned_cpus()
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        net, self.preprocess, _ = load(
            model, pretrained=pretrained, device=device, precision=precision
        )
        self.device = next(net.parameters()).device
        self.decomposer = Decomposer(net)
        tower = self.decomposer.tower
        self.shape = (tower.layers, tower.heads, tower.dim)
        self.shapes = row_shapes(*self.shape, len(term_names(tower)))
        self.root, self.out = Path(root), Path(out)
        self.dtype, self.batch_size = np.dtype(dtype), batch_size
        self.convention = convention

    def _decompose(self, batches: Any) -> tuple[dict[str, list[np.ndarray]], Any]:
        """Each image batch decomposed: the rows of every array, and their statistics."""
        rows: dict[str, list[np.ndarray]] = {
            k: [] for k in ("heads", "mlps", "class_token", "representation")
        }
        acc = DeviceStats(self.shape[:2], self.shape[2], self.device)
        for images in batches:
            d = self.decomposer.decompose(images.to(self.device), convention=self.convention)
            acc.update(d.heads)
            for k, v in rows.items():
                v.append(getattr(d, k).cpu().numpy().astype(self.dtype))
        return rows, acc

    def _save(self, final: Path, rows, acc, indices: list[int], skipped: dict) -> None:
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k, v in rows.items():
            empty = np.zeros((0, *self.shapes[k]), dtype=self.dtype)
            np.save(tmp / f"{k}.npy", np.concatenate(v) if v else empty)
        np.save(tmp / "indices.npy", np.array(indices, dtype=np.int64))
        (tmp / "skipped.json").write_text(json.dumps(skipped))
        if indices:
            stats_from_sums(acc.state()).save(tmp / "stats.npz")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:  # another attempt of the same unit finished first: same content
            shutil.rmtree(tmp, ignore_errors=True)


class _ShardWriter(_Decomposing):
    """A Ray Data actor: holds the model, writes the shards it is given."""

    def __init__(
        self,
        model: str,
        pretrained: str | None,
        precision: str,
        root: str,
        files: Any,
        out: str,
        dtype: str,
        batch_size: int,
        use_gpu: bool,
        before_shard: Callable[[int], None] | None = None,
        convention: str = "textspan",
    ) -> None:
        import ray

        super().__init__(
            model, pretrained, precision, root, out, dtype, batch_size, use_gpu, convention
        )
        self.files = ray.get(files) if isinstance(files, ray.ObjectRef) else files
        self.before_shard = before_shard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for start, end in zip(batch["start"], batch["end"], strict=True):
            self._write(int(start), int(end))
        return {"start": batch["start"], "end": batch["end"]}

    def _write(self, start: int, end: int) -> None:
        import torch

        final = self.out / SHARDS / _shard_name(start, end)
        if final.is_dir():
            return
        if self.before_shard is not None:
            self.before_shard(start)
        loader = torch.utils.data.DataLoader(
            TolerantImages(self.root, self.files[:end], self.preprocess, start),
            batch_size=self.batch_size,
            num_workers=0,
            collate_fn=collate_readable,
        )
        indices, skipped = [], {}

        def readable():
            for batch in loader:
                skipped.update({self.files[i]: why for i, why in batch.unreadable})
                if batch.images is not None:
                    indices.extend(batch.indices)
                    yield batch.images

        rows, acc = self._decompose(readable())
        self._save(final, rows, acc, indices, skipped)


def _prepare(
    out: Path, manifest: dict[str, Any], shard_size: int, folder: str = SHARDS
) -> tuple[Path, bool]:
    """Writes or checks the manifest and the shard plan; True when the store is complete."""
    shards = out / folder
    if (out / "manifest.json").exists():
        old = read_json(out / "manifest.json", f"store {out}: manifest.json")
        check_resume(old, manifest, set(), out)
        progress = out / "progress.json"
        if progress.exists():
            record = read_json(progress, f"store {out}: progress.json")
            done = record.get("files_done", record.get("done"))
            if done == manifest["count"]:
                return shards, True
            if done:
                raise StoreError(
                    f"{out} holds a store begun by the default engine ({done} images done): "
                    "finish it with the default engine, or use another output folder"
                )
        plan = read_json(shards / "plan.json", f"store {out}: {folder}/plan.json")
        if plan.get("shard_size") != shard_size:
            raise StoreError(
                f"{out} was begun with shard_size={plan.get('shard_size')}, not {shard_size}: "
                "rerun with the same shard size to resume"
            )
        return shards, False
    shards.mkdir(parents=True, exist_ok=True)
    write_atomic(shards / "plan.json", json.dumps({"shard_size": shard_size}).encode())
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return shards, False


def _merge(
    out: Path,
    manifest: dict[str, Any],
    labels: list[int],
    plan: list[tuple[int, int]],
    strict: bool,
) -> None:
    """The shards, in file order, into one store (a row per readable image); their statistics
    merged (Chan et al.). With `strict`, an unreadable image stops here instead: the shards
    holding one are removed (a rerun computes them again) and the error names them."""
    folders = [out / SHARDS / _shard_name(start, end) for start, end in plan]
    skipped: dict[str, str] = {}
    for folder in folders:
        skipped.update(read_json(folder / "skipped.json", f"shard {folder.name}"))
    if strict and skipped:
        for folder in folders:
            if read_json(folder / "skipped.json", f"shard {folder.name}"):
                shutil.rmtree(folder)
        first = next(iter(skipped.values()))
        raise UnreadableImageError(
            f"{len(skipped)} unreadable images (--strict), e.g. {first}: remove or repair "
            "them and rerun the same command (the other shards are kept)"
        )
    arrays = create_arrays(out, manifest)
    stats = None
    row = 0
    for folder in folders:
        indices = np.load(folder / "indices.npy")
        if not len(indices):
            continue
        end = row + len(indices)
        for name in ("heads", "mlps", "class_token", "representation"):
            arrays[name][row:end] = np.load(folder / f"{name}.npy")
        arrays["labels"][row:end] = np.asarray(labels)[indices]
        shard_stats = HeadStats.load(folder / "stats.npz")
        stats = shard_stats if stats is None else stats + shard_stats
        row = end
    if stats is None:
        raise InputError(f"images: none of the {manifest['count']} images could be read")
    _finish(out, manifest, arrays, stats, row, skipped)
    shutil.rmtree(out / SHARDS)


# Rows per checksum range of a store written by the Ray engine.
CHECKSUM_ROWS = 1024


def _finish(
    out: Path,
    manifest: dict[str, Any],
    arrays: dict[str, Any],
    stats: HeadStats,
    row: int,
    skipped: dict[str, str],
) -> None:
    """The merged store's checksums, statistics and progress record."""
    for a in arrays.values():
        a.flush()
    bounds = [(s, min(row, s + CHECKSUM_ROWS)) for s in range(0, row, CHECKSUM_ROWS)]
    ranges = [[s, e, checksum(arrays, s, e)] for s, e in bounds]
    # The store keeps sums about a shift; about the mean, the first sum is zero.
    save_sums(
        out / f"stats-{row}.npz",
        {
            "count": np.array(row),
            "shift": stats.mean,
            "sum1": np.zeros_like(stats.mean),
            "sum2": stats.covariance * row,
        },
    )
    progress = {
        "done": row,
        "files_done": manifest["count"],
        "skipped": skipped,
        "failed": None,
        "ranges": ranges,
    }
    write_atomic(out / "progress.json", json.dumps(progress).encode())


def _tower_shape(model: str, pretrained: Any) -> tuple[int, int, int, tuple[str, ...]]:
    """(layers, heads, D, the mlps terms' names) of the model, checked for support, without
    loading weights where the model is an open_clip architecture."""
    tower = tower_of(skeleton(model, pretrained))
    return tower.layers, tower.heads, tower.dim, term_names(tower)


def _write_shards(
    ray: Any,
    todo: list[tuple[int, int]],
    total: int,
    manifest: dict[str, Any],
    files: list[str],
    root: Path,
    out: Path,
    options: dict[str, Any],
    after_shard: Callable[[int], None] | None,
    progress: bool,
) -> None:
    """The shards in `todo`, written by a pool of actors; the bar counts images."""
    from tqdm.auto import tqdm

    written = _actor_pool(
        ray,
        ray.data.from_items([{"start": s, "end": e} for s, e in todo]),
        _ShardWriter,
        options["workers"],
        options["num_gpus_per_worker"],
        model=manifest["model"],
        pretrained=manifest["pretrained"],
        precision=manifest["precision"],
        root=str(root.resolve()),
        files=ray.put(files),
        out=str(out.resolve()),
        dtype=manifest["dtype"],
        batch_size=options["batch_size"],
        before_shard=options["before_shard"],
        convention=manifest["convention"],
    )
    bar = tqdm(
        total=total,
        initial=total - sum(e - s for s, e in todo),
        desc="extracting",
        unit="img",
        disable=not progress,
    )
    for i, row in enumerate(written.iter_rows(), 1):
        bar.update(int(row["end"]) - int(row["start"]))
        if after_shard is not None:
            after_shard(i)
    bar.close()


def extract_ray(
    images: str | os.PathLike | Any,
    out: str | os.PathLike,
    model: str,
    pretrained: str | None,
    batch_size: int,
    workers: int,
    dtype: str,
    precision: str,
    address: str | None = None,
    num_gpus_per_worker: float | None = None,
    shard_size: int = 1024,
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
    before_shard: Callable[[int], None] | None = None,
    strict: bool = False,
    convention: str = "textspan",
) -> Any:
    """`textspan.extract(..., engine="ray")`: see the module docstring.

    `after_shard(n)` is called on the driver once n shards of this run are written;
    `before_shard(start)` in the actor before it computes the shard starting at row `start`
    (the tests kill the driver and an actor with them)."""
    ray = _ray()
    if workers < 1 or shard_size < 1:
        raise InputError(f"workers and shard_size: expected >= 1, got {workers} and {shard_size}")
    options = {
        "workers": workers,
        "num_gpus_per_worker": num_gpus_per_worker,
        "batch_size": batch_size,
        "before_shard": before_shard,
    }
    out = Path(out)
    source = open_images(images)
    if source.reader is not None and source.name != "webdataset":
        raise InputError(f"the Ray engine cannot read the items of {source.name}")
    root, files, labels = source.root, source.files, source.labels.tolist()
    shape = _tower_shape(model, pretrained)
    manifest = manifest_of(source, model, pretrained, precision, dtype, shape, convention)
    if out.exists() and not out.is_dir():
        raise InputError(f"out: expected a folder for the store, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):
        if source.name == "webdataset":
            _extract_samples(ray, out, manifest, files, labels, root, address, options, progress)
        else:
            _extract_shards(
                ray,
                out,
                manifest,
                files,
                labels,
                root,
                shard_size,
                address,
                options,
                after_shard,
                progress,
                strict,
            )
    return open_store(out)


def _extract_shards(
    ray: Any,
    out: Path,
    manifest: dict[str, Any],
    files: list[str],
    labels: list[int],
    root: Path,
    shard_size: int,
    address: str | None,
    options: dict[str, Any],
    after_shard: Callable[[int], None] | None,
    progress: bool,
    strict: bool,
) -> None:
    shards, complete = _prepare(out, manifest, shard_size)
    if complete:
        print(f"textspan extract: {out} is complete", flush=True)
        return
    plan = _plan(len(files), shard_size)
    todo = [(s, e) for s, e in plan if not (shards / _shard_name(s, e)).is_dir()]
    print(
        f"textspan extract (ray): {len(files)} images into {out}, {len(plan)} shards, "
        f"{len(plan) - len(todo)} done before",
        flush=True,
    )
    if todo:
        _connect(ray, address)
        _write_shards(
            ray, todo, len(files), manifest, files, root, out, options, after_shard, progress
        )
    missing = [(s, e) for s, e in plan if not (shards / _shard_name(s, e)).is_dir()]
    if missing:
        raise RuntimeError(f"{len(missing)} shards were not written, e.g. rows {missing[0]}")
    _merge(out, manifest, labels, plan, strict)
    print(f"done: {out}", flush=True)


# WebDataset shards -----------------------------------------------------------------------
#
# Ray Data reads the .tar shards itself (`ray.data.read_webdataset`, undecoded); a pool of
# actors decodes each sample's image, decomposes a batch of them and writes it as a *part*
# (the rows' file indices, contributions and statistics), renamed into `out/parts/` when
# complete. A rerun skips the samples already in a part. The driver then writes every part's
# rows at their places in file order.

PARTS = "parts"


def _complete_parts(parts: Path) -> list[tuple[Path, np.ndarray, dict[str, str]]]:
    """Each complete part (not a temporary folder being written): its folder, the file
    indices of its readable rows, and its unreadable files by file index."""
    folders = sorted(f for f in parts.iterdir() if f.is_dir() and ".tmp-" not in f.name)
    return [
        (f, np.load(f / "indices.npy"), json.loads((f / "skipped.json").read_text()))
        for f in folders
    ]


def _parts_done(parts: Path) -> set[int]:
    """File indices already written (readable or skipped) by complete parts."""
    done: set[int] = set()
    for _, indices, skipped in _complete_parts(parts) if parts.is_dir() else []:
        done.update(int(i) for i in indices)
        done.update(int(i) for i in skipped)
    return done


class _SampleWriter(_Decomposing):
    """A Ray Data actor: holds the model, writes each batch of WebDataset samples as a part."""

    def __init__(
        self,
        model: str,
        pretrained: str | None,
        precision: str,
        root: str,
        index: Any,
        done: Any,
        out: str,
        dtype: str,
        batch_size: int,
        use_gpu: bool,
        convention: str = "textspan",
    ) -> None:
        import ray

        super().__init__(
            model, pretrained, precision, root, out, dtype, batch_size, use_gpu, convention
        )
        self.index, self.done = ray.get(index), ray.get(done)
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

        images, indices, skipped = [], [], {}
        for row in range(len(batch["__key__"])):
            name, data = self._image(batch, row)
            if name is None or self.index[name] in self.done:
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    images.append(self.preprocess(im.convert("RGB")))
                indices.append(self.index[name])
            except (OSError, ValueError, SyntaxError) as e:
                skipped[str(self.index[name])] = f"image {self.root / name} cannot be read: {e}"
        if not images and not skipped:
            return {"rows": np.array([0])}
        step = self.batch_size
        rows, acc = self._decompose(
            torch.stack(images[i : i + step]) for i in range(0, len(images), step)
        )
        first = min([*indices, *(int(i) for i in skipped)])
        final = self.out / PARTS / f"{first:010d}-{len(indices) + len(skipped):06d}"
        self._save(final, rows, acc, indices, skipped)
        return {"rows": np.array([len(indices) + len(skipped)])}


def _extract_samples(
    ray: Any,
    out: Path,
    manifest: dict[str, Any],
    files: list[str],
    labels: list[int],
    root: Path,
    address: str | None,
    options: dict[str, Any],
    progress: bool,
) -> None:
    """WebDataset shards through Ray Data's reader into the store (see above)."""
    from tqdm.auto import tqdm

    parts, complete = _prepare(out, manifest, 0, PARTS)
    if complete:
        print(f"textspan extract: {out} is complete", flush=True)
        return
    done = _parts_done(parts)
    print(
        f"textspan extract (ray, WebDataset): {len(files)} images into {out}, {len(done)} "
        "done before",
        flush=True,
    )
    if len(done) < len(files):
        _connect(ray, address)
        shards = sorted({f.split(MEMBER_SEPARATOR, 1)[0] for f in files})
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
            options["workers"],
            options["num_gpus_per_worker"],
            rows_per_call=options["batch_size"],
            spare_cpu=True,
            model=manifest["model"],
            pretrained=manifest["pretrained"],
            precision=manifest["precision"],
            root=str(root.resolve()),
            index=ray.put({f: i for i, f in enumerate(files)}),
            done=ray.put(done),
            out=str(out.resolve()),
            dtype=manifest["dtype"],
            batch_size=options["batch_size"],
            convention=manifest["convention"],
        )
        bar = tqdm(total=len(files), initial=len(done), desc="extracting", unit="img",
                   disable=not progress)  # fmt: skip
        for row in written.iter_rows():
            bar.update(int(row["rows"]))
        bar.close()
    _merge_parts(out, manifest, labels, files)
    print(f"done: {out}", flush=True)


def _merge_parts(out: Path, manifest: dict[str, Any], labels: list[int], files: list[str]) -> None:
    """Every part's rows at their places in file order (a row per readable image), the
    statistics merged, the parts removed."""
    parts = _complete_parts(out / PARTS)
    skipped = {files[int(k)]: why for _, _, unreadable in parts for k, why in unreadable.items()}
    # The store holds a row per readable image, in file order.
    readable = np.sort(np.concatenate([indices for _, indices, _ in parts]).astype(np.int64))
    if len(readable) + len(skipped) != len(files):
        raise RuntimeError(f"{len(files) - len(readable) - len(skipped)} images were not written")
    arrays = create_arrays(out, manifest)
    stats = None
    for folder, indices, _ in parts:
        if not len(indices):
            continue
        rows = np.searchsorted(readable, indices)
        for name in ("heads", "mlps", "class_token", "representation"):
            arrays[name][rows] = np.load(folder / f"{name}.npy")
        arrays["labels"][rows] = np.asarray(labels)[indices]
        part_stats = HeadStats.load(folder / "stats.npz")
        stats = part_stats if stats is None else stats + part_stats
    if stats is None:
        raise InputError(f"images: none of the {manifest['count']} images could be read")
    _finish(out, manifest, arrays, stats, len(readable), skipped)
    shutil.rmtree(out / PARTS)


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


def encode_texts_ray(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    batch_size: int,
    workers: int,
    address: str | None = None,
    num_gpus_per_worker: float | None = None,
    chunk: int = 8192,
    progress: bool = True,
) -> np.ndarray:
    """`textspan.encode_texts(..., engine="ray")`: the pool in chunks over an actor pool, each
    actor holding the model; one array [M, D] in the pool's order."""
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
