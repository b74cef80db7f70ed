"""Stage ``imagenet_shards``: ImageNet-style images -> ADM-center-cropped WebDataset tars.

    python -m sfd_core.imagenet_shards --config cfg.json [--set key=value ...]

Sources: ``builtin:tiny`` (sfd_core.builtin_data), a folder ``<class>/**/<image>`` (torchvision ImageFolder
rules: sorted class folders give the labels, files sorted within a class), a validation folder of flat images
with ``val_labels_file``, or a ``.tar`` of either (a tar of per-class tars, like ILSVRC2012_img_train.tar, too).

Order: the sorted (ImageFolder) item list is shuffled (``shuffle``, default on) by sorting on
``blake2b(f"{seed}/{key}")``, a seeded permutation that depends on no library's RNG stream, so every shard (and
every Zarr chunk downstream, whose rows follow the shards) mixes classes; ``limit`` takes the first items of that
order. Keys and labels are the source's. Shard ``k`` holds items ``[k * images_per_shard, (k + 1) *
images_per_shard)`` of the ordered list minus the ones that cannot be decoded, so a shard's content depends only on
its own items: a killed run resumes by skipping shards whose part marker exists and gives byte-identical shards.
Each sample is ``{key}.jpg|png`` (the crop), ``{key}.cls`` (label) and ``{key}.json`` (source, original size,
source mode, class).

Storage errors are retried with backoff by ``storage.fs``; when the retries run out (the store stays down) the
stage stops with an error that says how many shards are committed, and a rerun resumes from there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import re
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from sfd_core.builtin_data import CLASS_NAMES as BUILTIN_CLASS_NAMES
from sfd_core.builtin_data import class_plan, load_photo, make_image
from sfd_core.config import ConfigError, load_config
from sfd_core.imaging import (DEFAULT_MAX_PIXELS, IMAGE_FORMATS, center_crop_arr, decode_image, encode_image,
                              needs_upscale)
from sfd_core.reporting import Progress, log
from sfd_core.stage_output import finished_manifest
from storage import fs
from storage.manifest import write_success
from storage.parts import PartMarkers
from storage.shards import write_shard

STAGE = "imagenet_shards"
CODE_VERSION = "2"  # 2: shuffled shard order
BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("tiny",)
# torchvision's ImageFolder extensions, so the same files count as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHARD_PATTERN = "shard-{:06d}.tar"
SKIP_EXTENSION = "unsupported_extension"
SKIP_NO_LABEL = "no_label"
SKIP_UNREADABLE = "unreadable"
POOL_CHUNKSIZE = 8
IN_FLIGHT_PER_WORKER = 64  # bounds the bytes a tar source may read ahead of the workers


@dataclass
class Config:
    """Shard an ImageNet-style image source into WebDataset tars with the ADM center crop."""
    source: str = "builtin:tiny"
    out_url: str = ""
    resolution: int = 256
    image_format: str = "jpg"
    jpeg_quality: int = 95
    images_per_shard: int = 10000
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    val_labels_file: str | None = None
    builtin_images_per_class: int = 32
    limit: int | None = None           # first ``limit`` items of the (shuffled) order
    shuffle: bool = True               # seeded permutation of the sorted items (shards mix classes)
    seed: int = 0                      # the permutation's seed (and the builtin crops')


# ------------------------------------------------------------------------------------------------ sources

@dataclass(frozen=True)
class Item:
    key: str
    label: int
    class_name: str
    origin: str  # where the image comes from, relative to the source (builtin: replaced by the crop description)
    ref: Any     # how the source reads it: a Path, a tar member reference, or a builtin index


@dataclass
class Listing:
    classes: list[str]
    items: list[Item]
    skipped: list[dict[str, str]]  # files left out while listing: {"path", "reason"}


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _sample_key(class_name: str, relative_stem: str, labelled_by_file: bool) -> str:
    """``n01440764_10026`` stays as is; other names get their class as prefix so keys are unique per dataset."""
    stem = _KEY_UNSAFE.sub("_", relative_stem)
    if labelled_by_file or stem.startswith(_KEY_UNSAFE.sub("_", class_name) + "_"):
        return stem
    return f"{_KEY_UNSAFE.sub('_', class_name)}_{stem}"


def _read_val_labels(path: str) -> dict[str, str]:
    """``{file stem: class}`` from lines ``<file> <class>`` or CSV ``<file>,<class> ...`` (Kaggle's
    LOC_val_solution.csv; its ``ImageId`` header line is skipped)."""
    labels: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        tokens = [t for t in re.split(r"[,\s]+", line.strip()) if t]
        if not tokens or (number == 1 and tokens[0] == "ImageId"):
            continue
        if len(tokens) < 2:
            raise ConfigError(f"{STAGE}.val_labels_file: line {number} of {path} is {line!r}; expected "
                              "'<image file> <class id>' (e.g. 'ILSVRC2012_val_00000001.JPEG n01751748')")
        labels[Path(tokens[0]).stem] = tokens[1]
    return labels


def _items_from_files(files: Sequence[tuple[str, Any]], val_labels: dict[str, str] | None) -> Listing:
    """Files as (relative posix path, ref) -> labelled items in ImageFolder order."""
    skipped: list[dict[str, str]] = []
    entries: list[tuple[str, str, str, Any]] = []  # (class, stem relative to the class, path, ref)
    class_folders: set[str] = set()
    for path, ref in files:
        parts = path.split("/")
        if val_labels is None and len(parts) > 1:
            class_folders.add(parts[0])
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append({"path": path, "reason": SKIP_EXTENSION})
            continue
        stem_path = path.rsplit(".", 1)[0]
        if val_labels is not None:
            class_name = val_labels.get(Path(path).stem)
            relative_stem = Path(path).stem
        elif len(parts) > 1:
            class_name, relative_stem = parts[0], stem_path.split("/", 1)[1]
        else:
            class_name, relative_stem = None, stem_path
        if class_name is None:
            skipped.append({"path": path, "reason": SKIP_NO_LABEL})
            continue
        entries.append((class_name, relative_stem, path, ref))
    classes = sorted(set(val_labels.values()) if val_labels is not None else class_folders)
    index = {name: i for i, name in enumerate(classes)}
    items: list[Item] = []
    used_keys: Counter[str] = Counter()
    for class_name, relative_stem, path, ref in sorted(entries, key=lambda e: (e[0], e[2])):
        key = _sample_key(class_name, relative_stem, val_labels is not None)
        used_keys[key] += 1
        if used_keys[key] > 1:  # e.g. x.jpg and x.png in one class: keep both, deterministically renamed
            key = f"{key}_{used_keys[key]}"
        items.append(Item(key, index[class_name], class_name, path, ref))
    return Listing(classes, items, sorted(skipped, key=lambda s: s["path"]))


def _strip_common_folder(files: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A tar of ``train/n01440764/x.JPEG`` lists like the folder ``train``."""
    # Stop while some file sits directly under the remaining prefix: that level holds the class folders.
    while files and all(p.count("/") >= 2 for p, _ in files):
        first = files[0][0].split("/", 1)[0]
        if any(p.split("/", 1)[0] != first for p, _ in files):
            break
        files = [(p.split("/", 1)[1], ref) for p, ref in files]
    return files


class FolderSource:
    """Images on local disk; workers read the files themselves."""

    def __init__(self, root: str, val_labels: dict[str, str] | None):
        self.root = Path(root)
        files = sorted((p.relative_to(self.root).as_posix(), p) for p in self.root.rglob("*") if p.is_file())
        self.listing = _items_from_files(files, val_labels)

    def payloads(self, items: Iterable[Item]) -> Iterator[tuple[str, Any]]:
        for item in items:
            yield item.origin, item.ref


class TarSource:
    """A tar of an image folder, or of per-class tars (``<class>.tar`` members, as ILSVRC2012_img_train.tar).

    Listing records each file's data offset and size in the (decompressed) tar stream, so items are read in any
    order by a seek and a read, without reopening the per-class tars."""

    def __init__(self, path: str, val_labels: dict[str, str] | None):
        self.path = path
        self._tar = tarfile.open(path)
        files: list[tuple[str, Any]] = []
        for member in self._tar.getmembers():
            if not member.isfile():
                continue
            if member.name.lower().endswith(".tar"):
                class_name = Path(member.name).stem
                try:
                    inner_tar = tarfile.open(fileobj=self._tar.extractfile(member), mode="r:")
                except tarfile.TarError as error:
                    raise ConfigError(f"{STAGE}.source: {path}: member {member.name!r} is not an uncompressed "
                                      f"tar ({error})") from error
                for inner in inner_tar.getmembers():
                    if inner.isfile():
                        files.append((f"{class_name}/{inner.name}", self._span(inner, member.offset_data)))
            else:
                files.append((member.name, self._span(member, 0)))
        self.listing = _items_from_files(_strip_common_folder(sorted(files, key=lambda f: f[0])), val_labels)

    def _span(self, member: tarfile.TarInfo, base: int) -> tuple[int, int]:
        if member.issparse():
            raise ConfigError(f"{STAGE}.source: {self.path}: sparse member {member.name!r} is not supported")
        return base + member.offset_data, member.size

    def payloads(self, items: Iterable[Item]) -> Iterator[tuple[str, Any]]:
        stream = self._tar.fileobj  # the raw file, or the decompressed stream of a .tar.gz
        for item in items:
            offset, size = item.ref
            stream.seek(offset)
            yield f"{os.path.basename(self.path)}:{item.origin}", stream.read(size)


class BuiltinSource:
    """sfd_core.builtin_data photos; the crops are made here (in any order) and handed to the workers as images."""

    def __init__(self, images_per_class: int, seed: int):
        self._photos = {name: load_photo(name) for name in BUILTIN_CLASS_NAMES}
        self._plans = {name: class_plan(name, images_per_class, seed, self._photos[name].size)
                       for name in BUILTIN_CLASS_NAMES}
        items = [Item(plan.key, label, name, f"{BUILTIN_PREFIX}{name}/{i}", (name, i))
                 for label, name in enumerate(BUILTIN_CLASS_NAMES) for i, plan in enumerate(self._plans[name])]
        self.listing = Listing(list(BUILTIN_CLASS_NAMES), items, [])

    def payloads(self, items: Iterable[Item]) -> Iterator[tuple[str, Any]]:
        for item in items:
            name, i = item.ref
            plan = self._plans[name][i]
            yield plan.source, make_image(self._photos[name], plan)


def open_source(cfg: Config) -> FolderSource | TarSource | BuiltinSource:
    if cfg.source.startswith(BUILTIN_PREFIX):
        return BuiltinSource(cfg.builtin_images_per_class, cfg.seed)
    val_labels = _read_val_labels(cfg.val_labels_file) if cfg.val_labels_file else None
    if os.path.isdir(cfg.source):
        return FolderSource(cfg.source, val_labels)
    return TarSource(cfg.source, val_labels)


def ordered_items(items: Sequence[Item], shuffle: bool, seed: int) -> list[Item]:
    """The order items are written in: as listed, or a seeded permutation (sort on a hash of seed and key, ties
    by listing position), the same on every machine and library version."""
    if not shuffle:
        return list(items)

    def rank(pair: tuple[int, Item]) -> tuple[bytes, int]:
        return hashlib.blake2b(f"{seed}/{pair[1].key}".encode(), digest_size=16).digest(), pair[0]

    return [item for _, item in sorted(enumerate(items), key=rank)]


def _keys_digest(items: Sequence[tuple[int, Item]]) -> str:
    return hashlib.blake2b("\n".join(item.key for _, item in items).encode(), digest_size=16).hexdigest()


def check_config(cfg: Config) -> None:
    """Fail before any work, naming the field to fix."""
    if not cfg.out_url:
        raise ConfigError(f"{STAGE}.out_url: missing; set it to the stage output directory (local path or s3://)")
    if cfg.source.startswith(BUILTIN_PREFIX):
        if cfg.source[len(BUILTIN_PREFIX):] not in BUILTIN_NAMES:
            raise ConfigError(f"{STAGE}.source: unknown builtin dataset {cfg.source!r}; "
                              f"valid: {[BUILTIN_PREFIX + n for n in BUILTIN_NAMES]}")
        if cfg.builtin_images_per_class < 1:
            raise ConfigError(f"{STAGE}.builtin_images_per_class: must be >= 1, got {cfg.builtin_images_per_class}")
    elif not os.path.exists(cfg.source):
        raise ConfigError(f"{STAGE}.source: {cfg.source!r} does not exist; set it to an image folder "
                          f"(<class>/*.JPEG), a .tar of one, or {BUILTIN_PREFIX}tiny")
    elif not os.path.isdir(cfg.source) and not tarfile.is_tarfile(cfg.source):
        raise ConfigError(f"{STAGE}.source: {cfg.source!r} is neither a folder nor a tar archive")
    if cfg.val_labels_file and not os.path.isfile(cfg.val_labels_file):
        raise ConfigError(f"{STAGE}.val_labels_file: {cfg.val_labels_file!r} does not exist")
    if cfg.image_format not in IMAGE_FORMATS:
        raise ConfigError(f"{STAGE}.image_format: {cfg.image_format!r}; valid: {list(IMAGE_FORMATS)}")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"{STAGE}.jpeg_quality: {cfg.jpeg_quality} is outside [1, 100]")
    for name in ("resolution", "images_per_shard", "num_workers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{STAGE}.{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.limit is not None and cfg.limit < 0:
        raise ConfigError(f"{STAGE}.limit: must be >= 0 or null, got {cfg.limit}")


# ------------------------------------------------------------------------------------------- the workers

@dataclass(frozen=True)
class CropSettings:
    resolution: int
    image_format: str
    jpeg_quality: int
    max_pixels: int = DEFAULT_MAX_PIXELS


_settings: CropSettings | None = None


def _init_worker(settings: CropSettings) -> None:
    global _settings
    _settings = settings


def prepare_sample(task: tuple[int, str, str, Any]) -> dict[str, Any]:
    """(index, key, origin, payload) -> {"index", "ok", ...}: the encoded crop, or the reason it was skipped.
    The payload is a Path (read here, in the worker), raw bytes, or an RGB image (builtin)."""
    index, key, origin, payload = task
    settings = _settings
    assert settings is not None, "worker not initialised"
    if isinstance(payload, Image.Image):
        image, reason = payload, None
        image.info = {"source_mode": payload.mode, "source_format": None}
    else:
        try:
            data = payload.read_bytes() if isinstance(payload, Path) else payload
        except OSError:
            return {"index": index, "ok": False, "path": origin, "reason": SKIP_UNREADABLE}
        image, reason = decode_image(data, origin, settings.max_pixels)
    if image is None:
        return {"index": index, "ok": False, "path": origin, "reason": reason}
    crop = center_crop_arr(image, settings.resolution)
    return {"index": index, "ok": True, "key": key, "origin": origin, "size": list(image.size),
            "mode": image.info["source_mode"], "upscaled": needs_upscale(image.size, settings.resolution),
            "ext": settings.image_format, "data": encode_image(crop, settings.image_format, settings.jpeg_quality)}


class _BoundedTasks:
    """Feeds the pool's task thread at most ``limit`` tasks ahead of the consumer (Pool.imap reads its input
    eagerly, which would pull a whole tar source into memory)."""

    def __init__(self, tasks: Iterator[Any], limit: int):
        self._tasks, self._slots, self._stop = tasks, threading.Semaphore(limit), threading.Event()

    def __iter__(self) -> Iterator[Any]:
        for task in self._tasks:
            while not self._slots.acquire(timeout=0.5):
                if self._stop.is_set():
                    return
            yield task

    def release(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        self._stop.set()


def _map_ordered(tasks: Iterator[Any], settings: CropSettings, num_workers: int) -> Iterator[dict[str, Any]]:
    if num_workers == 1:
        _init_worker(settings)
        yield from map(prepare_sample, tasks)
        return
    bounded = _BoundedTasks(tasks, num_workers * IN_FLIGHT_PER_WORKER)
    # spawn: the parent may hold torch/OpenMP threads, which fork does not copy safely.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=(settings,)) as pool:
        try:
            for result in pool.imap(prepare_sample, bounded, chunksize=POOL_CHUNKSIZE):
                bounded.release()
                yield result
        finally:
            bounded.stop()


# --------------------------------------------------------------------------------------------- the stage

def shard_url(out_url: str, shard: int) -> str:
    return fs.join(out_url, "shards", SHARD_PATTERN.format(shard))


def _part_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def _shard_samples(results: list[dict[str, Any]], items: list[tuple[int, Item]]) -> list[dict[str, Any]]:
    by_index = dict(items)
    return [{"__key__": by_index[r["index"]].key, "cls": by_index[r["index"]].label, r["ext"]: r["data"],
             "json": {"source": r["origin"], "original_size": r["size"], "source_mode": r["mode"],
                      "class": by_index[r["index"]].class_name}}
            for r in results if r["ok"]]


def _commit_shard(out_url: str, shard: int, items: list[tuple[int, Item]], results: list[dict[str, Any]],
                  markers: PartMarkers) -> None:
    """Write the shard, then its marker (the marker is the commit record the manifest is built from)."""
    written = write_shard(shard_url(out_url, shard), _shard_samples(results, items))
    ok = [r for r in results if r["ok"]]
    by_index = {index: item.label for index, item in items}
    markers.mark(_part_name(shard), {
        "url": shard_url(out_url, shard), "count": written["count"], "bytes": written["bytes"],
        "first_key": items[0][1].key, "items": len(items), "keys_digest": _keys_digest(items),
        "classes": len({by_index[r["index"]] for r in ok}),
        "skipped": [{"path": r["path"], "reason": r["reason"]} for r in results if not r["ok"]],
        "upscaled": sum(r["upscaled"] for r in ok),
        "source_modes": dict(Counter(r["mode"] for r in ok)),
    })


def run(cfg: Config) -> dict[str, Any]:
    check_config(cfg)
    done = finished_manifest(STAGE, cfg.out_url)
    if done is not None:
        return done
    started = time.monotonic()
    source = open_source(cfg)
    listing = source.listing
    items = ordered_items(listing.items, cfg.shuffle, cfg.seed)
    items = items if cfg.limit is None else items[: cfg.limit]
    num_shards = -(-len(items) // cfg.images_per_shard)
    markers = PartMarkers(cfg.out_url)
    finished = markers.all()
    indexed = list(enumerate(items))
    shard_items = {s: indexed[s * cfg.images_per_shard:(s + 1) * cfg.images_per_shard] for s in range(num_shards)}
    for s in range(num_shards):
        info = finished.get(_part_name(s))
        if info is not None and (info["first_key"] != shard_items[s][0][1].key
                                 or info.get("keys_digest") != _keys_digest(shard_items[s])):
            raise RuntimeError(f"{STAGE}: {cfg.out_url} holds shard {s} of a different source listing or order "
                               f"(first key {info['first_key']!r}, now {shard_items[s][0][1].key!r}); "
                               "use a fresh out_url")
    pending = [s for s in range(num_shards) if _part_name(s) not in finished]
    pending_items = [pair for s in pending for pair in shard_items[s]]
    log(f"{STAGE}: {len(items)} images of {len(listing.classes)} classes from {cfg.source} -> {num_shards} "
        f"shards ({num_shards - len(pending)} already done), {cfg.num_workers} workers")
    fs.write_json(fs.join(cfg.out_url, "classes.json"), listing.classes)

    payloads = source.payloads(item for _, item in pending_items)
    tasks = ((index, item.key, origin, payload)
             for (index, item), (origin, payload) in zip(pending_items, payloads))
    settings = CropSettings(cfg.resolution, cfg.image_format, cfg.jpeg_quality)
    progress = Progress(len(pending_items), STAGE, unit="img")
    results = _map_ordered(tasks, settings, cfg.num_workers)
    work_started = time.monotonic()
    committed = num_shards - len(pending)
    try:
        for s in pending:
            shard_results = [next(results) for _ in shard_items[s]]
            progress.update(len(shard_results))
            _commit_shard(cfg.out_url, s, shard_items[s], shard_results, markers)
            committed += 1
    except Exception as error:
        if fs.is_transient(error):  # storage.fs already retried with backoff: the store is down for longer
            raise RuntimeError(f"{STAGE}: storage error writing to {cfg.out_url} after retries "
                               f"({type(error).__name__}: {error}); {committed} of {num_shards} shards are "
                               "committed; rerun the stage to resume from there") from error
        raise
    finally:
        results.close()  # stops the pool if a write failed
    work_seconds = time.monotonic() - work_started
    manifest = _manifest(cfg, listing, markers.all(), num_shards, len(pending_items), work_seconds,
                         time.monotonic() - started)
    try:
        return write_success(cfg.out_url, manifest)
    except Exception as error:
        if fs.is_transient(error):
            raise RuntimeError(f"{STAGE}: storage error writing the manifest of {cfg.out_url} after retries "
                               f"({type(error).__name__}: {error}); all {num_shards} shards are committed; "
                               "rerun the stage to finish") from error
        raise


def _manifest(cfg: Config, listing: Listing, parts: dict[str, dict[str, Any]], num_shards: int,
              processed: int, work_seconds: float, wall_seconds: float) -> dict[str, Any]:
    shards = [parts[_part_name(s)] for s in range(num_shards)]
    skipped_files = list(listing.skipped) + [skip for shard in shards for skip in shard["skipped"]]
    modes: Counter[str] = Counter()
    for shard in shards:
        modes.update(shard["source_modes"])
    rate = processed / work_seconds if processed and work_seconds > 0 else 0.0
    return {
        "stage": STAGE,
        "fingerprint": fs.basename(cfg.out_url),
        "uri": cfg.out_url,
        "code_version": CODE_VERSION,
        "config": dataclasses.asdict(cfg),
        "upstream": {},
        "standins": False,
        "counts": {
            "images": sum(s["count"] for s in shards),
            "shards": num_shards,
            "classes": len(listing.classes),
            "skipped": dict(sorted(Counter(s["reason"] for s in skipped_files).items())),
            "per_shard": [s["count"] for s in shards],
        },
        "order": {"shuffle": cfg.shuffle, "seed": cfg.seed,
                  "method": "sorted by blake2b(f'{seed}/{key}')" if cfg.shuffle else "ImageFolder order"},
        "artifacts": {"shards": [s["url"] for s in shards], "classes": fs.join(cfg.out_url, "classes.json")},
        "skipped_files": skipped_files,
        "stats": {
            "upscaled": sum(s["upscaled"] for s in shards),
            "classes_per_shard": [s.get("classes", 0) for s in shards],
            "source_modes": dict(sorted(modes.items())),
            "shard_bytes": [s["bytes"] for s in shards],
            "images_processed_this_run": processed,
            "throughput_img_per_s": rate,
            "throughput_img_per_s_per_worker": rate / cfg.num_workers,
            "wall_seconds": wall_seconds,
        },
        "metrics": {},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(load_config(Config, argv))


if __name__ == "__main__":
    main()
