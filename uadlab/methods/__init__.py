"""Methods: one file each; importing this package registers them all."""
from .base import AnomalyResult, FitContext, FitRecord, Method, NotFittedError, create_method, get_method_class, list_methods, register_method
from . import patchcore, anomalydino, varad, spg, dinomaly, spatial_ar, ensemble, intensity  # noqa: F401  (registration)

__all__ = ["AnomalyResult", "Method", "NotFittedError", "create_method", "get_method_class", "list_methods",
           "register_method"]
