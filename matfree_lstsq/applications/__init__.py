"""Bayesian deep-learning and optimisation recipes built on `matfree_lstsq`.

Import as `from matfree_lstsq import applications as mfa`. Every recipe is a thin
consumer of the core's public API (`matfree_lstsq.lstsq` and its solvers).
"""

from ._constrained import (
    NullspaceProjectionState as NullspaceProjectionState,
    nullspace_projection as nullspace_projection,
)
from ._curvature import (
    CurvatureInfo as CurvatureInfo,
    scalar_curvature as scalar_curvature,
)
