r"""Projection of parameter-space vectors onto the kernel (null space) of a model's
Jacobian over a data set."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

import matfree_lstsq as mfl

from ._common import (
    as_arrays,
    batch_data,
    check_positive_int,
    check_positive_scalar,
    check_solver,
    default_solver,
    describe,
    leading_axis,
    model_output,
    num_data,
    params_dtype,
    relative_residual,
    tree_norm,
    tree_size,
    tree_sub,
    tree_vdot,
)
from ._jacobian import LossOutputs, ModelOutputs, data_jacobian


_METHODS = ("lstsq", "alternating", "dense")
_KINDS = ("jacobian", "loss")


def _project_lstsq(
    jac: lx.AbstractLinearOperator,
    v: PyTree[Array],
    solver: mfl.AbstractLeastSquaresSolver,
    throw: bool,
) -> tuple[PyTree[Array], dict[str, Array]]:
    r"""$P v = v - J^\mathsf{T} \lambda^*$, $\lambda^* = \arg\min \|J^\mathsf{T}
    \lambda - v\|$: the least-squares residual is the projection.

    Why this form rather than $v - x$ with $x$ the minimum-norm solution of
    $J x = J v$: both run the same Krylov process, but here LSMR's least-squares
    stopping test $\|A^\mathsf{T} r\| \le \text{atol}\,\|A\|\,\|r\|$ reads
    $\|J P v\| \le \text{atol}\,\|J\|\,\|P v\|$ — it certifies the defining property
    of the projection, relative to the projection itself — and the residual is
    unique even when $J$ is rank-deficient, so no minimum-norm property (which
    rounding or a preconditioner would break) is relied upon.
    """
    jac_t = jac.T
    sol = mfl.lstsq(jac_t, v, solver, throw=throw)
    projected = tree_sub(v, jac_t.mv(sol.value))
    info = dict(
        num_steps=sol.stats["num_steps"],
        istop=sol.stats["istop"],
        residual=relative_residual(sol.stats),
    )
    return projected, info


class KernelProjector(eqx.Module):
    r"""The orthogonal projector $P = I - J^+ J$ onto the kernel of a Jacobian
    $J$ over a data set, applied to parameter pytrees.

    Build it with [`matfree_lstsq.applications.kernel_projector`][]. `P(v)` projects
    `v`, a pytree shaped like the parameters, or a batch of them with one extra leading
    axis on every leaf; `P.project(v)` also returns diagnostics.

    It is an Equinox module: it can be passed through `jax.jit`, and, for
    `method="lstsq"` and `"alternating"`, differentiated with respect to the
    parameters it was built at (the solves are differentiable).
    """

    fn: Callable
    params: PyTree[Array]
    data: tuple
    method: str = eqx.field(static=True)
    batch_size: int | None = eqx.field(static=True)
    num_sweeps: int = eqx.field(static=True)
    tol: float = eqx.field(static=True)
    acceleration: bool = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    solver: mfl.AbstractLeastSquaresSolver
    basis: Float[Array, "k D"] | None
    in_range: Bool[Array, " k"] | None

    def __check_init__(self):
        if self.method not in _METHODS:
            raise ValueError(
                f"Unknown `method` {self.method!r}; expected one of {_METHODS}."
            )
        check_positive_int("batch_size", self.batch_size, allow_none=True)
        check_positive_int("num_sweeps", self.num_sweeps)
        check_positive_scalar("tol", self.tol, allow_zero=True)
        if self.method == "alternating" and self.batch_size is None:
            raise ValueError(
                "`method='alternating'` projects batch by batch and needs a "
                "`batch_size`."
            )
        if self.method == "dense" and (self.basis is None or self.in_range is None):
            raise ValueError(
                "`method='dense'` needs the SVD basis; build the projector with "
                "`kernel_projector(...)`."
            )

    def __call__(self, v: PyTree[Float[ArrayLike, "..."]]) -> PyTree[Array]:
        """$P v$ for `v` shaped like the parameters (or a batch of them)."""
        return self.project(v)[0]

    def project(
        self, v: PyTree[Float[ArrayLike, "..."]]
    ) -> tuple[PyTree[Array], dict[str, Array]]:
        r"""$P v$ and diagnostics.

        **Arguments:**

        - `v`: a pytree shaped like the parameters, or a batch of them (one extra
            leading axis on every leaf).

        **Returns:**

        `(Pv, info)`, with `Pv` shaped like `v`, and `info` a dictionary of arrays
        (with a leading batch axis for batched `v`):

        - `method="lstsq"`: `num_steps` and `istop` of the solve, and `residual`,
            the solver's estimate of $\|J P v\| / (\|J\|_F \|P v\|)$;
        - `method="alternating"`: `num_sweeps` (sweeps done), `change` (the relative
            change $\|x_{k+1} - x_k\| / \|x_k\|$ of each sweep; NaN after the last),
            and `num_steps` (solver steps over all batches and sweeps);
        - `method="dense"`: `rank`, the numerical rank of $J$.
        """
        k = leading_axis(v, self.params, "v")
        v = as_arrays(v, "v")
        return _project_jit(self, v, k is not None)

    # ----- the three methods, for one vector -----------------------------------

    def _project_one(self, v: PyTree[Array]) -> tuple[PyTree[Array], dict]:
        if self.method == "lstsq":
            jac = data_jacobian(self.fn, self.params, self.data, self.batch_size)
            return _project_lstsq(jac, v, self.solver, self.throw)
        if self.method == "dense":
            return self._dense(v)
        return self._alternating(v)

    def _dense(self, v):
        assert self.basis is not None and self.in_range is not None
        flat, unravel = ravel_pytree(v)
        coeffs = jnp.where(self.in_range, self.basis @ flat, 0)
        rank = jnp.sum(self.in_range.astype(jnp.int32))
        return unravel(flat - self.basis.T @ coeffs), dict(rank=rank)

    def _alternating(self, v):
        # Sweeps of per-batch projections x ← P_b x, b = 1..B: their product T
        # converges to the projection onto the intersection of the batch kernels,
        # ker J (von Neumann, Halperin). Gearhart–Koshy: move along d = T x − x
        # to the point nearest that intersection. Every x differs from v by an element
        # of range(Jᵀ) = (ker J)^⊥, and so does d, so the step t minimising
        # ‖x + t d − P v‖ is t = −⟨x, d⟩ / ‖d‖² (P v ⊥ d drops out).
        assert self.batch_size is not None
        batches = batch_data(self.data, self.batch_size)
        fn, params, solver, throw = self.fn, self.params, self.solver, self.throw
        dtype = params_dtype(params)

        def batch_projection(x, batch):
            jac = data_jacobian(fn, params, batch, None)
            x, info = _project_lstsq(jac, x, solver, throw)
            return x, info["num_steps"]

        def sweep(x):
            tx, steps = jax.lax.scan(batch_projection, x, batches)
            d = tree_sub(tx, x)
            if self.acceleration:
                dd = tree_vdot(d, d)
                safe = jnp.where(dd > 0, dd, 1)
                t = jnp.where(dd > 0, -tree_vdot(x, d) / safe, 1)
                new = jtu.tree_map(lambda a, b: a + t * b, x, d)
                step = jnp.abs(t) * jnp.sqrt(dd)
            else:
                new, step = tx, tree_norm(d)
            norm_x = tree_norm(x)
            change = step / jnp.where(norm_x > 0, norm_x, 1)
            return new, change, jnp.sum(steps).astype(jnp.int32)

        num_sweeps = self.num_sweeps
        tol = jnp.asarray(self.tol, dtype)

        def cond(state):
            k, _, _, _, done = state
            return (k < num_sweeps) & ~done

        def body(state):
            k, x, history, steps, _ = state
            x, change, new_steps = sweep(x)
            history = history.at[k].set(change)
            return k + 1, x, history, steps + new_steps, change <= tol

        init = (
            jnp.zeros((), jnp.int32),
            v,
            jnp.full((num_sweeps,), jnp.nan, dtype),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), bool),
        )
        k, x, history, steps, _ = jax.lax.while_loop(cond, body, init)
        return x, dict(num_sweeps=k, change=history, num_steps=steps)


@eqx.filter_jit
def _project_jit(projector: KernelProjector, v, batched: bool):
    if batched:
        return jax.vmap(projector._project_one)(v)
    return projector._project_one(v)


def _host_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return s.astype(matrix.dtype), vt.astype(matrix.dtype)


def _dense_basis(fn, params, data, batch_size):
    """Right singular vectors of the dense Jacobian (rows of `basis`) and which of
    them span its row space (singular value above $\\max(m, n)\\,\\varepsilon\\,
    \\sigma_{\\max}$).

    The SVD runs on the host with NumPy: `jnp.linalg.svd` on CPU (jaxlib 0.10.2)
    returns NaN for some rank-deficient matrices, e.g. ones with repeated rows.
    """
    flat, unravel = ravel_pytree(params)

    def rows(batch):
        return jax.jacrev(lambda f: fn(unravel(f), batch).reshape(-1))(flat)

    if batch_size is None:
        jac = rows(data)
    else:
        n = num_data(data, "data")
        jac = jax.lax.map(rows, batch_data(data, batch_size))
        rows_per_datum = jac.shape[1] // batch_size
        # Drop the rows of the padding (they repeat the last datum's).
        jac = jac.reshape(-1, flat.size)[: rows_per_datum * n]
    k = min(jac.shape)
    s, vt = jax.pure_callback(
        _host_svd,
        (
            jax.ShapeDtypeStruct((k,), jac.dtype),
            jax.ShapeDtypeStruct((k, flat.size), jac.dtype),
        ),
        jac,
        vmap_method="sequential",
    )
    eps = jnp.finfo(jac.dtype).eps
    cut = max(jac.shape) * eps * s[0]
    return vt, s > cut


def kernel_projector(
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    params: PyTree[Float[ArrayLike, "..."]],
    inputs: PyTree[ArrayLike],
    *,
    method: Literal["lstsq", "alternating", "dense"] = "lstsq",
    kind: Literal["jacobian", "loss"] = "jacobian",
    loss_fn: Callable[[Array, Any], Float[Array, " N"]] | None = None,
    targets: PyTree[ArrayLike] | None = None,
    batch_size: int | None = None,
    num_sweeps: int = 20,
    tol: float | None = None,
    acceleration: bool = True,
    solver: mfl.AbstractLeastSquaresSolver | None = None,
    throw: bool = False,
) -> KernelProjector:
    r"""The projector $P = I - J^+ J$ onto the kernel of the Jacobian $J$ of a model
    over a data set: `P(v)` removes from a parameter-space vector $v$ every component
    that changes the model's outputs on the data to first order.

    With `kind="jacobian"`, $J$ is the Jacobian of the outputs $f(\theta, x_n)$
    (all outputs of all data); with `kind="loss"`, the Jacobian of the per-datum
    losses $\ell_n(\theta) = \text{loss\_fn}(f(\theta, x_n), y_n)$, whose kernel
    keeps every datum's loss unchanged to first order.

    Methods (none materialises $J$ except `"dense"`):

    - `"lstsq"`: one least-squares solve over all data,
        $P v = v - J^\mathsf{T}\lambda^*$ with
        $\lambda^* = \arg\min_\lambda \|J^\mathsf{T}\lambda - v\|$, by
        [`matfree_lstsq.lstsq`][] on the transposed operator.
    - `"alternating"`: per-batch projections $P_b$ (each a small `"lstsq"` solve)
        applied in sweeps $x \leftarrow P_B \cdots P_1 x$, which converge to $P v$;
        with `acceleration=True` each sweep is followed by the Gearhart–Koshy exact
        line search along the sweep's change. Stops after `num_sweeps` sweeps or
        when a sweep changes $x$ by less than `tol` relative to $\|x\|$.
    - `"dense"`: the SVD of the materialised Jacobian, with singular values below
        $\max(m, n)\,\varepsilon\,\sigma_{\max}$ treated as zero. For small models
        and as a test oracle.

    **Arguments:**

    - `model_fn`: `model_fn(params, inputs) -> outputs`, outputs `(N, O)` or `(N,)`.
    - `params`: the parameters $\theta$ (any pytree of floating arrays of one dtype).
    - `inputs`: the data, with a leading data axis of size `N`.
    - `method`: `"lstsq"` (default), `"alternating"` or `"dense"`.
    - `kind`: `"jacobian"` (default) or `"loss"`.
    - `loss_fn`: for `kind="loss"`, `loss_fn(outputs, targets) -> losses` of shape
        `(N,)`.
    - `targets`: for `kind="loss"`, the targets (leading data axis `N`).
    - `batch_size`: stream over the data in batches of this size (the last one
        padded by repeating the last datum, which leaves the kernel unchanged).
        Required by `"alternating"`, where it is the size of each block.
    - `num_sweeps`: `"alternating"` only: the maximum number of sweeps.
    - `tol`: `"alternating"` only: stop when the relative change of a sweep is at
        most `tol`; `None` means $\sqrt{\varepsilon}$ of the parameters' dtype.
    - `acceleration`: `"alternating"` only: Gearhart–Koshy acceleration.
    - `solver`: the least-squares solver of `"lstsq"` and `"alternating"`; `None`
        means `matfree_lstsq.LSMR` with tolerances $\varepsilon^{2/3}$ (about
        `4e-11` in float64), no practical condition limit and up to ten times
        $\min(m, n)$ steps.
    - `throw`: whether a solve that fails to meet the solver's tolerances raises
        (`True`) or returns its last iterate (`False`, default); check
        `P.project(v)[1]` for the achieved accuracy.

    **Returns:**

    A [`matfree_lstsq.applications.KernelProjector`][].

    **References:**

    J. von Neumann, *Functional operators II*, 1950 (alternating projections).
    W. B. Gearhart and M. Koshy, *Acceleration schemes for the method of alternating
    projections*, J. Comput. Appl. Math. 26, 1989. D. C.-L. Fong and M. A. Saunders,
    *LSMR*, SIAM J. Sci. Comput. 33(5), 2011.
    """
    if method not in _METHODS:
        raise ValueError(f"Unknown `method` {method!r}; expected one of {_METHODS}.")
    if kind not in _KINDS:
        raise ValueError(f"Unknown `kind` {kind!r}; expected one of {_KINDS}.")
    check_positive_int("batch_size", batch_size, allow_none=True)
    check_positive_int("num_sweeps", num_sweeps)
    check_solver(solver)
    params = as_arrays(params, "params")
    inputs = as_arrays(inputs, "inputs")
    out = model_output(model_fn, params, inputs)
    dtype = params_dtype(params)
    n = num_data(inputs)
    if kind == "jacobian":
        if loss_fn is not None or targets is not None:
            raise ValueError(
                "`loss_fn` and `targets` are only used with `kind='loss'`; got "
                f"`kind={kind!r}`."
            )
        fn: Callable = ModelOutputs(model_fn)
        data: tuple = (inputs,)
        num_rows = tree_size(out)
    else:
        if loss_fn is None or targets is None:
            raise ValueError("`kind='loss'` needs both `loss_fn` and `targets`.")
        targets = as_arrays(targets, "targets")
        if num_data(targets, "targets") != n:
            raise ValueError(
                f"`targets` must have the leading data dimension of `inputs` ({n}); "
                f"got {describe(targets)}."
            )
        fn = LossOutputs(model_fn, loss_fn)
        data = (inputs, targets)
        try:
            losses = jax.eval_shape(fn, params, data)
        except Exception as e:  # noqa: BLE001 - re-raised with the shapes involved
            raise ValueError(
                f"`loss_fn(outputs, targets)` failed for outputs {describe(out)} and "
                f"targets {describe(targets)}: {type(e).__name__}: {e}"
            ) from e
        if (
            not isinstance(losses, jax.ShapeDtypeStruct)
            or losses.shape != (n,)
            or jnp.dtype(losses.dtype) != dtype
        ):
            raise ValueError(
                f"`loss_fn(outputs, targets)` must return per-datum losses of shape "
                f"({n},) and dtype {dtype.name}; got {describe(losses)}."
            )
        num_rows = n
    stop_tol = float(jnp.finfo(dtype).eps) ** 0.5 if tol is None else float(tol)
    num_params = tree_size(params)
    if solver is None:
        rows = num_rows
        if method == "alternating" and batch_size is not None:
            rows = num_rows // n * batch_size  # one batch's rows
        solver = default_solver(dtype, rows, num_params)
    basis = in_range = None
    if method == "dense":
        basis, in_range = _dense_basis_jit(fn, params, data, batch_size)
    return KernelProjector(
        fn=fn,
        params=params,
        data=data,
        method=method,
        batch_size=batch_size,
        num_sweeps=num_sweeps,
        tol=stop_tol,
        acceleration=bool(acceleration),
        throw=bool(throw),
        solver=solver,
        basis=basis,
        in_range=in_range,
    )


_dense_basis_jit = eqx.filter_jit(_dense_basis)
