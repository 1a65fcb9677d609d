"""Null-space constrained optimisation as an optax transformation.

For equality constraints $c(\\theta) = 0$ with Jacobian $J = \\partial c / \\partial
\\theta$, an update $u$ is replaced by its component in the null space of $J$ plus a
Gauss–Newton step towards the constraint set,

$$u \\mapsto (I - J^+ J)\\,u - \\gamma J^+ c(\\theta) = u - J^+ (J u + \\gamma c),$$

which costs one Jacobian-vector product and one matrix-free least-squares solve.
"""

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Int, PyTree

import matfree_lstsq as mfl

from ._curvature import check_float_params


if TYPE_CHECKING:
    import optax


_INSTALL_HINT = 'pip install "matfree-lstsq[applications]"'


class NullspaceProjectionState(eqx.Module):
    """The state of [`matfree_lstsq.applications.nullspace_projection`][].

    **Attributes:**

    - `constraint_norm`: $\\|c(\\theta)\\|_2$ at the parameters of the latest
        update (at `init`: at the initial parameters).
    - `num_steps`: iterations of the latest least-squares solve.
    - `istop`: its stopping code (SciPy's numbering, see
        [`matfree_lstsq.Solution`][]; 0 for a zero right-hand side, 1 or 2
        converged, 3 condition limit, 4–6 the same at machine precision, 7 step
        limit).
    - `norm_r`: the solver's estimate of $\\|J x - (J u + \\gamma c)\\|$, which
        equals the predicted linearised violation $\\|J u' + \\gamma c\\|$ of the
        projected update $u'$ (zero up to the solver's tolerance when $J$ has full
        row rank).
    - `norm_ar`: the solver's estimate of $\\|J^\\mathsf{T}(J x - (J u +
        \\gamma c))\\|$ (its least-squares optimality measure).
    """

    constraint_norm: Float[Array, ""]
    num_steps: Int[Array, ""]
    istop: Int[Array, ""]
    norm_r: Float[Array, ""]
    norm_ar: Float[Array, ""]


def _describe(tree: PyTree) -> str:
    return str(
        jtu.tree_map(lambda x: f"{jnp.dtype(x.dtype).name}{list(x.shape)}", tree)
    )


class _NullspaceProjection(eqx.Module):
    constraint_fn: Callable = eqx.field(static=True)
    correction_rate: float = eqx.field(static=True)
    solver: mfl.AbstractLeastSquaresSolver

    def __check_init__(self):
        if not callable(self.constraint_fn):
            raise TypeError(
                "`constraint_fn` must be callable (params -> pytree of residuals); "
                f"got {type(self.constraint_fn).__name__}."
            )
        rate = self.correction_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(
                f"`correction_rate` must be a real number; got {type(rate).__name__}."
            )
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(
                f"`correction_rate` must be finite and non-negative; got {rate!r}."
            )
        if not isinstance(self.solver, mfl.AbstractLeastSquaresSolver):
            raise TypeError(
                "`solver` must be `matfree_lstsq.LSMR` or `matfree_lstsq.LSQR`; got "
                f"{type(self.solver).__name__}."
            )

    def check_constraints(self, params) -> None:
        """Check `params` and the structure of `constraint_fn(params)`."""
        dtype = check_float_params(params)
        try:
            out = jax.eval_shape(self.constraint_fn, params)
        except TypeError as e:
            raise TypeError(
                "`constraint_fn(params)` must return a pytree of arrays (the "
                f"residuals c(params)); evaluating it failed with: {e}"
            ) from e
        leaves = jtu.tree_leaves(out)
        if not leaves:
            raise ValueError(
                "`constraint_fn(params)` returned an empty pytree "
                f"({jtu.tree_structure(out)}); it must return at least one residual."
            )
        for leaf in leaves:
            if not isinstance(leaf, jax.ShapeDtypeStruct):
                raise TypeError(
                    "`constraint_fn(params)` must return a pytree of arrays; it "
                    f"returned a leaf of type {type(leaf).__name__}."
                )
        if any(leaf.dtype != dtype for leaf in leaves):
            raise TypeError(
                "The residuals returned by `constraint_fn(params)` must have the "
                f"dtype of `params` ({jnp.dtype(dtype).name}); got {_describe(out)}."
            )

    def init(self, params) -> NullspaceProjectionState:
        self.check_constraints(params)
        return _init(self, params)

    def update(self, updates, state, params=None):
        del state
        if params is None:
            raise ValueError(
                "`nullspace_projection` needs the current parameters: call "
                "`update(updates, state, params)`."
            )
        self.check_constraints(params)
        got = jax.eval_shape(lambda: updates)
        want = jax.eval_shape(lambda: params)
        if jtu.tree_structure(got) != jtu.tree_structure(want) or any(
            (a.shape, a.dtype) != (b.shape, b.dtype)
            for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(want))
        ):
            raise ValueError(
                "`updates` must have the structure, shapes and dtypes of `params`; "
                f"got updates {_describe(got)} and params {_describe(want)}."
            )
        return _project(self, updates, params)


def _norm(tree) -> Array:
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jtu.tree_leaves(tree)))


@eqx.filter_jit
def _init(transform: _NullspaceProjection, params) -> NullspaceProjectionState:
    c = transform.constraint_fn(params)
    norm = _norm(c)
    return NullspaceProjectionState(
        constraint_norm=norm,
        num_steps=jnp.zeros((), jnp.int32),
        istop=jnp.zeros((), jnp.int32),
        norm_r=jnp.zeros((), norm.dtype),
        norm_ar=jnp.zeros((), norm.dtype),
    )


@eqx.filter_jit
def _project(transform: _NullspaceProjection, updates, params):
    # One linearisation of c: its JVP is J, and the solver obtains Jᵀ by transposing
    # it. J is never materialised.
    c, jvp = jax.linearize(transform.constraint_fn, params)
    operator = lx.FunctionLinearOperator(jvp, jax.eval_shape(lambda: params))
    rate = transform.correction_rate
    rhs = jtu.tree_map(lambda ju, ci: ju + rate * ci, jvp(updates), c)
    # x = J⁺(J u + γ c), the minimum-norm least-squares solution; u − x is the
    # projected update.
    sol = mfl.lstsq(operator, rhs, transform.solver, throw=False)
    new_updates = jtu.tree_map(jnp.subtract, updates, sol.value)
    norm = _norm(c)
    stats = sol.stats
    state = NullspaceProjectionState(
        constraint_norm=norm,
        num_steps=stats["num_steps"].astype(jnp.int32),
        istop=stats["istop"].astype(jnp.int32),
        norm_r=stats["norm_r"].astype(norm.dtype),
        norm_ar=stats["norm_Ar"].astype(norm.dtype),
    )
    return new_updates, state


def nullspace_projection(
    constraint_fn: Callable[[PyTree[Array]], PyTree[Array]],
    *,
    correction_rate: float = 1.0,
    solver: mfl.AbstractLeastSquaresSolver = mfl.LSMR(atol=1e-10, btol=1e-10),
) -> "optax.GradientTransformation":
    r"""An optax transformation that keeps the parameters on the constraint set
    $\{\theta : c(\theta) = 0\}$ (the null-space method).

    Each update $u$ (what optax adds to the parameters) is replaced by

    $$u' = (I - J^+ J)\,u - \gamma J^+ c(\theta) = u - J^+(J u + \gamma c),$$

    with $c(\theta)$ = `constraint_fn(params)`, $J = \partial c/\partial\theta$ and
    $\gamma$ = `correction_rate`. The first term is the component of $u$ that does
    not change the constraints to first order; the second is a Gauss–Newton step
    towards $c = 0$. Hence $J u' = -\gamma c$ (for $J$ of full row rank, to the
    solver's tolerance), and $c(\theta + u') = (1 - \gamma)\,c(\theta) +
    O(\|u'\|^2)$: with $\gamma = 1$ a linear constraint is satisfied after a single
    step, whatever the learning rate.

    $J$ is applied matrix-free (one linearisation of `constraint_fn` per step, its
    JVP and, by transposition, its VJP), and $J^+(Ju + \gamma c)$ is one
    [`matfree_lstsq.lstsq`][] solve (the minimum-norm solution, so rank-deficient
    or redundant constraints are fine).

    **Sign convention and placement.** The transformation acts on *updates*, the
    descent-signed steps that `optax.apply_updates` adds to the parameters: put it
    **last** in the chain, after the optimiser and its learning rate, e.g.
    `optax.chain(optax.adam(1e-3), nullspace_projection(c))`. Written for the
    gradient-signed direction $g = -u$ it replaces the step $-g$ by
    $-[(I - J^+J)\,g + \gamma J^+ c]$; the correction is not scaled by the
    learning rate. Placing it before an optimiser that rescales coordinates (Adam)
    would not preserve the projection.

    **Arguments:**

    - `constraint_fn`: $c$, a function of the parameters returning any pytree of
        residuals (arrays of the parameters' dtype) that should be zero.
    - `correction_rate`: $\gamma \ge 0$ (default 1: a full Gauss–Newton correction
        per step; 0: a pure projection that keeps the violation where it is to
        first order).
    - `solver`: the least-squares solver for $J^+$ (default
        `LSMR(atol=1e-10, btol=1e-10)`). Its tolerance bounds the linearised
        violation $\|J u' + \gamma c\|$ that remains after each step.

    **Returns:**

    An `optax.GradientTransformation`. Its `update(updates, state, params)` needs
    `params`; its state is a
    [`matfree_lstsq.applications.NullspaceProjectionState`][] (constraint norm and
    solver statistics of the latest step). The solver never raises
    (`throw=False`): inspect `state.istop`.

    **References:**

    - H. Roy, S. Hauberg and N. Krämer, *Matrix-free least squares solvers: values,
        gradients, and what to do with them*, arXiv:2510.19634, 2025 (null-space
        updates with a differentiable matrix-free least-squares solver, used to
        enforce weight sparsity and other constraints in neural networks).

    Requires optax (`pip install "matfree-lstsq[applications]"`).
    """
    try:
        import optax
    except ImportError as e:  # pragma: no cover - exercised without optax only
        raise ImportError(
            "`nullspace_projection` builds an optax transformation and needs optax: "
            f"{_INSTALL_HINT}"
        ) from e
    transform = _NullspaceProjection(constraint_fn, correction_rate, solver)
    # optax's `OptState` annotation does not list Equinox modules; any pytree works.
    return optax.GradientTransformation(
        cast(Any, transform.init), cast(Any, transform.update)
    )
