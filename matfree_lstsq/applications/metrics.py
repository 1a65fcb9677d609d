r"""Metrics for predictive uncertainty: classification (accuracy, negative
log-likelihood in both conventions, Brier score, calibration errors), out-of-
distribution detection (AUROC) and regression (RMSE, Gaussian NLL).

Conventions: `labels` are integer class indices of shape `(N,)`; `probs` are
predictive probabilities of shape `(N, C)`; `logits` of shape `(S, N, C)` hold the
per-sample logits (or log-probabilities) of `S` posterior samples — they are
normalised here with a log-softmax, so either works.

Two negative log-likelihoods are in use in the literature, and they differ:

- [`predictive_nll`][matfree_lstsq.applications.metrics.predictive_nll]: the
    negative log of the *mean predictive probability* (of the Bayesian model
    average), $-\frac1N\sum_n \log \frac1S \sum_s p_s(y_n \mid x_n)$. This is the
    usual test metric.
- [`expected_nll`][matfree_lstsq.applications.metrics.expected_nll]: the *mean over
    samples of the log-likelihood*, $-\frac1N\sum_n \frac1S\sum_s \log p_s(y_n \mid
    x_n)$ (the expected-log-likelihood term of an ELBO). By Jensen's inequality it is
    never smaller than `predictive_nll`.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int


__all__ = [
    "accuracy",
    "auroc",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "expected_nll",
    "gaussian_nll",
    "maximum_calibration_error",
    "predictive_nll",
    "predictive_probs",
    "rmse",
]


def _check_probs(probs: ArrayLike, labels: ArrayLike) -> tuple[Array, Array]:
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"`probs` must have shape (N, C); got shape {probs.shape}.")
    _check_labels(labels, probs.shape[0])
    return probs, labels


def _check_labels(labels: Array, n: int) -> None:
    if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"`labels` must be integer class indices of shape ({n},); got "
            f"{labels.dtype} of shape {labels.shape}."
        )


def _check_logits(logits: ArrayLike, labels: ArrayLike) -> tuple[Array, Array]:
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim != 3:
        raise ValueError(
            "`logits` must have shape (S, N, C): per-sample logits of S samples "
            f"(use `logits[None]` for a single prediction); got shape {logits.shape}."
        )
    _check_labels(labels, logits.shape[1])
    return logits, labels


def _check_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"`num_bins` must be a positive int; got {num_bins!r}.")


# ---------------------------------------------------------------------------------
# Classification.
# ---------------------------------------------------------------------------------


def predictive_probs(logits: Float[ArrayLike, "S N C"]) -> Float[Array, "N C"]:
    r"""The predictive (Bayesian model average) probabilities
    $\frac1S \sum_s \operatorname{softmax}(\text{logits}_s)$.

    **Arguments:**

    - `logits`: per-sample logits of shape `(S, N, C)`.

    **Returns:**

    Probabilities of shape `(N, C)`.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"`logits` must have shape (S, N, C); got {logits.shape}.")
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)


def accuracy(
    probs: Float[ArrayLike, "N C"], labels: Int[ArrayLike, " N"]
) -> Float[Array, ""]:
    """Fraction of data whose most probable class is the label.

    **Arguments:**

    - `probs`: predictive probabilities (or any scores) of shape `(N, C)`.
    - `labels`: integer labels of shape `(N,)`.

    **Returns:**

    A scalar in $[0, 1]$.
    """
    return _accuracy(*_check_probs(probs, labels))


@jax.jit
def _accuracy(probs, labels):
    return jnp.mean((jnp.argmax(probs, axis=-1) == labels).astype(probs.dtype))


def predictive_nll(
    logits: Float[ArrayLike, "S N C"], labels: Int[ArrayLike, " N"]
) -> Float[Array, ""]:
    r"""Negative log of the mean predictive probability:
    $-\frac1N \sum_n \log \frac1S \sum_s p_s(y_n \mid x_n)$, computed stably with a
    log-sum-exp over samples.

    **Arguments:**

    - `logits`: per-sample logits (or log-probabilities) of shape `(S, N, C)`.
    - `labels`: integer labels of shape `(N,)`.

    **Returns:**

    A scalar (nats per datum).
    """
    return _predictive_nll(*_check_logits(logits, labels))


def _label_log_probs(logits, labels):
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_p, labels[None, :, None], axis=-1)[..., 0]


@jax.jit
def _predictive_nll(logits, labels):
    log_py = _label_log_probs(logits, labels)
    num = jnp.asarray(logits.shape[0], logits.dtype)
    log_mean = jax.scipy.special.logsumexp(log_py, axis=0) - jnp.log(num)
    return -jnp.mean(log_mean)


def expected_nll(
    logits: Float[ArrayLike, "S N C"], labels: Int[ArrayLike, " N"]
) -> Float[Array, ""]:
    r"""Mean over samples of the negative log-likelihood:
    $-\frac1N \sum_n \frac1S \sum_s \log p_s(y_n \mid x_n)$. Never smaller than
    [`predictive_nll`][matfree_lstsq.applications.metrics.predictive_nll].

    **Arguments:**

    - `logits`: per-sample logits (or log-probabilities) of shape `(S, N, C)`.
    - `labels`: integer labels of shape `(N,)`.

    **Returns:**

    A scalar (nats per datum).
    """
    return _expected_nll(*_check_logits(logits, labels))


@jax.jit
def _expected_nll(logits, labels):
    return -jnp.mean(_label_log_probs(logits, labels))


def brier_score(
    probs: Float[ArrayLike, "N C"], labels: Int[ArrayLike, " N"]
) -> Float[Array, ""]:
    r"""Brier score $\frac1N \sum_n \sum_c (p_{nc} - [y_n = c])^2$ (0 is perfect,
    at most 2).

    **Arguments:**

    - `probs`: predictive probabilities of shape `(N, C)`.
    - `labels`: integer labels of shape `(N,)`.

    **Returns:**

    A scalar.

    **References:**

    G. W. Brier, *Verification of forecasts expressed in terms of probability*,
    Monthly Weather Review 78(1), 1950.
    """
    return _brier_score(*_check_probs(probs, labels))


@jax.jit
def _brier_score(probs, labels):
    onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
    return jnp.mean(jnp.sum((probs - onehot) ** 2, axis=-1))


def calibration_bins(
    probs: Float[ArrayLike, "N C"],
    labels: Int[ArrayLike, " N"],
    *,
    num_bins: int = 15,
) -> tuple[Float[Array, " B"], Float[Array, " B"], Int[Array, " B"]]:
    r"""Confidence histogram of a reliability diagram.

    Data are binned by confidence $\max_c p_{nc}$ into `num_bins` equal-width bins
    of $[0, 1]$ (bin $b$ is $(b/B, (b+1)/B]$, the first also holds 0), as
    `numpy.digitize(conf, numpy.linspace(0, 1, B + 1), right=True)` does.

    **Arguments:**

    - `probs`: predictive probabilities of shape `(N, C)`.
    - `labels`: integer labels of shape `(N,)`.
    - `num_bins`: the number of bins $B$.

    **Returns:**

    `(confidence, accuracy, count)`, each of shape `(num_bins,)`: the mean
    confidence and the accuracy of the data in each bin (0 for empty bins), and how
    many data fall into it.
    """
    _check_bins(num_bins)
    probs, labels = _check_probs(probs, labels)
    return _calibration_bins(probs, labels, num_bins)


@functools.partial(jax.jit, static_argnums=2)
def _calibration_bins(probs, labels, num_bins):
    conf = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(probs.dtype)
    edges = jnp.linspace(0, 1, num_bins + 1, dtype=probs.dtype)
    # Bin b holds edges[b] < conf <= edges[b + 1] (and conf = 0 goes to bin 0).
    index = jnp.clip(jnp.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    count = jnp.zeros(num_bins, jnp.int32).at[index].add(1)
    sum_conf = jnp.zeros(num_bins, probs.dtype).at[index].add(conf)
    sum_correct = jnp.zeros(num_bins, probs.dtype).at[index].add(correct)
    safe = jnp.maximum(count, 1).astype(probs.dtype)
    return sum_conf / safe, sum_correct / safe, count


def expected_calibration_error(
    probs: Float[ArrayLike, "N C"],
    labels: Int[ArrayLike, " N"],
    *,
    num_bins: int = 15,
) -> Float[Array, ""]:
    r"""Expected calibration error
    $\sum_b \frac{n_b}{N} |\operatorname{acc}_b - \operatorname{conf}_b|$ over
    equal-width confidence bins (see
    [`calibration_bins`][matfree_lstsq.applications.metrics.calibration_bins]).

    **Arguments:**

    - `probs`: predictive probabilities of shape `(N, C)`.
    - `labels`: integer labels of shape `(N,)`.
    - `num_bins`: the number of bins.

    **Returns:**

    A scalar in $[0, 1]$.

    **References:**

    M. P. Naeini, G. F. Cooper and M. Hauskrecht, *Obtaining well calibrated
    probabilities using Bayesian binning*, AAAI 2015. C. Guo et al., *On calibration
    of modern neural networks*, ICML 2017.
    """
    conf, acc, count = calibration_bins(probs, labels, num_bins=num_bins)
    weight = count.astype(conf.dtype) / jnp.sum(count).astype(conf.dtype)
    return jnp.sum(weight * jnp.abs(acc - conf))


def maximum_calibration_error(
    probs: Float[ArrayLike, "N C"],
    labels: Int[ArrayLike, " N"],
    *,
    num_bins: int = 15,
) -> Float[Array, ""]:
    r"""Maximum calibration error $\max_b |\operatorname{acc}_b -
    \operatorname{conf}_b|$ over the non-empty equal-width confidence bins.

    **Arguments:**

    - `probs`: predictive probabilities of shape `(N, C)`.
    - `labels`: integer labels of shape `(N,)`.
    - `num_bins`: the number of bins.

    **Returns:**

    A scalar in $[0, 1]$.
    """
    conf, acc, count = calibration_bins(probs, labels, num_bins=num_bins)
    return jnp.max(jnp.where(count > 0, jnp.abs(acc - conf), 0))


def auroc(
    in_scores: Float[ArrayLike, " N_in"], out_scores: Float[ArrayLike, " N_out"]
) -> Float[Array, ""]:
    r"""Area under the ROC curve for telling in-distribution from out-of-distribution
    data by a confidence score (higher means more confident, i.e. more likely
    in-distribution), e.g. the maximum predictive probability.

    Computed as the Mann–Whitney statistic: the probability that a random
    in-distribution score exceeds a random out-of-distribution one, ties counting
    one half. 1 is perfect separation, 0.5 chance.

    **Arguments:**

    - `in_scores`: confidence scores of the in-distribution data, shape `(N_in,)`.
    - `out_scores`: confidence scores of the out-of-distribution data, shape
        `(N_out,)`.

    **Returns:**

    A scalar in $[0, 1]$.
    """
    in_scores = jnp.asarray(in_scores)
    out_scores = jnp.asarray(out_scores)
    for name, s in (("in_scores", in_scores), ("out_scores", out_scores)):
        if s.ndim != 1 or s.shape[0] == 0:
            raise ValueError(
                f"`{name}` must be a non-empty 1-D array of scores; got shape "
                f"{s.shape}."
            )
    dtype = jnp.promote_types(in_scores.dtype, out_scores.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.zeros(()).dtype  # the default float dtype
    return _auroc(in_scores.astype(dtype), out_scores.astype(dtype))


@jax.jit
def _auroc(scores, out_scores):
    dtype = scores.dtype
    sorted_out = jnp.sort(out_scores)
    below = jnp.searchsorted(sorted_out, scores, side="left")
    below_or_tied = jnp.searchsorted(sorted_out, scores, side="right")
    wins = (below + below_or_tied).astype(dtype) / 2
    total = jnp.asarray(scores.shape[0] * out_scores.shape[0], dtype)
    return jnp.sum(wins) / total


# ---------------------------------------------------------------------------------
# Regression.
# ---------------------------------------------------------------------------------


def rmse(
    predictions: Float[ArrayLike, "N ..."], targets: Float[ArrayLike, "N ..."]
) -> Float[Array, ""]:
    r"""Root mean squared error $\sqrt{\operatorname{mean}(y - \hat y)^2}$ over all
    entries.

    **Arguments:**

    - `predictions`: predicted means.
    - `targets`: targets of the same shape.

    **Returns:**

    A scalar.
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"`predictions` and `targets` must have the same shape; got "
            f"{predictions.shape} and {targets.shape}."
        )
    return _rmse(predictions, targets)


@jax.jit
def _rmse(predictions, targets):
    return jnp.sqrt(jnp.mean((predictions - targets) ** 2))


def gaussian_nll(
    mean: Float[ArrayLike, "N ..."],
    variance: Float[ArrayLike, "N ..."],
    targets: Float[ArrayLike, "N ..."],
) -> Float[Array, ""]:
    r"""Gaussian negative log-likelihood per entry,
    $\operatorname{mean}\big[\tfrac12 \log(2\pi\sigma^2) + (y - \mu)^2 /
    (2\sigma^2)\big]$.

    For a sampled predictive, pass the sample mean and the sample variance plus the
    observation noise variance.

    **Arguments:**

    - `mean`: predictive means $\mu$.
    - `variance`: predictive variances $\sigma^2 > 0$ (broadcastable to `mean`).
    - `targets`: targets $y$ of the shape of `mean`.

    **Returns:**

    A scalar (nats per entry).
    """
    mean, variance, targets = map(jnp.asarray, (mean, variance, targets))
    if mean.shape != targets.shape:
        raise ValueError(
            f"`mean` and `targets` must have the same shape; got {mean.shape} and "
            f"{targets.shape}."
        )
    try:
        jnp.broadcast_shapes(variance.shape, mean.shape)
    except ValueError:
        raise ValueError(
            f"`variance` of shape {variance.shape} does not broadcast to the shape "
            f"of `mean`, {mean.shape}."
        ) from None
    return _gaussian_nll(mean, variance, targets)


@jax.jit
def _gaussian_nll(mean, variance, targets):
    log_2pi = jnp.log(2 * jnp.asarray(jnp.pi, mean.dtype))
    return jnp.mean(
        0.5 * (log_2pi + jnp.log(variance)) + (targets - mean) ** 2 / (2 * variance)
    )
