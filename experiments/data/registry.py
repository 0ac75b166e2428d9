"""Which data option builds which datasets: the one map from a data config (``data.name``) to its builder
(:func:`build_data`) and to its startup check (:func:`count_classes`).

Image data lives in ``experiments/data/images.py``, video data in ``experiments/data/moving_digits.py`` (moving digits) and
``experiments/data/videofolder.py`` (video folders); the video modules import only ``data``'s shared pieces, so this
module is the only one that knows every option.
"""
from __future__ import annotations

from experiments.data import moving_digits as video_data
from experiments.data import videofolder
from experiments.config import DataError
from experiments.data.images import (DIGITS_CLASSES, DataBundle, build_digits, build_imagefolder,
                                     count_imagefolder_classes)

BUILDERS = {"digits": build_digits, "imagefolder": build_imagefolder,
            "moving_digits": video_data.build_moving_digits, "videofolder": videofolder.build_videofolder}

# the class count the run's head will have, without decoding any sample; for folders this is the startup check,
# whose file list the builder then reads
CLASS_COUNTS = {"digits": lambda data: DIGITS_CLASSES, "moving_digits": lambda data: DIGITS_CLASSES,
                "imagefolder": count_imagefolder_classes, "videofolder": videofolder.count_video_classes}


def _known(data) -> None:
    if data.name not in BUILDERS:
        raise DataError(f"data.name={data.name!r} unknown; valid: {', '.join(BUILDERS)}")


def build_data(data) -> DataBundle:
    """Datasets for the data config ``data`` (one of ``experiments.config.DATA_SCHEMAS``)."""
    _known(data)
    return BUILDERS[data.name](data)


def count_classes(data) -> int:
    """The class count of ``data``'s head, from its startup check (``CLASS_COUNTS``)."""
    _known(data)
    return CLASS_COUNTS[data.name](data)
