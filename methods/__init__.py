"""Token-reduction methods on a shared timm DeiT backbone, registered by name.

Importing this package registers every method (one module each) and the embedded timm model.
"""
from . import models  # noqa: F401  (registers the embedded timm model)
from . import adavit  # noqa: F401
from . import dense  # noqa: F401
from . import dynamicvit  # noqa: F401
from . import evit, tome, topk  # noqa: F401
from .base import MethodOutput, TokenReducer
from .registry import (create_method, inference_knob, list_methods, method_parameters, methods_with_knob,
                       register_method)

__all__ = ["MethodOutput", "TokenReducer", "create_method", "inference_knob", "list_methods", "method_parameters",
           "methods_with_knob", "register_method"]
