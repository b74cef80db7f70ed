from __future__ import annotations

import numpy as np

from sfd_core.builtin_data import CLASS_NAMES, PHOTOS, iter_class, load_photo


def test_classes_are_the_sorted_photos():
    assert CLASS_NAMES == sorted(PHOTOS) and len(CLASS_NAMES) == 11
    assert {"astronaut", "retina", "logo", "china", "flower"} <= set(CLASS_NAMES)


def test_class_expansion_is_deterministic_and_seeded():
    first = list(iter_class("chelsea", 4, seed=0))
    again = list(iter_class("chelsea", 4, seed=0))
    other = list(iter_class("chelsea", 4, seed=1))
    assert [s.key for s in first] == [f"chelsea_{i:05d}" for i in range(4)]
    assert all(s.class_index == CLASS_NAMES.index("chelsea") and s.image.mode == "RGB" for s in first)
    for a, b in zip(first, again):
        assert a.source == b.source
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [s.source for s in first[1:]] != [s.source for s in other[1:]]
    # Image 0 is the whole photo; the others are crops of it (mirrored when their description says so).
    photo = np.asarray(load_photo("chelsea"))
    np.testing.assert_array_equal(np.asarray(first[0].image), photo)
    for sample in first[1:]:
        fields = dict(part.split("=") for part in sample.source.split() if "=" in part)
        x, y, w, h = (int(fields[k]) for k in "xywh")
        crop = photo[y:y + h, x:x + w]
        np.testing.assert_array_equal(np.asarray(sample.image), crop[:, ::-1] if "hflip" in sample.source else crop)


def test_photos_load_as_rgb():
    assert load_photo("logo").mode == "RGB"  # RGBA in skimage, alpha dropped
    assert load_photo("china").size == (640, 427) and load_photo("china").mode == "RGB"
