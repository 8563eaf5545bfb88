"""The local update of ONE site: `lax.scan` over local steps. The caller vmaps it over sites.

Minibatches are drawn inside jit from the site's row of the index table. Positions are taken
modulo the site's real example count, so padding rows are never read and a site's training
depends only on its own examples, never on the padded width `n_max`: a site of 3 examples
and a site of 300 train exactly as they would alone.

Curvature optimizers (esgd, adahessian, sophia) take Hessian-vector products of the `obj_fn`
each step hands them. When `data` carries a public calibration set (`optim.public_data`), that
objective is the loss of a minibatch of PUBLIC examples, drawn inside jit from the site's key
folded with the step; the gradient step still takes the (privatized) gradient of the site's
minibatch. Without one it is the site's minibatch loss, except under example-level DP, where
it is None (the config refuses curvature optimizers there).
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import optim
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.models import Model, cross_entropy
from fedjax_lab.privacy.clipping import privatize
from fedjax_lab.privacy.sampling import poisson_sample

_PROBE_STREAM = 0x5EED  # fold_in tag of the curvature probes' key (batches use split)
_PUBLIC_STREAM = 0x9AB1  # fold_in tag of the public calibration batches' key


class ClientConfig(NamedTuple):
  local_steps: int
  batch_size: int
  shuffle: bool       # False: batches in stored order (the reference benchmark's setting)
  prox_mu: float      # FedProx proximal coefficient (Li et al. 2020); 0 is FedAvg
  public_batch_size: int = 64  # public examples per curvature objective (all if fewer)


class ExampleDP(NamedTuple):
  """DP-SGD at the site (Abadi et al. 2016): Poisson minibatches, clipped sum, Gaussian noise.

  Each local step every example of the site joins independently with probability
  rate = batch_size / count (capped at 1); the sampled examples fill `max_batch` slots
  (privacy/sampling.py); the clipped gradient sum gets N(0, (noise_multiplier * clip_norm)^2)
  and is divided by `example_dp_divisor`: the expected batch size rate * count, or with
  `fixed_divisor` set, that number at every site.

  Coordinated noise needs `fixed_divisor` (= batch_size): a site smaller than its batch
  samples at rate 1 and would divide by its own size, so one of its examples would move the
  sum by C / size while the K shares of sigma / sqrt(K) carry noise calibrated to C /
  batch_size (one site of 10 among nine of 150, batch 15: 0.707 sigma).
  """
  clip_norm: float
  noise_multiplier: float   # this site's share: sigma (parallel) or sigma / sqrt(K) (coordinated)
  max_batch: int
  clipped_grad_sum: Callable  # privacy.clipping.make_clipped_grad_sum(..., return_losses=True)
  fixed_divisor: float | None = None


def example_dp_divisor(dp: ExampleDP, batch_size: int, site_count):
  """What a site divides its noised clipped gradient sum by (jnp or NumPy counts)."""
  if dp.fixed_divisor is not None:
    return dp.fixed_divisor + 0 * site_count
  return jnp.minimum(1.0, batch_size / site_count) * site_count


class ClientOutput(NamedTuple):
  delta: Any          # local params - global params, shaped like params
  model_state: Any    # the site's BatchNorm statistics after training ({} if none)
  train_loss: jax.Array  # mean minibatch loss over the local steps
  dp_overflow: jax.Array  # Poisson-sampled examples that did not fit max_batch (0 without DP)


def _epoch_permutation(rng, epoch, count, n_max):
  """A uniformly random order of the site's `count` examples for one epoch.

  Keys are drawn per position with fold_in, so the order of the first `count` positions does
  not depend on n_max (drawing one [n_max] vector would change with the padded width).
  """
  epoch_rng = jax.random.fold_in(rng, epoch)
  keys = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(epoch_rng, i)))(
      jnp.arange(n_max))
  keys = jnp.where(jnp.arange(n_max) < count, keys, jnp.inf)
  return jnp.argsort(keys)


def minibatch_positions(rng, step, count, n_max, batch_size, shuffle):
  """[batch_size] positions in [0, count) for local step `step`: the site's examples as an
  endless stream of epochs (shuffled each epoch, or in stored order), cut into batches."""
  stream = step * batch_size + jnp.arange(batch_size)
  epoch, offset = stream // count, stream % count
  if not shuffle:
    return offset
  first = epoch[0]
  # A batch spans at most two epochs unless batch_size > count; epochs beyond reuse these two
  # orders alternately (only for sites smaller than one batch).
  perms = jnp.stack([_epoch_permutation(rng, first + k, count, n_max) for k in range(2)])
  return perms[(epoch - first) % 2, offset]


def public_minibatch_rows(rng, num_public: int, batch_size: int):
  """[min(batch_size, num_public)] distinct rows of the public calibration set, uniformly."""
  size = min(batch_size, num_public)
  return jax.random.choice(rng, num_public, (size,), replace=False)


def _loss_fn(model: Model, params, model_state, x, y, rng):
  logits, new_state = model.apply(params, model_state, x, True, rng)
  return cross_entropy(logits, y).mean(), new_state


def make_public_objective(model: Model, batch_size: int):
  """Returns objective(model_state, rows_rng, dropout_rng, data) -> obj_fn(params) -> loss.

  obj_fn is the mean loss of `batch_size` public examples (`data.public_x`) drawn with
  `rows_rng`: the curvature objective of a client step here and of the server step in
  algorithms/fedavg.py and scaffold.py, which have no data of their own.
  """

  def objective(model_state, rows_rng, dropout_rng, data: FederatedData):
    rows = public_minibatch_rows(rows_rng, data.public_x.shape[0], batch_size)
    x, y = data.public_x[rows], data.public_y[rows]
    return lambda p: _loss_fn(model, p, model_state, x, y, dropout_rng)[0]

  return objective


def make_client_update(model: Model, client_tx: optax.GradientTransformationExtraArgs,
                       config: ClientConfig, dp: ExampleDP | None = None):
  """Returns client_update(params, model_state, site_idx, site_count, rng, data) -> ClientOutput.

  site_idx: [n_max] int32 row of the index table; site_count: int32 (0: an empty slot, which
  trains on zeros; without example-level DP only); rng: the site's key for
  this round (folded in with the round and site id by the caller). With `dp`, every local
  step is a DP-SGD step on a Poisson minibatch (see ExampleDP).
  """

  loss_fn = functools.partial(_loss_fn, model)
  public_objective = make_public_objective(model, config.public_batch_size)

  def plain_grad_fn(params, model_state, x, y, rng):
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, x, y, rng)
    return loss, grads, new_state

  def private_step_grads(params, ms, site_idx, site_count, batch_rng, rng_t, data):
    """One DP-SGD gradient: Poisson sample, clipped per-example sum, noise, / expected size."""
    rate = jnp.minimum(1.0, config.batch_size / site_count)
    pos, mask, overflow = poisson_sample(batch_rng, site_count, rate, site_idx.shape[0],
                                         dp.max_batch)
    rows = site_idx[pos]
    x, y = data.x[rows], data.y[rows]
    grad_sum, _, losses = dp.clipped_grad_sum(params, x, y, mask, dp.clip_norm)
    noisy = privatize(grad_sum, dp.clip_norm, dp.noise_multiplier, jax.random.fold_in(rng_t, 1))
    divisor = example_dp_divisor(dp, config.batch_size, site_count)
    grads = jax.tree.map(lambda g: g / divisor, noisy)
    loss = (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return loss, grads, ms, x, y, overflow

  def curvature_objective(ms, x, y, rng_t, public_rng, data: FederatedData):
    """The obj_fn of this step (see the module docstring): public rows, private rows or None."""
    if data.public_x is not None:
      return public_objective(ms, public_rng, rng_t, data)
    if dp is not None:
      return None  # Never the private batch under example-level DP.
    return lambda p: loss_fn(p, ms, x, y, rng_t)[0]

  def client_update(global_params, model_state, site_idx, site_count, rng, data: FederatedData):
    batch_rng, step_rng = jax.random.split(rng)
    public_rng = jax.random.fold_in(rng, _PUBLIC_STREAM)
    n_max = site_idx.shape[0]

    def step(carry, t):
      params, opt_state, ms = carry
      rng_t = jax.random.fold_in(step_rng, t)
      if dp is None:
        pos = minibatch_positions(batch_rng, t, jnp.maximum(site_count, 1), n_max,
                                  config.batch_size, config.shuffle)
        rows = site_idx[pos]
        # site_count 0 is an empty slot (a padded place in a Poisson cohort): it trains on
        # zeros, never on the examples its index row happens to point at.
        present = site_count > 0
        x = jnp.where(present, data.x[rows], 0).astype(data.x.dtype)
        y = jnp.where(present, data.y[rows], 0)
        loss, grads, new_ms = plain_grad_fn(params, ms, x, y, rng_t)
        overflow = jnp.int32(0)
      else:
        loss, grads, new_ms, x, y, overflow = private_step_grads(
            params, ms, site_idx, site_count, jax.random.fold_in(batch_rng, t), rng_t, data)
      if config.prox_mu:
        grads = jax.tree.map(lambda g, w, w0: g + config.prox_mu * (w - w0),
                             grads, params, global_params)
      obj_fn = curvature_objective(ms, x, y, rng_t, jax.random.fold_in(public_rng, t), data)
      updates, opt_state = client_tx.update(grads, opt_state, params, obj_fn=obj_fn)
      return (optax.apply_updates(params, updates), opt_state, new_ms), (loss, overflow)

    # The optimizer state is fresh every round; without a fresh probe key every site and every
    # round would draw the same Rademacher probes for its curvature estimates.
    opt_state = optim.reseed_probes(client_tx.init(global_params),
                                    jax.random.fold_in(rng, _PROBE_STREAM))
    init = (global_params, opt_state, model_state)
    (params, _, model_state), (losses, overflow) = jax.lax.scan(
        step, init, jnp.arange(config.local_steps))
    delta = jax.tree.map(jnp.subtract, params, global_params)
    # Without DP the overflow is a constant 0, so no cross-device sum is compiled for it.
    return ClientOutput(delta=delta, model_state=model_state, train_loss=losses.mean(),
                        dp_overflow=overflow.sum() if dp is not None else jnp.int32(0))

  return client_update
