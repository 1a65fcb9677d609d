"""Small models and data sets for the application tests (`tests/test_app_*.py`).

Everything is float64 and seeded. Models follow the applications' convention
`model_fn(params, inputs) -> outputs` with dict-of-arrays parameters (pytrees, never
flattened), and every problem comes with a dense flattened Jacobian for oracles.

Import from a test file as `from app_models import ...`.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def init_mlp(seed: int, sizes: list[int], bias_scale: float = 0.1) -> dict:
    """Parameters of a tanh MLP with layer sizes `sizes`: `W{i}` of shape
    `(sizes[i], sizes[i+1])` scaled by `1/sqrt(fan_in)`, small random biases `b{i}`.

    Drawn with NumPy (seeded): no JAX dispatch, so building problems costs nothing.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        params[f"W{i}"] = jnp.asarray(w)
        params[f"b{i}"] = jnp.asarray(bias_scale * rng.standard_normal(fan_out))
    return params


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Seeded standard normal float64 array (NumPy's generator)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def mlp(params: dict, inputs: jax.Array) -> jax.Array:
    """tanh MLP; outputs `(N, O)`."""
    num_layers = len(params) // 2
    h = inputs
    for i in range(num_layers):
        h = h @ params[f"W{i}"] + params[f"b{i}"]
        if i < num_layers - 1:
            h = jnp.tanh(h)
    return h


def mlp_scalar(params: dict, inputs: jax.Array) -> jax.Array:
    """tanh MLP with one output, returned as shape `(N,)`."""
    return mlp(params, inputs)[:, 0]


def linear_model(params: dict, inputs: jax.Array) -> jax.Array:
    """`inputs @ w`, outputs `(N,)`; params `{"w": (P,)}`."""
    return inputs @ params["w"]


@dataclasses.dataclass(frozen=True, eq=False)
class AppProblem:
    """A model, its parameters and data. `targets` are class labels for
    classification problems and real values for regression."""

    model_fn: Callable
    params: dict
    inputs: jax.Array
    targets: jax.Array

    @property
    def num_params(self) -> int:
        return int(sum(p.size for p in jax.tree_util.tree_leaves(self.params)))

    def flat_params(self) -> tuple[jax.Array, Callable]:
        return ravel_pytree(self.params)

    def dense_jacobian(self, inputs: jax.Array | None = None) -> np.ndarray:
        """`∂ vec(model_fn(params, inputs)) / ∂ ravel(params)` as a numpy matrix
        (rows: data-major, then outputs; columns: `ravel_pytree` order)."""
        x = self.inputs if inputs is None else inputs
        return np.asarray(_dense_jacobian(self.model_fn, self.params, x))


@functools.partial(jax.jit, static_argnums=0)
def _dense_jacobian(model_fn, params, inputs):
    flat, unravel = ravel_pytree(params)
    return jax.jacfwd(lambda f: model_fn(unravel(f), inputs).reshape(-1))(flat)


def mlp_problem(
    sizes: tuple[int, ...] = (8, 32, 32, 2), num_data: int = 200, seed: int = 0
) -> AppProblem:
    """A tanh MLP at a random point with Gaussian inputs and sine targets.

    The default (1410 parameters, 200 × 2 outputs) has a Jacobian of full row rank
    with condition number about 5e2: LSMR resolves its whole row space, so iterative
    and SVD projectors can be compared to tight tolerances.
    """
    params = init_mlp(seed, list(sizes))
    inputs = normal(seed + 1000, (num_data, sizes[0]))
    targets = jnp.sin(inputs[:, : sizes[-1]])
    return AppProblem(mlp, params, inputs, targets)


def tiny_classifier(num_data: int = 24, seed: int = 1) -> AppProblem:
    """2 → 5 → 3 tanh MLP (33 parameters) on 2-D inputs, with labels from the
    nearest of three centres: for Monte-Carlo covariance checks."""
    params = init_mlp(seed, [2, 5, 3], bias_scale=0.5)
    inputs = np.random.default_rng(seed + 1000).standard_normal((num_data, 2))
    centres = np.random.default_rng(seed + 2000).standard_normal((3, 2))
    labels = np.argmin(((inputs[:, None, :] - centres[None]) ** 2).sum(-1), axis=-1)
    return AppProblem(mlp, params, jnp.asarray(inputs), jnp.asarray(labels))


def tiny_regressor(num_data: int = 24, seed: int = 2) -> AppProblem:
    """2 → 6 → 1 tanh MLP (25 parameters), outputs `(N,)`: for Monte-Carlo
    covariance checks."""
    params = init_mlp(seed, [2, 6, 1], bias_scale=0.5)
    inputs = np.random.default_rng(seed + 1000).standard_normal((num_data, 2))
    targets = np.sin(2 * inputs[:, 0]) + 0.1 * inputs[:, 1]
    return AppProblem(mlp_scalar, params, jnp.asarray(inputs), jnp.asarray(targets))
