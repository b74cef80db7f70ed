"""The builtin tiny dataset: real photos shipped inside scikit-image and scikit-learn (no download).

One class per photo. Each class is expanded to ``images_per_class`` images: image 0 is the whole photo, the rest
are random crops (each side 45-100% of the photo's, so aspect ratios vary) with a coin-flip horizontal mirror.
Everything is drawn from ``numpy.random.default_rng([seed, class_index])``, so the set is identical for a seed.
Big photos (retina, hubble) still exercise the BOX-halving branch of the ADM crop at 256, small crops the upscale.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np
from PIL import Image

MIN_CROP_FRACTION = 0.45


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        # The file that sklearn.datasets.load_sample_image reads, without importing sklearn (seconds).
        import importlib.util

        package_dir = importlib.util.find_spec("sklearn").submodule_search_locations[0]
        with Image.open(f"{package_dir}/datasets/images/{filename}") as image:
            return np.asarray(image.convert("RGB"))

    return load


# class name -> (loader of an HxWx3|4 uint8 array, where it comes from)
PHOTOS: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "astronaut": (_skimage("astronaut"), "skimage.data.astronaut"),
    "chelsea": (_skimage("chelsea"), "skimage.data.chelsea"),
    "coffee": (_skimage("coffee"), "skimage.data.coffee"),
    "rocket": (_skimage("rocket"), "skimage.data.rocket"),
    "hubble_deep_field": (_skimage("hubble_deep_field"), "skimage.data.hubble_deep_field"),
    "immunohistochemistry": (_skimage("immunohistochemistry"), "skimage.data.immunohistochemistry"),
    "retina": (_skimage("retina"), "skimage.data.retina"),
    "colorwheel": (_skimage("colorwheel"), "skimage.data.colorwheel"),
    "logo": (_skimage("logo"), "skimage.data.logo"),  # RGBA with opaque alpha; alpha dropped
    "china": (_sklearn("china.jpg"), "sklearn.datasets.load_sample_image('china.jpg')"),
    "flower": (_sklearn("flower.jpg"), "sklearn.datasets.load_sample_image('flower.jpg')"),
}
CLASS_NAMES: list[str] = sorted(PHOTOS)


class BuiltinSample(NamedTuple):
    key: str
    class_index: int
    class_name: str
    image: Image.Image  # RGB
    source: str


def load_photo(class_name: str) -> Image.Image:
    """The whole photo of a class as an RGB image."""
    array = PHOTOS[class_name][0]()
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")


class CropPlan(NamedTuple):
    """How image ``i`` of a class is made from the photo: ``box`` (left, top, right, bottom) or None for the
    whole photo, mirrored when ``flip``; ``source`` describes it."""
    key: str
    box: tuple[int, int, int, int] | None
    flip: bool
    source: str


def class_plan(class_name: str, images_per_class: int, seed: int = 0, size: tuple[int, int] | None = None
               ) -> list[CropPlan]:
    """The crops of one class in key order, without making them (cheap; ``size`` = the photo's size if known)."""
    class_index = CLASS_NAMES.index(class_name)
    width, height = size if size is not None else load_photo(class_name).size
    rng = np.random.default_rng([seed, class_index])
    origin = PHOTOS[class_name][1]
    plan = []
    for i in range(images_per_class):
        key = f"{class_name}_{i:05d}"
        if i == 0:
            plan.append(CropPlan(key, None, False, f"{origin} full {width}x{height}"))
            continue
        crop_w = int(rng.integers(int(MIN_CROP_FRACTION * width), width + 1))
        crop_h = int(rng.integers(int(MIN_CROP_FRACTION * height), height + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        flip = bool(rng.integers(0, 2))
        desc = f"{origin} crop x={left} y={top} w={crop_w} h={crop_h}{' hflip' if flip else ''}"
        plan.append(CropPlan(key, (left, top, left + crop_w, top + crop_h), flip, desc))
    return plan


def make_image(photo: Image.Image, plan: CropPlan) -> Image.Image:
    """The image ``plan`` describes, cut from its class's ``photo``."""
    if plan.box is None:
        return photo
    image = photo.crop(plan.box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else image


def iter_class(class_name: str, images_per_class: int, seed: int = 0) -> Iterator[BuiltinSample]:
    """The ``images_per_class`` images of one class, in key order."""
    class_index = CLASS_NAMES.index(class_name)
    photo = load_photo(class_name)
    for plan in class_plan(class_name, images_per_class, seed, photo.size):
        yield BuiltinSample(plan.key, class_index, class_name, make_image(photo, plan), plan.source)


def iter_builtin(images_per_class: int, seed: int = 0) -> Iterator[BuiltinSample]:
    """All classes in sorted order, each class's images in key order."""
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    for class_name in CLASS_NAMES:
        yield from iter_class(class_name, images_per_class, seed)
