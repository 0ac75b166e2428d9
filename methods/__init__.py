"""Token-reduction methods on a shared timm DeiT backbone, registered by name.

Importing this package imports every module in it (:func:`discover`), so each method's ``@register_method``
runs and ``methods.models`` registers the embedded timm model. A new method is one new file here: no import
list names it.
"""
import importlib
import pkgutil

from .base import MethodOutput, TokenReducer
from .registry import (MethodSpec, bench_settings, check_counterparts, create_method, default_params, inference_knob,
                       knob_fixed, knob_target, list_methods, method_info, method_parameters, method_spec,
                       methods_with_knob, register_method, registered_info, resolved_params)


def discover() -> list[str]:
    """Import every module of this package (those on ``methods.__path__``); returns their names. Idempotent:
    modules already imported are not run again."""
    names = [info.name for info in pkgutil.iter_modules(__path__)]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()
check_counterparts()  # every declared counterpart is registered, once all are

__all__ = ["MethodOutput", "MethodSpec", "TokenReducer", "bench_settings", "check_counterparts", "create_method",
           "discover",
           "inference_knob", "knob_fixed", "knob_target", "list_methods", "method_info", "method_parameters",
           "method_spec", "methods_with_knob", "register_method", "registered_info", "resolved_params"]
