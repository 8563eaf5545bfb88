"""SEAM 1, the client update: the local update of ONE site, `lax.scan` over local steps, for
every algorithm. The caller (the round) vmaps it over sites.

`make_site_gradient` is the one place a site touches its data (minibatches; under
example-level DP a Poisson sample, per-example clipping and the site's noise share, or with
matrix-factorization noise a fixed cyclic batch and the site's correlated noise);
`make_local_update` scans its steps, adds the algorithm's correction (FedProx's prox term,
SCAFFOLD's control) and applies the client optimizer; each site may take its own number of
steps (FedNova's tau_i). `make_client_update` binds both for a model and a config.

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

from fedjax_lab import losses, optim
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.models import Model
from fedjax_lab.privacy.clipping import privatize
from fedjax_lab.privacy.sampling import cyclic_batch, site_poisson_sample
from fedjax_lab.privacy.shares import example_dp_divisor

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
  rate = privacy.sampling.site_rate(batch_size, count); the sampled examples fill `max_batch` slots
  (privacy/sampling.py); the clipped gradient sum gets N(0, (noise_multiplier * clip_norm)^2)
  and is divided by `privacy.shares.example_dp_divisor`: the expected batch size rate * count,
  or with `fixed_divisor` set, that number at every site.

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
  # Matrix-factorization noise (privacy/mechanism.py, example level): the site's noise is
  # correlated over all its local steps (mf_noise.CorrelatedNoise, state carried across
  # rounds in ServerState.site_noise) and each step takes a fixed cyclic batch of batch_size
  # (privacy.sampling.cyclic_batch) instead of a Poisson sample.
  correlated: Any = None


class ClientOutput(NamedTuple):
  delta: Any          # local params - global params, shaped like params
  model_state: Any    # the site's BatchNorm statistics after training ({} if none)
  train_loss: jax.Array  # mean minibatch loss over the local steps
  dp_overflow: jax.Array  # Poisson-sampled examples that did not fit max_batch (0 without DP)
  num_steps: Any = None   # the local steps it took (client.local_steps, or its own)
  noise_state: Any = None  # example-level correlated noise: the site's state after the round


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


def minibatch_schedule(rng, num_steps: int, count, n_max: int, batch_size: int, shuffle: bool):
  """[num_steps, batch_size] positions: `minibatch_positions` of steps 0 .. num_steps - 1,
  equal to them bit for bit, with each epoch's order drawn once instead of twice per step.

  Steps 0 .. T-1 read epochs 0 .. ((T-1) B) // count + 1 (a step's first epoch and the one
  after), i.e. at most (T-1) B + 2 count <= (T-1) B + 2 n_max keys laid end to end: key
  f is uniform(fold_in(fold_in(rng, f // count), f % count)), exactly the key
  `_epoch_permutation` gives position f % count of epoch f // count. One sort by (epoch, key),
  stable, so ties go to the lower position as in the stable argsort, orders every epoch at
  once; epoch e's order is then entries e count .. (e + 1) count - 1. (A trailing epoch cut
  short by the static length is never read.) Cost: O(T B + n_max) hashes and one sort, where
  `minibatch_positions` at every step costs 2 n_max of each.
  """
  steps = jnp.arange(num_steps)
  if not shuffle:
    return jax.vmap(lambda t: minibatch_positions(rng, t, count, n_max, batch_size, False))(steps)
  length = (num_steps - 1) * batch_size + 2 * n_max
  flat = jnp.arange(length)
  epoch, pos = flat // count, flat % count
  keys = jax.vmap(lambda e, i: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, e),
                                                                     i)))(epoch, pos)
  _, _, order = jax.lax.sort((epoch, keys, pos), num_keys=2, is_stable=True)
  stream = steps[:, None] * batch_size + jnp.arange(batch_size)
  epoch, offset = stream // count, stream % count
  first = epoch[:, :1]
  return order[(first + (epoch - first) % 2) * count + offset]


def public_minibatch_rows(rng, num_public: int, batch_size: int):
  """[min(batch_size, num_public)] distinct rows of the public calibration set, uniformly."""
  size = min(batch_size, num_public)
  return jax.random.choice(rng, num_public, (size,), replace=False)


def _loss_fn(model: Model, loss: losses.Loss, params, model_state, x, y, rng):
  outputs, new_state = model.apply(params, model_state, x, True, rng)
  return loss.batch(outputs, y), new_state


def make_public_objective(model: Model, batch_size: int, loss: losses.Loss | None = None):
  """Returns objective(model_state, rows_rng, dropout_rng, data) -> obj_fn(params) -> loss.

  obj_fn is the mean loss of `batch_size` public examples (`data.public_x`) drawn with
  `rows_rng`: the curvature objective of a client step here and of the server step in
  algorithms/fedavg.py and scaffold.py, which have no data of their own. `loss`: the
  model.loss (losses.make(); None: cross-entropy).
  """
  loss = loss or losses.make()

  def objective(model_state, rows_rng, dropout_rng, data: FederatedData):
    rows = public_minibatch_rows(rows_rng, data.public_x.shape[0], batch_size)
    x, y = data.public_x[rows], data.public_y[rows]
    return lambda p: _loss_fn(model, loss, p, model_state, x, y, dropout_rng)[0]

  return objective


class StepGrad(NamedTuple):
  """One local step's gradient at a site (`make_site_gradient`)."""
  loss: jax.Array      # the step's minibatch loss (model.loss; DP: over the sampled examples)
  grads: Any           # shaped like params; under example-level DP clipped, noised, divided
  model_state: Any     # the model state after the step's forward pass (BatchNorm statistics)
  x: jax.Array         # the minibatch the gradient was taken on (the curvature objective's)
  y: jax.Array
  overflow: jax.Array  # Poisson-sampled examples that did not fit max_batch (0 without DP)
  noise_state: Any = None  # correlated noise (ExampleDP.correlated): the state after the step


def make_site_gradient(model: Model, batch_size: int, shuffle: bool,
                       dp: ExampleDP | None = None, l2: float = 0.0, full_batch: bool = False,
                       loss: losses.Loss | None = None):
  """Returns grad(params, model_state, site_idx, site_count, rng, step, data) -> StepGrad.

  THE place a site touches its data, for every algorithm: it draws local step `step`'s
  minibatch from the site's row of the index table (`minibatch_positions`; under
  example-level DP a Poisson sample with per-example clipping and the site's noise share,
  Abadi et al. 2016, see ExampleDP; with ExampleDP.correlated a fixed cyclic batch and
  correlated noise, whose state `noise` = (permutation key, NoiseState) the caller threads
  through the steps, returned in StepGrad.noise_state) and takes the gradient of the site
  objective f_i(w) = loss + (l2 / 2) ||w||^2 (the loss reported is `loss` alone): `loss` is the
  model.loss (losses.make(); None: cross-entropy), a per-example mean or FAR's batch loss.
  `rng` is the site's key for the round. `full_batch`: the exact mean over
  the site's examples (benchmarks/comm_skipping.py: deterministic gradients).
  site_count 0 is an empty slot (a padded place in a Poisson cohort): it trains on zeros,
  never on the examples its index row happens to point at (without example-level DP).
  """
  loss = loss or losses.make()
  loss_fn = functools.partial(_loss_fn, model, loss)

  def weighted_loss(params, ms, x, y, weights, rng):
    outputs, new_state = model.apply(params, ms, x, True, rng)
    return loss.batch(outputs, y, weights), new_state

  def plain(params, ms, site_idx, site_count, batch_rng, rng_t, t, data, positions=None):
    n_max = site_idx.shape[0]
    if full_batch:
      dtype = data.x.dtype
      weights = (jnp.arange(n_max) < site_count).astype(dtype) / site_count.astype(dtype)
      x, y = data.x[site_idx], data.y[site_idx]
      (loss, new_ms), grads = jax.value_and_grad(weighted_loss, has_aux=True)(
          params, ms, x, y, weights, rng_t)
      return StepGrad(loss, grads, new_ms, x, y, jnp.int32(0))
    pos = positions
    if pos is None:
      pos = minibatch_positions(batch_rng, t, jnp.maximum(site_count, 1), n_max, batch_size,
                                shuffle)
    rows = site_idx[pos]
    present = site_count > 0
    x = jnp.where(present, data.x[rows], 0).astype(data.x.dtype)
    y = jnp.where(present, data.y[rows], 0)
    (loss, new_ms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ms, x, y, rng_t)
    return StepGrad(loss, grads, new_ms, x, y, jnp.int32(0))

  def private(params, ms, site_idx, site_count, batch_rng, rng_t, t, data):
    """One DP-SGD gradient: Poisson sample, clipped per-example sum, noise, / expected size."""
    pos, mask, overflow = site_poisson_sample(jax.random.fold_in(batch_rng, t), site_count,
                                              batch_size, site_idx.shape[0], dp.max_batch)
    rows = site_idx[pos]
    x, y = data.x[rows], data.y[rows]
    grad_sum, _, losses = dp.clipped_grad_sum(params, x, y, mask, dp.clip_norm)
    noisy = privatize(grad_sum, dp.clip_norm, dp.noise_multiplier, jax.random.fold_in(rng_t, 1))
    divisor = example_dp_divisor(dp, batch_size, site_count)
    grads = jax.tree.map(lambda g: g / divisor, noisy)
    loss = (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return StepGrad(loss, grads, ms, x, y, overflow)

  def correlated(params, ms, site_idx, site_count, rng_t, data, noise):
    """One DP-SGD gradient with matrix-factorization noise: the fixed cyclic batch of the
    site's step noise.round (its steps over all rounds), clipped sum, + (C^{-1} w)_t."""
    perm_rng, state = noise
    pos = cyclic_batch(perm_rng, site_count, site_idx.shape[0], batch_size, state.round)
    rows = site_idx[pos]
    x, y = data.x[rows], data.y[rows]
    mask = jnp.ones((batch_size,), jnp.float32)
    grad_sum, _, losses = dp.clipped_grad_sum(params, x, y, mask, dp.clip_norm)
    z, state = dp.correlated.step(grad_sum, state, jax.random.fold_in(rng_t, 1),
                                  dp.noise_multiplier * dp.clip_norm)
    divisor = example_dp_divisor(dp, batch_size, site_count)
    grads = jax.tree.map(lambda g, n: (g + n) / divisor, grad_sum, z)
    return StepGrad(losses.mean(), grads, ms, x, y, jnp.int32(0), state)

  def grad(params, ms, site_idx, site_count, rng, t, data: FederatedData,
           positions=None, noise=None) -> StepGrad:
    batch_rng, step_rng = site_step_keys(rng)
    rng_t = jax.random.fold_in(step_rng, t)
    if dp is not None and dp.correlated is not None:
      out = correlated(params, ms, site_idx, site_count, rng_t, data, noise)
    elif positions is None:
      out = (plain if dp is None else private)(params, ms, site_idx, site_count, batch_rng,
                                               rng_t, t, data)
    else:
      out = plain(params, ms, site_idx, site_count, batch_rng, rng_t, t, data, positions)
    if l2:
      out = out._replace(grads=jax.tree.map(lambda g, w: g + l2 * w, out.grads, params))
    return out

  def schedule(site_idx, site_count, rng, num_steps: int):
    """[num_steps, batch_size] positions of steps 0 .. num_steps - 1, all drawn at once
    (`minibatch_schedule`); `grad(..., positions=schedule(...)[t])` is `grad(...)`."""
    return minibatch_schedule(site_step_keys(rng)[0], num_steps, jnp.maximum(site_count, 1),
                              site_idx.shape[0], batch_size, shuffle)

  if dp is None and shuffle and not full_batch:  # the one case a step's draw is costly
    grad.minibatch_schedule = schedule
  return grad


def site_step_keys(rng):
  """(batch_rng, step_rng): the minibatch stream and the per-step key of a site's round key."""
  return jax.random.split(rng)


def from_site_gradient(site_gradient: Callable) -> Callable:
  """A grad of make_site_gradient's signature from a site_gradient(params, site_idx,
  site_count, rng, step, data) -> (loss, grads[, overflow]) (algorithms/common.py; tests use
  exact gradients of a quadratic)."""
  def grad(params, ms, site_idx, site_count, rng, t, data, positions=None) -> StepGrad:
    kw = {} if positions is None else {"positions": positions}
    out = site_gradient(params, site_idx, site_count, rng, t, data, **kw)
    return StepGrad(out[0], out[1], ms, None, None, out[2] if len(out) == 3 else jnp.int32(0))
  if hasattr(site_gradient, "minibatch_schedule"):
    grad.minibatch_schedule = site_gradient.minibatch_schedule
  return grad


def prox_correction(mu: float) -> Callable:
  """FedProx (Li et al. 2020): the gradient of (mu / 2) ||w - w_global||^2 added."""
  def correct(grads, params, global_params, extra):
    return jax.tree.map(lambda g, w, w0: g + mu * (w - w0), grads, params, global_params)
  return correct


def site_num_steps(site_count, local_steps: int, local_epochs: float, batch_size: int):
  """The local steps a site takes: client.local_steps, or with client.local_epochs > 0
  ceil(local_epochs * n_i / batch_size) capped to [1, local_steps] (FedNova's tau_i;
  site sizes are public, as the sampling rates treat them)."""
  if not local_epochs:
    return jnp.int32(local_steps)
  steps = jnp.ceil(local_epochs * site_count / batch_size).astype(jnp.int32)
  return jnp.clip(steps, 1, local_steps)


def make_client_update(model: Model, client_tx: optax.GradientTransformationExtraArgs,
                       config: ClientConfig, dp: ExampleDP | None = None,
                       correction: Callable | None = None, l2: float = 0.0,
                       local_epochs: float = 0.0, loss: losses.Loss | None = None):
  """Returns client_update(params, model_state, site_idx, site_count, rng, data, extra=None)
  -> ClientOutput: `make_local_update` on `make_site_gradient` (with `dp`, every step a DP-SGD
  step on a Poisson minibatch), with FedProx's correction when config.prox_mu > 0 and the
  curvature objective (module docstring) for curvature client optimizers. `loss`: the
  model.loss (losses.make(); None: cross-entropy)."""
  loss = loss or losses.make()
  site_gradient = make_site_gradient(model, config.batch_size, config.shuffle, dp, l2, loss=loss)
  public_objective = make_public_objective(model, config.public_batch_size, loss)
  loss_fn = functools.partial(_loss_fn, model, loss)
  if correction is None and config.prox_mu:
    correction = prox_correction(config.prox_mu)

  def curvature_objective(ms, g: StepGrad, rng_t, public_rng, data: FederatedData):
    """The obj_fn of this step (see the module docstring): public rows, private rows or None."""
    if data.public_x is not None:
      return public_objective(ms, public_rng, rng_t, data)
    if dp is not None:
      return None  # Never the private batch under example-level DP.
    return lambda p: loss_fn(p, ms, g.x, g.y, rng_t)[0]

  return make_local_update(site_gradient, client_tx, config.local_steps, correction=correction,
                           curvature_objective=curvature_objective, batch_size=config.batch_size,
                           local_epochs=local_epochs, private=dp is not None)


def make_local_update(site_gradient: Callable, client_tx: optax.GradientTransformationExtraArgs,
                      local_steps: int, *, correction: Callable | None = None,
                      curvature_objective: Callable | None = None, batch_size: int = 1,
                      local_epochs: float = 0.0, private: bool = False):
  """THE client update of every server-coordinated algorithm: local steps as a lax.scan.

  Returns client_update(params, model_state, site_idx, site_count, rng, data, extra=None)
  -> ClientOutput. site_idx: [n_max] int32 row of the index table; site_count: int32 (0: an
  empty slot); rng: the site's key for this round (folded in with the round and site id by
  the caller). Each step takes `site_gradient` (make_site_gradient's signature), adds the
  algorithm's `correction(grads, params, global_params, extra)` (FedProx's prox term,
  SCAFFOLD's c - c_i; `extra` is what the site holds for it) and applies the client
  optimizer, handing it `curvature_objective(ms, step_grad, rng_t, public_rng, data)` as
  obj_fn. With `local_epochs` > 0 each site takes its own number of steps (`site_num_steps`,
  FedNova's tau_i; the scan runs local_steps and a site's later steps keep the carry).
  """

  schedule = getattr(site_gradient, "minibatch_schedule", None)

  def client_update(global_params, model_state, site_idx, site_count, rng, data: FederatedData,
                    extra=None, noise=None):
    step_rng = site_step_keys(rng)[1]
    public_rng = jax.random.fold_in(rng, _PUBLIC_STREAM)
    num_steps = site_num_steps(site_count, local_steps, local_epochs, batch_size)
    # Every step's minibatch positions drawn once before the scan where drawing them per step
    # costs (shuffled epochs): the same positions, see minibatch_schedule.
    positions = None if schedule is None else schedule(site_idx, site_count, rng, local_steps)

    def step(carry, xs):
      t, pos = xs
      params, opt_state, ms, noise_state = carry
      kw = {} if pos is None else {"positions": pos}
      if noise is not None:  # (the site's permutation key, its correlated-noise state)
        kw["noise"] = (noise[0], noise_state)
      g = site_gradient(params, ms, site_idx, site_count, rng, t, data, **kw)
      grads = g.grads
      if correction is not None:
        grads = correction(grads, params, global_params, extra)
      obj_fn = None
      if curvature_objective is not None:
        obj_fn = curvature_objective(ms, g, jax.random.fold_in(step_rng, t),
                                     jax.random.fold_in(public_rng, t), data)
      updates, new_opt_state = client_tx.update(grads, opt_state, params, obj_fn=obj_fn)
      new = (optax.apply_updates(params, updates), new_opt_state, g.model_state,
             noise_state if noise is None else g.noise_state)
      if local_epochs:  # this site's steps are done: keep the carry
        new = jax.tree.map(lambda a, b: jnp.where(t < num_steps, a, b), new, carry)
      return new, (g.loss, g.overflow)

    # The optimizer state is fresh every round; without a fresh probe key every site and every
    # round would draw the same Rademacher probes for its curvature estimates.
    opt_state = optim.reseed_probes(client_tx.init(global_params),
                                    jax.random.fold_in(rng, _PROBE_STREAM))
    init = (global_params, opt_state, model_state, None if noise is None else noise[1])
    (params, _, model_state, noise_state), (losses, overflow) = jax.lax.scan(
        step, init, (jnp.arange(local_steps), positions))
    delta = jax.tree.map(jnp.subtract, params, global_params)
    if local_epochs:
      active = jnp.arange(local_steps) < num_steps
      loss = jnp.where(active, losses, 0.0).sum() / num_steps
    else:
      loss = losses.mean()
    # Without DP the overflow is a constant 0, so no cross-device sum is compiled for it.
    return ClientOutput(delta=delta, model_state=model_state, train_loss=loss,
                        dp_overflow=overflow.sum() if private else jnp.int32(0),
                        num_steps=num_steps, noise_state=noise_state)

  return client_update
