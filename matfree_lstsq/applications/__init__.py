"""Bayesian deep-learning and optimisation recipes built on `matfree_lstsq`.

Import as `from matfree_lstsq import applications as mfa`. Every recipe is a thin
consumer of the core's public API (`matfree_lstsq.lstsq` and its solvers).
"""

from . import metrics as metrics
from ._constrained import (
    NullspaceProjectionState as NullspaceProjectionState,
    nullspace_projection as nullspace_projection,
)
from ._curvature import (
    CurvatureInfo as CurvatureInfo,
    scalar_curvature as scalar_curvature,
)
from ._diffusion import (
    DiffusionInfo as DiffusionInfo,
    laplace_diffusion as laplace_diffusion,
)
from ._jacobian import (
    ggn_sqrt_operator as ggn_sqrt_operator,
    jacobian_operator as jacobian_operator,
)
from ._posterior import (
    laplace_posterior as laplace_posterior,
    projected_posterior as projected_posterior,
)
from ._predict import (
    linearised_predict as linearised_predict,
    sample_predict as sample_predict,
)
from ._projection import (
    KernelProjector as KernelProjector,
    kernel_projector as kernel_projector,
)
from ._viking import (
    VikingInfo as VikingInfo,
    VikingPosterior as VikingPosterior,
    viking_elbo as viking_elbo,
    viking_sample as viking_sample,
)
