r"""Sparse training with the null-space method, against magnitude pruning.

A multilayer perceptron is trained on scikit-learn's handwritten digits (8x8 images,
10 classes) under the constraint that a fixed, randomly chosen 90% of its weights
(in every weight matrix; biases are free) are zero:

$$c(\theta) = (W_1[M_1],\ W_2[M_2]) = 0 .$$

The optimiser is `optax.chain(optax.adam(lr), mfa.nullspace_projection(c))`: Adam's
update $u$ is replaced by $u - J^+(J u + \gamma c)$, the component of $u$ that keeps
the constraints plus a Gauss–Newton correction (one matrix-free LSMR solve per
step; for this linear constraint $J$ selects entries, and LSMR converges in one
iteration). Training starts from the same dense initialisation as the baseline, so
the first steps are a warm-up that removes the violation.

It is compared with the usual route to the same sparsity: train the dense network,
then prune the 90% of each weight matrix with the smallest magnitudes (one-shot), and
optionally fine-tune the pruned network with the same null-space optimiser.

This is the weight-sparsity experiment of Roy, Hauberg and Krämer, *Matrix-free least
squares solvers: values, gradients, and what to do with them* (arXiv:2510.19634), at
the size of this example. Everything runs in float32.

The script exits with a non-zero status if the constraint violation $\|c(\theta)\|_2$
exceeds 1e-6 after the warm-up, or if constrained training does not decrease the
loss. Run with `MFL_EXAMPLE_SMALL=1` for a smaller, faster version (as CI does); a
figure is written to `MFL_EXAMPLE_OUTDIR` (default `examples/figures/`).
"""

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import matfree_lstsq as mfl  # noqa: E402
from matfree_lstsq import applications as mfa  # noqa: E402


SMALL = os.environ.get("MFL_EXAMPLE_SMALL", "0") not in ("", "0")
OUTDIR = Path(os.environ.get("MFL_EXAMPLE_OUTDIR") or Path(__file__).parent / "figures")
HIDDEN = 64 if SMALL else 256
EPOCHS = 15 if SMALL else 40
FINE_TUNE_EPOCHS = 5 if SMALL else 10
BATCH = 64
LEARNING_RATE = 3e-3
SPARSITY = 0.9
WARMUP = 5  # steps; with correction_rate=1 one step removes a linear violation
MAX_VIOLATION = 1e-6
WEIGHTS = ("W1", "W2")


def load_data():
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    x = (x / 16.0).astype(np.float32)
    return (
        (jnp.asarray(x[train]), jnp.asarray(y[train])),
        (jnp.asarray(x[test]), jnp.asarray(y[test])),
    )


def init_mlp(key, sizes):
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        key, wkey = jax.random.split(key)
        params[f"W{i}"] = jax.random.normal(wkey, (fan_in, fan_out), jnp.float32)
        params[f"W{i}"] = params[f"W{i}"] * np.float32(np.sqrt(2.0 / fan_in))
        params[f"b{i}"] = jnp.zeros(fan_out, jnp.float32)
    return params


def mlp(params, x):
    h = jax.nn.relu(x @ params["W1"] + params["b1"])
    return h @ params["W2"] + params["b2"]


def loss_fn(params, x, y):
    logits = mlp(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(mlp(params, x), axis=1) == y))


def random_masks(params, rng):
    """A fixed random 90% of the entries of every weight matrix (True: must be 0)."""
    masks = {}
    for name in WEIGHTS:
        size = params[name].size
        chosen = rng.permutation(size) < int(round(SPARSITY * size))
        masks[name] = jnp.asarray(chosen.reshape(params[name].shape))
    return masks


def magnitude_masks(params):
    """The 90% smallest-magnitude entries of every weight matrix."""
    masks = {}
    for name in WEIGHTS:
        w = np.abs(np.asarray(params[name])).ravel()
        k = int(round(SPARSITY * w.size))
        chosen = np.zeros(w.size, bool)
        chosen[np.argsort(w, kind="stable")[:k]] = True
        masks[name] = jnp.asarray(chosen.reshape(params[name].shape))
    return masks


def mask_index(masks):
    """The flat indices of the entries that must be zero, per weight matrix."""
    return {name: jnp.nonzero(masks[name].ravel())[0] for name in WEIGHTS}


def constraints(index):
    def constraint_fn(params):
        return {name: params[name].ravel()[index[name]] for name in WEIGHTS}

    return constraint_fn


def make_optimiser(index):
    """Adam; with constraints (`index` not None), followed by the null-space
    projection, last in the chain."""
    adam = optax.adam(LEARNING_RATE)
    if index is None:
        return adam
    projection = mfa.nullspace_projection(constraints(index), correction_rate=1.0)
    return optax.chain(adam, projection)


def violation(constraint_fn, params):
    c = constraint_fn(params)
    return jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(c)))


def batches(num_train, epochs, seed):
    rng = np.random.default_rng(seed)
    steps = num_train // BATCH
    idx = [rng.permutation(num_train)[: steps * BATCH] for _ in range(epochs)]
    return jnp.asarray(np.stack(idx).reshape(epochs, steps, BATCH))


def projection_state(state) -> mfa.NullspaceProjectionState:
    """The null-space projection's state: the last entry of the chain's state."""
    projection = state[-1]
    assert isinstance(projection, mfa.NullspaceProjectionState)
    return projection


def make_trainer(data, projected: bool) -> Callable[..., tuple[Any, ...]]:
    """A training loop compiled once per flavour (dense or projected): one jitted
    `lax.scan` per epoch, with the constraint indices as an argument, so different
    masks of the same size reuse the compiled code."""
    x, y = data

    def epoch(p, state, batch_idx, index):
        optimiser = make_optimiser(index)

        def step(carry, idx):
            p, state = carry
            value, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
            updates, state = optimiser.update(grads, state, p)
            p = optax.apply_updates(p, updates)
            if projected:
                viol = violation(constraints(index), p)
                record = (value, viol, projection_state(state).num_steps)
            else:
                record = (value, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            return (p, state), record

        (p, state), trace = jax.lax.scan(step, (p, state), batch_idx)
        return p, state, trace

    init = jax.jit(lambda p, index: make_optimiser(index).init(p))
    epoch = jax.jit(epoch)

    def train(params, batch_idx, index=None):
        """Record the loss, the violation after each step and the LSMR iterations."""
        assert (index is not None) == projected
        start = time.perf_counter()
        state = init(params, index)
        traces = []
        for e in range(batch_idx.shape[0]):
            params, state, trace = epoch(params, state, batch_idx[e], index)
            traces.append(trace)
        losses, violations, lsmr_steps = (
            np.concatenate([np.asarray(t[k]) for t in traces]) for k in range(3)
        )
        seconds = time.perf_counter() - start
        return params, losses, violations, lsmr_steps, seconds

    return train


def main() -> int:
    print(f"matfree_lstsq {mfl.__version__}, jax {jax.__version__}, small={SMALL}")
    train_data, (x_test, y_test) = load_data()
    num_train = train_data[0].shape[0]
    params0 = init_mlp(jax.random.key(0), [64, HIDDEN, 10])
    num_weights = sum(params0[name].size for name in WEIGHTS)
    print(
        f"digits: {num_train} train, {x_test.shape[0]} test; MLP 64-{HIDDEN}-10 "
        f"({num_weights} weights, {int(round(SPARSITY * num_weights))} constrained "
        f"to zero); {EPOCHS} epochs of batch {BATCH}, Adam lr={LEARNING_RATE}"
    )
    steps = batches(num_train, EPOCHS, seed=1)
    train_dense = make_trainer(train_data, projected=False)
    train_projected = make_trainer(train_data, projected=True)
    rows = []
    ok = True

    # 1. Dense training.
    dense, dense_losses, _, _, t_dense = train_dense(params0, steps)
    rows.append(("dense (no constraint)", accuracy(dense, x_test, y_test), 0.0, "-"))

    # 2. Null-space training from the dense initialisation, fixed random mask.
    index = mask_index(random_masks(params0, np.random.default_rng(2)))
    constraint_fn = constraints(index)
    sparse, losses, violations, lsmr_steps, t_sparse = train_projected(
        params0, steps, index
    )
    v_init = float(violation(constraint_fn, params0))
    v_max = float(np.max(violations[WARMUP:]))
    rows.append(
        ("null-space, random 90% mask", accuracy(sparse, x_test, y_test), v_max, "")
    )
    print(
        f"\nnull-space training: violation {v_init:.2e} at initialisation, "
        f"{float(violations[0]):.2e} after step 1, max {v_max:.2e} over steps "
        f"{WARMUP + 1}-{len(violations)}; LSMR iterations per step: "
        f"{int(np.min(lsmr_steps))}-{int(np.max(lsmr_steps))}"
    )
    if not v_max <= MAX_VIOLATION:
        print(f"constraint violation {v_max:.2e} > {MAX_VIOLATION:g}", file=sys.stderr)
        ok = False
    per_epoch = losses.reshape(EPOCHS, -1).mean(axis=1)
    if not per_epoch[-1] < per_epoch[0]:
        print("constrained training did not decrease the loss", file=sys.stderr)
        ok = False

    # 3. Magnitude pruning of the dense network (one-shot), then fine-tuning with the
    #    null-space optimiser on the pruning mask.
    pmasks = magnitude_masks(dense)
    pruned = dict(dense)
    for name in WEIGHTS:
        pruned[name] = jnp.where(pmasks[name], 0.0, dense[name]).astype(jnp.float32)
    rows.append(
        ("magnitude pruning (one-shot)", accuracy(pruned, x_test, y_test), 0.0, "")
    )
    fine_tuned, _, fviolations, _, t_fine = train_projected(
        pruned, batches(num_train, FINE_TUNE_EPOCHS, seed=3), mask_index(pmasks)
    )
    fv_max = float(np.max(fviolations))
    rows.append(
        (
            f"  + null-space fine-tuning ({FINE_TUNE_EPOCHS} ep.)",
            accuracy(fine_tuned, x_test, y_test),
            fv_max,
            "",
        )
    )
    if not fv_max <= MAX_VIOLATION:
        print(
            f"fine-tuning violation {fv_max:.2e} > {MAX_VIOLATION:g}", file=sys.stderr
        )
        ok = False

    header = f"{'model (90% of weights zero)':<38}{'test acc.':>10}{'max ‖c‖':>11}"
    print(f"\n{header}\n{'-' * len(header)}")
    for name, acc, viol, _ in rows:
        viol_s = f"{viol:>11.1e}" if viol else f"{'-':>11}"
        print(f"{name:<38}{acc:>10.4f}{viol_s}")
    print(
        f"(the dense row has no zero weights; max ‖c‖ after warm-up. Training "
        f"times, including compilation: dense {t_dense:.1f} s, null-space "
        f"{t_sparse:.1f} s, fine-tuning {t_fine:.1f} s, which reuses the null-space "
        "run's compiled code)"
    )

    OUTDIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(dense_losses, label="dense", lw=0.8)
    ax[0].plot(losses, label="null-space, 90% zero", lw=0.8)
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log")
    ax[0].legend()
    ax[1].semilogy(np.maximum(violations, 1e-30))
    ax[1].axhline(MAX_VIOLATION, color="k", ls="--", lw=0.8)
    ax[1].set(xlabel="step", ylabel="‖c(θ)‖ after the step")
    fig.tight_layout()
    fig.savefig(OUTDIR / "sparse_training.png", dpi=120)
    print(f"\nfigure: {OUTDIR / 'sparse_training.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
