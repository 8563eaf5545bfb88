"""The local update of ONE site: `lax.scan` over local steps. The caller vmaps it over sites.

Minibatches are drawn inside jit from the site's row of the index table. Positions are taken
modulo the site's real example count, so padding rows are never read and a site's training
depends only on its own examples, never on the padded width `n_max`: a site of 3 examples
and a site of 300 train exactly as they would alone.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.data.federated import FederatedData
from fedjax_lab.models import Model, cross_entropy


class ClientConfig(NamedTuple):
  local_steps: int
  batch_size: int
  shuffle: bool       # False: batches in stored order (the reference benchmark's setting)
  prox_mu: float      # FedProx proximal coefficient (Li et al. 2020); 0 is FedAvg


class ClientOutput(NamedTuple):
  delta: Any          # local params - global params, shaped like params
  model_state: Any    # the site's BatchNorm statistics after training ({} if none)
  train_loss: jax.Array  # mean minibatch loss over the local steps


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


def make_client_update(model: Model, client_tx: optax.GradientTransformationExtraArgs,
                       config: ClientConfig, grad_fn: Callable | None = None):
  """Returns client_update(params, model_state, site_idx, site_count, rng, data) -> ClientOutput.

  site_idx: [n_max] int32 row of the index table; site_count: int32; rng: the site's key for
  this round (folded in with the round and site id by the caller). `grad_fn(params,
  model_state, x, y, rng) -> (loss, grads, new_model_state)` replaces the plain minibatch
  gradient (differential privacy plugs in here); it must not add the proximal term.
  """

  def loss_fn(params, model_state, x, y, rng):
    logits, new_state = model.apply(params, model_state, x, True, rng)
    return cross_entropy(logits, y).mean(), new_state

  def plain_grad_fn(params, model_state, x, y, rng):
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, x, y, rng)
    return loss, grads, new_state

  gradient = grad_fn or plain_grad_fn

  def client_update(global_params, model_state, site_idx, site_count, rng, data: FederatedData):
    batch_rng, step_rng = jax.random.split(rng)
    n_max = site_idx.shape[0]

    def step(carry, t):
      params, opt_state, ms = carry
      pos = minibatch_positions(batch_rng, t, site_count, n_max, config.batch_size, config.shuffle)
      rows = site_idx[pos]
      x, y = data.x[rows], data.y[rows]
      rng_t = jax.random.fold_in(step_rng, t)
      loss, grads, new_ms = gradient(params, ms, x, y, rng_t)
      if config.prox_mu:
        grads = jax.tree.map(lambda g, w, w0: g + config.prox_mu * (w - w0),
                             grads, params, global_params)
      obj_fn = lambda p: loss_fn(p, ms, x, y, rng_t)[0]
      updates, opt_state = client_tx.update(grads, opt_state, params, obj_fn=obj_fn)
      return (optax.apply_updates(params, updates), opt_state, new_ms), loss

    init = (global_params, client_tx.init(global_params), model_state)
    (params, _, model_state), losses = jax.lax.scan(step, init, jnp.arange(config.local_steps))
    delta = jax.tree.map(jnp.subtract, params, global_params)
    return ClientOutput(delta=delta, model_state=model_state, train_loss=losses.mean())

  return client_update
