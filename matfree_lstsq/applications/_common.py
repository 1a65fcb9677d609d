"""What the recipes share: input checks, pytree arithmetic, streaming over data in
batches, and default solvers.

Parameters stay pytrees throughout; the helpers here act leaf-wise.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, PyTree

import matfree_lstsq as mfl


LIKELIHOODS = ("regression", "classification", "binary")


# ---------------------------------------------------------------------------------
# Descriptions for error messages.
# ---------------------------------------------------------------------------------


def describe(tree: PyTree) -> str:
    """`{'W': float64[3, 4], ...}`-style summary of a pytree of arrays."""

    def one(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"
        return type(x).__name__

    leaves, treedef = jtu.tree_flatten(tree)
    if treedef == jtu.tree_structure(0):
        return one(leaves[0])
    return str(jtu.tree_map(one, tree))


# ---------------------------------------------------------------------------------
# Scalar and integer arguments.
# ---------------------------------------------------------------------------------


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or int(value) < 1
    ):
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def check_positive_scalar(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Check a concrete real scalar; traced values are accepted as they are."""
    if isinstance(value, Tracer):
        if jnp.shape(value) != ():
            raise ValueError(f"`{name}` must be a scalar; got shape {value.shape}.")
        return
    arr = np.asarray(value)
    if arr.shape != () or not np.isrealobj(arr) or arr.dtype == bool:
        raise ValueError(
            f"`{name}` must be a real scalar; got {value!r} (shape {arr.shape})."
        )
    v = float(arr)
    bad = (v < 0) if allow_zero else (v <= 0)
    if not np.isfinite(v) or bad:
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be a finite {bound} number; got {value!r}.")


def check_likelihood(likelihood: Any) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"Unknown `likelihood` {likelihood!r}; expected one of {LIKELIHOODS}."
        )


# ---------------------------------------------------------------------------------
# Models, parameters and data.
# ---------------------------------------------------------------------------------


def params_dtype(params: PyTree) -> jnp.dtype:
    """The one floating dtype of all parameter leaves (a `ValueError` otherwise)."""
    leaves = jtu.tree_leaves(params)
    if not leaves:
        raise ValueError("`params` must contain at least one array; got an empty tree.")
    dtypes = set()
    for leaf in leaves:
        if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
            raise ValueError(
                f"`params` must be a pytree of floating-point arrays; got a leaf of "
                f"type {type(leaf).__name__} in {describe(params)}."
            )
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"`params` must be a pytree of real floating-point arrays; got "
                f"{describe(params)}."
            )
        dtypes.add(jnp.dtype(leaf.dtype))
    if len(dtypes) != 1:
        raise ValueError(
            f"All leaves of `params` must share one dtype; got {describe(params)}."
        )
    return dtypes.pop()


def as_arrays(tree: PyTree, name: str) -> PyTree[Array]:
    try:
        return jtu.tree_map(jnp.asarray, tree)
    except TypeError as e:
        raise ValueError(f"`{name}` must be a pytree of arrays: {e}") from None


def num_data(data: PyTree[Array], name: str = "inputs") -> int:
    """The common leading dimension of the leaves of `data`."""
    leaves = jtu.tree_leaves(data)
    if not leaves:
        raise ValueError(f"`{name}` must contain at least one array.")
    sizes = {int(leaf.shape[0]) if leaf.ndim > 0 else -1 for leaf in leaves}
    if -1 in sizes or len(sizes) != 1:
        raise ValueError(
            f"Every leaf of `{name}` must have the same leading (data) dimension; got "
            f"{describe(data)}."
        )
    n = sizes.pop()
    if n < 1:
        raise ValueError(f"`{name}` holds no data (leading dimension 0).")
    return n


def model_output(
    model_fn: Callable, params: PyTree, inputs: PyTree
) -> jax.ShapeDtypeStruct:
    """Shape and dtype of `model_fn(params, inputs)`, checked: a single floating array
    of shape `(N,)` or `(N, O)`, with the dtype of the parameters."""
    if not callable(model_fn):
        raise ValueError(f"`model_fn` must be callable; got {type(model_fn).__name__}.")
    dtype = params_dtype(params)
    n = num_data(inputs)
    try:
        out = jax.eval_shape(model_fn, params, inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with the structures involved
        raise ValueError(
            f"`model_fn(params, inputs)` failed for `params` with structure "
            f"{describe(params)} and `inputs` {describe(inputs)}; check that the "
            f"parameters match the model. The error was: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(
            f"`model_fn` must return a single array of shape (N,) or (N, O); got "
            f"{describe(out)}."
        )
    if out.ndim not in (1, 2) or out.shape[0] != n:
        raise ValueError(
            f"`model_fn(params, inputs)` must return an array of shape ({n},) or "
            f"({n}, O) for {n} inputs; got shape {out.shape}."
        )
    if jnp.dtype(out.dtype) != dtype:
        raise ValueError(
            f"`model_fn` returned {jnp.dtype(out.dtype).name} outputs for "
            f"{dtype.name} parameters; they must agree."
        )
    return jax.ShapeDtypeStruct(out.shape, out.dtype)


def check_like_params(
    value: PyTree, params: PyTree, name: str, *, leading: int | None = None
) -> PyTree[Array]:
    """Check that `value` has the tree structure, shapes and dtypes of `params`, with
    an extra leading axis of size `leading` on every leaf when it is not `None`."""
    value = as_arrays(value, name)
    ok = jtu.tree_structure(value) == jtu.tree_structure(params)
    if ok:
        for x, p in zip(jtu.tree_leaves(value), jtu.tree_leaves(params)):
            shape = p.shape if leading is None else (leading, *p.shape)
            if x.shape != shape or x.dtype != p.dtype:
                ok = False
    if not ok:
        extra = "" if leading is None else f" with a leading axis of size {leading}"
        raise ValueError(
            f"`{name}` must have the structure, shapes and dtypes of `params`{extra}; "
            f"got {describe(value)}, but `params` is {describe(params)}."
        )
    return value


def leading_axis(value: PyTree, params: PyTree, name: str) -> int | None:
    """`None` if `value` is shaped like `params`, else the size of a common extra
    leading axis (a `ValueError` if it is neither)."""
    value = as_arrays(value, name)
    if jtu.tree_structure(value) == jtu.tree_structure(params):
        pairs = list(zip(jtu.tree_leaves(value), jtu.tree_leaves(params)))
        if all(x.shape == p.shape for x, p in pairs):
            check_like_params(value, params, name)
            return None
        sizes = {x.shape[0] for x, p in pairs if x.ndim == p.ndim + 1}
        if len(sizes) == 1:
            k = sizes.pop()
            check_like_params(value, params, name, leading=k)
            return k
    raise ValueError(
        f"`{name}` must be shaped like `params` ({describe(params)}), or be a batch of "
        f"such pytrees with one extra leading axis on every leaf; got "
        f"{describe(value)}."
    )


# ---------------------------------------------------------------------------------
# Pytree arithmetic (parameters stay pytrees).
# ---------------------------------------------------------------------------------


def tree_add(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.add, x, y)


def tree_sub(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.subtract, x, y)


def tree_scale(alpha: Any, x: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda a: jnp.asarray(alpha).astype(a.dtype) * a, x)


def tree_vdot(x: PyTree[Array], y: PyTree[Array]) -> Array:
    terms = [jnp.vdot(a, b) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))]
    return sum(terms[1:], terms[0])


def tree_norm(x: PyTree[Array]) -> Array:
    return jnp.sqrt(tree_vdot(x, x))


def tree_size(x: PyTree) -> int:
    return sum(math.prod(a.shape) for a in jtu.tree_leaves(x))


def normal_like(key: Array, tree: PyTree, shape: tuple[int, ...] = ()) -> PyTree:
    """Independent standard normal draws shaped like `tree` (a pytree of arrays or
    `ShapeDtypeStruct`s of one dtype), with extra leading axes `shape`.

    One draw of the total size, split into the leaves: a single random-number
    kernel, which compiles much faster than one per leaf.
    """
    leaves, treedef = jtu.tree_flatten(tree)
    dtype = params_dtype(leaves)
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    flat = jax.random.normal(key, (*shape, sum(sizes)), dtype)
    splits = np.cumsum(sizes)[:-1].tolist()
    parts = jnp.split(flat, splits, axis=-1) if splits else [flat]
    draws = [part.reshape(*shape, *leaf.shape) for part, leaf in zip(parts, leaves)]
    return jtu.tree_unflatten(treedef, draws)


# ---------------------------------------------------------------------------------
# Streaming over data.
# ---------------------------------------------------------------------------------


def batch_data(data: PyTree[Array], batch_size: int) -> PyTree[Array]:
    """Leaves `(N, ...)` → `(num_batches, batch_size, ...)`.

    The last batch is completed with copies of the last data point. Duplicated rows
    leave kernels unchanged, and callers slice padded outputs away.
    """
    n = num_data(data, "data")
    num_batches = -(-n // batch_size)
    index = jnp.minimum(jnp.arange(num_batches * batch_size), n - 1)
    return jtu.tree_map(
        lambda x: x[index].reshape(num_batches, batch_size, *x.shape[1:]), data
    )


def unbatch(out: Array, n: int, axis: int = 0) -> Array:
    """Merge axes `axis` (batches) and `axis + 1` (within a batch); keep `n` rows."""
    shape = out.shape
    out = out.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :])
    return jax.lax.slice_in_dim(out, 0, n, axis=axis)


def map_batches(
    fn: Callable[[PyTree[Array]], Array],
    data: PyTree[Array],
    batch_size: int | None,
    axis: int = 0,
) -> Array:
    """`fn(data)`, computed one batch at a time; `axis` is the output's data axis."""
    if batch_size is None:
        return fn(data)
    n = num_data(data, "data")
    out = jax.lax.map(fn, batch_data(data, batch_size))
    return unbatch(jnp.moveaxis(out, 0, axis), n, axis)


# ---------------------------------------------------------------------------------
# Solvers.
# ---------------------------------------------------------------------------------


def default_solver(dtype: Any, m: int, n: int) -> mfl.LSMR:
    r"""LSMR with tolerances $\varepsilon^{2/3}$ of the working precision (about
    `4e-11` in float64, `2e-5` in float32), no practical condition limit, and up to
    ten times $\min(m, n)$ steps (without reorthogonalisation, Krylov methods on
    network Jacobians need more than $\min(m, n)$ steps)."""
    eps = float(jnp.finfo(dtype).eps)
    tol = eps ** (2 / 3)
    return mfl.LSMR(atol=tol, btol=tol, conlim=1 / eps, max_steps=10 * min(m, n))


def check_solver(solver: Any) -> None:
    if solver is not None and not isinstance(solver, mfl.AbstractLeastSquaresSolver):
        raise ValueError(
            f"`solver` must be `matfree_lstsq.LSMR(...)`, `matfree_lstsq.LSQR(...)` or "
            f"None; got {type(solver).__name__}."
        )


def relative_residual(stats: dict[str, Array]) -> Array:
    """$\\|A^\\mathsf{T} r\\| / (\\|A\\| \\|r\\|)$ from a solve's statistics: the
    relative optimality of the least-squares solution (zero at the exact one)."""
    norm_ar, norm_a, norm_r = stats["norm_Ar"], stats["norm_A"], stats["norm_r"]
    denom = norm_a * norm_r
    return jnp.where(denom > 0, norm_ar / jnp.where(denom > 0, denom, 1), 0)
