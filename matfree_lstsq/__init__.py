"""Differentiable, matrix-free least squares for JAX."""

import importlib.metadata

from ._bidiagonalise import GolubKahan as GolubKahan, bidiagonalise as bidiagonalise
from ._lsmr import LSMR as LSMR
from ._lsqr import LSQR as LSQR
from ._lstsq import lstsq as lstsq
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solver import AbstractLeastSquaresSolver as AbstractLeastSquaresSolver


try:
    __version__ = importlib.metadata.version("matfree-lstsq")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0+unknown"
