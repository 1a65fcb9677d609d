"""Input normalisation and the pytree vector arithmetic the solvers run on.

Vectors are arbitrary pytrees of arrays (the structures of a lineax operator). The
helpers below act leaf-wise and never ravel, so a dict-valued parameter vector stays a
dict throughout an iteration.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree, Shaped


def as_operator(operator: Any, name: str = "operator") -> lx.AbstractLinearOperator:
    """Return `operator` as a lineax operator, wrapping a 2-D array if needed."""
    if isinstance(operator, lx.AbstractLinearOperator):
        return operator
    if isinstance(operator, (jax.Array, np.ndarray)) or hasattr(
        operator, "__jax_array__"
    ):
        operator = jnp.asarray(operator)
        if operator.ndim != 2:
            raise ValueError(
                f"`{name}` must be a lineax operator or a 2-D array; got an array of "
                f"shape {operator.shape}."
            )
        return lx.MatrixLinearOperator(operator)
    raise TypeError(
        f"`{name}` must be a `lineax.AbstractLinearOperator` or a 2-D array; got "
        f"{type(operator).__name__}."
    )


def _describe(struct: PyTree) -> str:
    leaves, treedef = jtu.tree_flatten(struct)
    if treedef == jtu.tree_structure(0):
        leaf = leaves[0]
        return f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}"
    return str(
        jtu.tree_map(lambda x: f"{jnp.dtype(x.dtype).name}{list(x.shape)}", struct)
    )


def same_structure(a: PyTree, b: PyTree) -> bool:
    """Same tree structure, and the same shape and dtype at every leaf."""
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(
        (x.shape, x.dtype) == (y.shape, y.dtype)
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    )


def check_structure(
    value: PyTree[ArrayLike], expected: PyTree[jax.ShapeDtypeStruct], what: str
) -> PyTree[Array]:
    """Check that `value` has exactly the structure, shapes and dtypes of `expected`.

    Raises a `ValueError` naming both structures otherwise, and returns `value` with
    its leaves converted to JAX arrays.
    """
    try:
        value = jtu.tree_map(jnp.asarray, value)
    except TypeError as e:
        raise ValueError(f"{what} must be a pytree of arrays: {e}") from None
    got = jax.eval_shape(lambda: value)
    if not same_structure(got, expected):
        raise ValueError(
            f"{what} has structure {_describe(got)}, but the operator expects "
            f"{_describe(expected)} (tree structure, shapes and dtypes must all match)."
        )
    return value


def structure_size(struct: PyTree[jax.ShapeDtypeStruct]) -> int:
    return sum(int(np.prod(x.shape)) for x in jtu.tree_leaves(struct))


def scalar_dtypes(*structs: PyTree) -> tuple[jnp.dtype, jnp.dtype]:
    """The (possibly complex) working dtype of some structures and its real part."""
    leaves = [x.dtype for s in structs for x in jtu.tree_leaves(s)]
    dtype = jnp.result_type(*leaves) if leaves else jnp.dtype(float)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, float)
    real = jnp.finfo(dtype).dtype
    return jnp.dtype(dtype), jnp.dtype(real)


def is_complex(struct: PyTree) -> bool:
    return any(jnp.iscomplexobj(x) for x in jtu.tree_leaves(struct))


# ---------------------------------------------------------------------------------
# Operator application. The adjoint is derived once per solve with
# `jax.linear_transpose`, so for a matrix `A` the product `Aᴴu` is a dot_general that
# contracts over the rows of `A`: the transpose of `A` never materialises.
# ---------------------------------------------------------------------------------


def matvecs(
    operator: lx.AbstractLinearOperator,
) -> tuple[Callable[[PyTree], PyTree], Callable[[PyTree], PyTree]]:
    """Return `(mv, rmv)` with `mv(x) = A x` and `rmv(u) = Aᴴ u`.

    The operator is linearised first (a `JacobianLinearOperator` is linearised once
    here, not once per iteration).
    """
    operator = lx.linearise(operator)
    in_struct = operator.in_structure()
    transpose = jax.linear_transpose(operator.mv, in_struct)
    complex_ = is_complex(in_struct) or is_complex(operator.out_structure())

    def mv(x):
        return operator.mv(x)

    if complex_:
        # Aᴴu = conj(Aᵀ conj(u)); `linear_transpose` gives the plain transpose.
        def rmv(u):
            (out,) = transpose(tree_conj(u))
            return tree_conj(out)
    else:

        def rmv(u):
            (out,) = transpose(u)
            return out

    return mv, rmv


# ---------------------------------------------------------------------------------
# Leaf-wise vector arithmetic.
# ---------------------------------------------------------------------------------


def tree_zeros(struct: PyTree[jax.ShapeDtypeStruct]) -> PyTree[Array]:
    return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), struct)


def tree_conj(x: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.conj, x)


def tree_norm(x: PyTree[Array]) -> Shaped[Array, ""]:
    """Euclidean norm over all leaves (a real scalar)."""
    squares = [
        jnp.sum(jnp.real(a) ** 2 + jnp.imag(a) ** 2)
        if jnp.iscomplexobj(a)
        else jnp.sum(a**2)
        for a in jtu.tree_leaves(x)
    ]
    return jnp.sqrt(sum(squares[1:], squares[0]))


def tree_scale(alpha: ArrayLike, x: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda a: jnp.asarray(alpha).astype(a.dtype) * a, x)


def tree_axpy(alpha: ArrayLike, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    """$\\alpha x + y$."""
    return jtu.tree_map(lambda a, b: jnp.asarray(alpha).astype(a.dtype) * a + b, x, y)


def tree_sub(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda a, b: a - b, x, y)


def tree_add(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda a, b: a + b, x, y)


def tree_where(pred: ArrayLike, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), x, y)


def _project_out(x: PyTree[Array], rows: PyTree[Array]) -> PyTree[Array]:
    """`x − Rᴴ(R x)` over all leaves: two matrix–vector products with the rows `R`."""
    coeffs = [
        jnp.tensordot(jnp.conj(rl), xl, axes=xl.ndim)
        for rl, xl in zip(jtu.tree_leaves(rows), jtu.tree_leaves(x))
    ]
    coeffs = sum(coeffs[1:], coeffs[0])
    return jtu.tree_map(
        lambda rl, xl: xl - jnp.tensordot(coeffs.astype(rl.dtype), rl, axes=1), rows, x
    )


def tree_orthogonalise(
    x: PyTree[Array],
    basis: PyTree[Array],
    num_rows: Array | None = None,
    block: int | None = None,
) -> PyTree[Array]:
    """Remove from `x` its components along the rows of `basis` (a pytree like `x`
    with a leading axis; rows of zeros are allowed and have no effect).

    Gram–Schmidt applied twice: one pass leaves components of the size of the rounding
    error times the condition of the basis, a second pass removes them ("twice is
    enough"; Giraud, Langou and Rozložník, 2005). With `num_rows` (traced) and
    `block` (static, dividing the number of rows), only the first `num_rows` rows are
    used, `block` rows at a time (block Gram–Schmidt): the cost grows with the rows
    filled so far, not with the storage reserved for them.
    """
    if num_rows is None or block is None:
        for _ in range(2):
            x = _project_out(x, basis)
        return x

    num_blocks = (num_rows + block - 1) // block

    def one_block(i, x):
        rows = jtu.tree_map(
            lambda bl: jax.lax.dynamic_slice_in_dim(bl, i * block, block, axis=0), basis
        )
        return _project_out(x, rows)

    for _ in range(2):
        x = jax.lax.fori_loop(0, num_blocks, one_block, x)
    return x
