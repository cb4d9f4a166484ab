"""Built-in decomposition methods (numpy; tensorly and scipy are imported inside the functions)."""
from .cp import Cp
from .layer import ChildSpec, ConvLayer, Cost, chain_cost, compose_kernels, conv_cost, relative_error
from .spatial_svd import SpatialSvd
from .tucker2 import Tucker2

__all__ = [
    "BUILTIN_DECOMPOSITIONS",
    "SpatialSvd",
    "Tucker2",
    "Cp",
    "ConvLayer",
    "ChildSpec",
    "Cost",
    "conv_cost",
    "chain_cost",
    "compose_kernels",
    "relative_error",
]

BUILTIN_DECOMPOSITIONS = [SpatialSvd, Tucker2, Cp]
