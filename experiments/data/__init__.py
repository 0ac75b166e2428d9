"""Datasets, registered by name (``data.name``): the embedded digits (``digits.py``), digit scenes with
ground-truth masks (``digit_scenes.py``), image folders (``imagefolder.py``), moving digits (``moving_digits.py``)
and video folders (``videofolder.py``); the folder rules both folder options share (``folders.py``), the bundle and
loader (``loaders.py``) and the registry (``registry.py``).

Importing this package imports every module in it (:func:`discover`), so each dataset's ``@register_data`` runs.
A new dataset is one new module here and one ``experiments/conf/data/<name>.yaml``: no import list names it.
"""
import importlib
import pkgutil


def discover() -> list[str]:
    """Import every module of this package (those on ``experiments.data.__path__``); returns their names.
    Idempotent: modules already imported are not run again."""
    names = [info.name for info in pkgutil.iter_modules(__path__)]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()
