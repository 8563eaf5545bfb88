r"""Gradient inversion of one site's FedAvg update, with the BatchNorm statistics it reveals.

Hatamizadeh et al. 2022, "Do Gradient Inversion Attacks Make Federated Learning Unsafe?"
(arXiv 2202.06924; code: NVFlare research/quantifying-data-leakage, engine NVlabs/DeepInversion
FLGradientInversion). The server holds the global model w0 (and BatchNorm statistics r0) it
sent, a site's update Δ = w_T - w0 after T local steps (and, when BatchNorm statistics are
averaged, the site's statistics r_T), and the site's local hyper-parameters. It looks for
images x (and labels) whose replayed local training gives the same update:

  min_x  w_cos (1 - cos(Δ(x), Δ)) + w_l2 ||Δ(x) - Δ||^2 / ||Δ||^2         update matching
       + w_bn Σ_l ||μ_l(x) - μ*_l|| + ||σ²_l(x) - σ*²_l||                     BatchNorm prior
       + w_tv TV(x) + w_x ||x||^2 / size(x)                                  image priors

Δ(x) ("replay=unrolled") runs the site's T local optimizer steps on x differentiably (the
lab's model.apply and client optimizer under jax.grad inside lax.scan, the minibatch schedule
of client.minibatch_positions drawn with the site's key, i.e. a server that knows the
schedule), so a multi-step update is inverted as the update it is; "replay=gradient" is the
paper's approximation: one gradient at w0 on all images, scaled by -lr T.

μ*, σ*² are the per-layer batch statistics the update reveals. The lab's BatchNorm keeps
r <- mom r + (1 - mom) stat (flax momentum mom = 0.9, models/norm.py), so after T steps
r_T = mom^T r0 + (1 - mom^T) stat if the statistics stayed the same:
  x* = (r_T - mom^T r0) / (1 - mom^T)
(T = 1: the paper's x* = (r_new - (1 - m) r_global) / m with m = 1 - mom); μ(x), σ²(x) are the
statistics of the candidate images at w0. Labels: "analytic" for one image (the label is
the only coordinate of the last layer's bias update that is positive: Δb = -lr Σ_t (p_t -
e_y)), "known", or "optimize" (soft labels optimised jointly). Adam with a cosine schedule,
pixels projected on [0, 1] after every step; restarts and sites are vmapped axes; the
model's convolutions run as im2col matmuls inside the attack (`conv_as_matmul` of
attacks/conv_matmul.py, attack.conv).

How well the reconstructions match the site's images: attacks/leakage.py. The attack of a
recorded training run and its command: attacks/inversion.py, which re-exports this module.
"""

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.attacks.conv_matmul import conv_as_matmul
from fedjax_lab.client import minibatch_positions
from fedjax_lab.errors import ConfigError
from fedjax_lab.models import Model

BN_MOMENTUM = 0.9  # flax momentum of the lab's BatchNorm (models/norm.py): weight of the old value

# The attack's hyper-parameters (config block attack.inversion; every key optional).
DEFAULTS = dict(
    iterations=400,     # Adam steps
    lr=0.1,             # Adam's peak learning rate (cosine decay to 0)
    restarts=4,         # independent random initialisations (a vmapped axis)
    replay="unrolled",  # "unrolled": T local steps; "gradient": the paper's one-gradient proxy
    cos_weight=1.0,     # 1 - cosine(update(x), update)
    l2_weight=0.0,      # ||update(x) - update||^2 / ||update||^2
    bn_weight=0.01,     # BatchNorm prior (0 or no statistics: off)
    tv_weight=1e-3,     # anisotropic total variation, mean |neighbour differences|
    x_weight=1e-4,      # mean x^2
    labels="auto",      # "auto": analytic for one image, else optimize; "known"; "optimize"
    init="uniform",     # "uniform" noise in [0, 1], or "prior" (the prior image + noise)
    ssim_window=5,      # SSIM window (dm_pix filter_size) and its Gaussian sigma
    ssim_sigma=1.0,
    conv="matmul",      # "matmul": the model's stride-1 convolutions as im2col + one matmul
                        # inside the attack (conv_as_matmul); "xla": XLA's convolution
)


def attack_config(overrides=None) -> dict:
  """DEFAULTS updated with `overrides` (a dict or ConfigDict); unknown keys are refused."""
  out = dict(DEFAULTS)
  for k, v in dict(overrides or {}).items():
    if k not in DEFAULTS:
      raise ConfigError(f"attack.inversion.{k}", f"unknown key; allowed: {', '.join(DEFAULTS)}")
    out[k] = v
  for k, allowed in (("replay", ("unrolled", "gradient")), ("conv", ("matmul", "xla")),
                     ("labels", ("auto", "known", "optimize")), ("init", ("uniform", "prior"))):
    if out[k] not in allowed:
      raise ConfigError(f"attack.inversion.{k}", f"unknown '{out[k]}'; allowed: "
                        f"{', '.join(allowed)}")
  return out


class Target(NamedTuple):
  """What the server holds about one site's update (a pytree; stack for several sites).

  positions: [T, B] which of the site's n images each local step used (the schedule the
  replay follows); labels: [n] int32 (known or analytic), or -1 where unknown.
  """
  params: Any            # the global model the site started from
  model_state: Any       # the global BatchNorm statistics ({} if none)
  delta: Any             # the site's update, w_T - w0
  site_model_state: Any  # the site's statistics after training ({} if none or not revealed)
  positions: jax.Array
  rng: jax.Array         # the site's key (dropout keys of the replay, as client.py folds them)
  labels: jax.Array


class Local(NamedTuple):
  """The site's local hyper-parameters and the replay's static shapes."""
  tx: Any                # the client optimizer (optax), e.g. optax.sgd(lr)
  lr: float              # its learning rate (replay=gradient scales by -lr T)
  local_steps: int
  num_images: int        # n, the site's images
  image_shape: tuple     # (H, W, C) for the priors; the data keep their own shape
  data_shape: tuple      # one example as the model takes it, e.g. (64,)
  num_classes: int
  clip_norm: float | None = None  # DP-SGD replay: clip each example's gradient to this
  divisor: float = 1.0            # ... and divide the clipped sum by this


def schedule(rng, n: int, batch_size: int, local_steps: int, shuffle: bool = True):
  """[T, B] positions of the site's images, exactly as client.make_client_update draws them."""
  batch_rng, _ = jax.random.split(rng)
  return jax.vmap(lambda t: minibatch_positions(batch_rng, t, n, n, batch_size, shuffle))(
      jnp.arange(local_steps))


def soft_cross_entropy(logits, q):
  return -(q * jax.nn.log_softmax(logits)).sum(-1)


def replay(model: Model, local: Local, params, model_state, x, q, positions, rng):
  """The site's local training on images x [n, ...] with label distributions q [n, C].

  Returns (delta, model_state): client.make_client_update's result for these images (without
  DP: equal to it up to float rounding, tests/test_inversion.py), differentiable in x and q.
  """
  _, step_rng = jax.random.split(rng)

  def step(carry, inp):
    p, opt_state, ms = carry
    t, pos = inp
    xb, qb = x[pos], q[pos]
    rng_t = jax.random.fold_in(step_rng, t)
    if local.clip_norm is None:
      def loss(p):
        logits, new_ms = model.apply(p, ms, xb, True, rng_t)
        return soft_cross_entropy(logits, qb).mean(), new_ms
      grads, new_ms = jax.grad(loss, has_aux=True)(p)
    else:  # DP-SGD without its noise: per-example gradients clipped, summed, / divisor
      def one(xi, qi):
        g = jax.grad(lambda p: soft_cross_entropy(
            model.apply(p, ms, xi[None], False, rng_t)[0], qi[None]).sum())(p)
        norm = optax.global_norm(g)
        return jax.tree.map(lambda a: a * jnp.minimum(1.0, local.clip_norm / (norm + 1e-12)), g)
      grads = jax.tree.map(lambda a: a.sum(0) / local.divisor, jax.vmap(one)(xb, qb))
      new_ms = ms
    updates, opt_state = local.tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state, new_ms), None

  init = (params, local.tx.init(params), model_state)
  (p, _, ms), _ = jax.lax.scan(step, init, (jnp.arange(positions.shape[0]), positions))
  return jax.tree.map(jnp.subtract, p, params), ms


def gradient_proxy(model: Model, local: Local, params, model_state, x, q, rng):
  """The paper's proxy of the update: -lr T x the gradient at w0 on all n images."""
  def loss(p):
    logits, _ = model.apply(p, model_state, x, True, rng)
    return soft_cross_entropy(logits, q).mean()
  g = jax.grad(loss)(params)
  return jax.tree.map(lambda a: -local.lr * local.local_steps * a, g)


def revealed_batch_stats(global_ms, site_ms, local_steps: int, momentum: float = BN_MOMENTUM):
  """x* = (r_T - mom^T r0) / (1 - mom^T): the batch statistics the site's BN statistics reveal."""
  decay = momentum ** local_steps
  return jax.tree.map(lambda r0, rt: (rt - decay * r0) / (1 - decay), global_ms, site_ms)


def batch_stats(model: Model, params, model_state, x, momentum: float = BN_MOMENTUM):
  """The per-layer batch statistics (mean, biased var) of images x at the model (same tree)."""
  _, new = model.apply(params, model_state, x, True, None)
  return jax.tree.map(lambda r0, r1: (r1 - momentum * r0) / (1 - momentum), model_state, new)


def _flat(tree):
  return jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])


def match_loss(update, target, cos_weight, l2_weight):
  u, d = _flat(update), _flat(target)
  cos = jnp.dot(u, d) / (jnp.linalg.norm(u) * jnp.linalg.norm(d) + 1e-12)
  l2 = jnp.sum((u - d) ** 2) / (jnp.sum(d ** 2) + 1e-12)
  return cos_weight * (1.0 - cos) + l2_weight * l2


def total_variation(img):
  """Mean absolute difference of vertical and horizontal neighbours, img [n, H, W, C]."""
  return (jnp.abs(jnp.diff(img, axis=1)).mean() + jnp.abs(jnp.diff(img, axis=2)).mean())


def analytic_label(delta) -> jax.Array:
  """The label of a one-image site: argmax of the last Dense layer's bias update.

  Every local step moves that bias by -lr (p - e_y): only the label's coordinate grows.
  """
  dense = sorted((k for k in delta if k.startswith("Dense_")), key=lambda k: int(k[6:]))
  return jnp.argmax(delta[dense[-1]]["bias"]).astype(jnp.int32)


def analytic_first_layer(kernel_update, bias_update):
  """The input of a one-example step through a first fully connected layer, in closed form.

  dL/dW = x ⊗ dL/db for y = x W + b, so every unit i with dL/db_i != 0 gives x = dW[:, i] /
  db_i (Phong et al. 2017); the least-squares combination over all units is returned. Exact
  for one SGD step on one example (any lr); kernel [d_in, units], bias [units].
  """
  return kernel_update @ bias_update / jnp.sum(bias_update ** 2)

def make_attack(model: Model, local: Local, cfg: dict, prior_image=None):
  """Returns attack(target, key) -> (x [n, ...], label_probs [n, C], losses [iterations]).

  One site and one restart; vmap it over restarts (keys) and sites (stacked targets), as
  `attack_sites` does.
  """
  cfg = attack_config(cfg)
  n, C = local.num_images, local.num_classes
  schedule_fn = optax.cosine_decay_schedule(cfg["lr"], cfg["iterations"])
  opt = optax.adam(schedule_fn)
  labels_mode = cfg["labels"]
  if labels_mode == "auto":
    labels_mode = "known" if n == 1 else "optimize"  # n == 1: analytic label, given as known

  def to_image(x):
    return x.reshape((x.shape[0], *local.image_shape))

  def objective(variables, target: Target):
    with conv_as_matmul() if cfg["conv"] == "matmul" else contextlib.nullcontext():
      return _objective(variables, target)

  def _objective(variables, target: Target):
    x, label_logits = variables
    q = (jax.nn.one_hot(target.labels, C) if labels_mode == "known"
         else jax.nn.softmax(label_logits))
    if cfg["replay"] == "unrolled":
      update, _ = replay(model, local, target.params, target.model_state, x, q,
                         target.positions, target.rng)
    else:
      update = gradient_proxy(model, local, target.params, target.model_state, x, q,
                              target.rng)
    loss = match_loss(update, target.delta, cfg["cos_weight"], cfg["l2_weight"])
    if cfg["bn_weight"] and jax.tree.leaves(target.site_model_state):
      star = revealed_batch_stats(target.model_state, target.site_model_state,
                                  local.local_steps)
      stats = batch_stats(model, target.params, target.model_state, x)
      loss += cfg["bn_weight"] * sum(
          jnp.linalg.norm(a - b) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(star)))
    img = to_image(x)
    loss += cfg["tv_weight"] * total_variation(img) + cfg["x_weight"] * jnp.mean(x ** 2)
    return loss

  def attack(target: Target, key):
    k1, k2 = jax.random.split(key)
    x0 = jax.random.uniform(k1, (n, *local.data_shape))
    if cfg["init"] == "prior" and prior_image is not None:
      x0 = jnp.clip(jnp.asarray(prior_image).reshape(local.data_shape)
                    + 0.1 * jax.random.normal(k1, x0.shape), 0, 1)
    variables = (x0, 0.01 * jax.random.normal(k2, (n, C)))
    opt_state = opt.init(variables)

    def step(carry, _):
      variables, opt_state = carry
      loss, grads = jax.value_and_grad(objective)(variables, target)
      updates, opt_state = opt.update(grads, opt_state, variables)
      x, lab = optax.apply_updates(variables, updates)
      return ((jnp.clip(x, 0.0, 1.0), lab), opt_state), loss

    ((x, lab), _), losses = jax.lax.scan(step, (variables, opt_state), None,
                                         length=cfg["iterations"])
    probs = (jax.nn.one_hot(target.labels, C) if labels_mode == "known"
             else jax.nn.softmax(lab))
    return x, probs, losses

  return attack


def attack_sites(model: Model, local: Local, cfg: dict, targets: Target, key):
  """Every stacked site x cfg['restarts'] restarts in one jitted vmap.

  Returns (x [sites, restarts, n, ...], label_probs [sites, restarts, n, C],
  losses [sites, restarts, iterations]).
  """
  cfg = attack_config(cfg)
  attack = make_attack(model, local, cfg)
  sites = jax.tree.leaves(targets.positions)[0].shape[0]
  keys = jax.random.split(key, sites * cfg["restarts"]).reshape(sites, cfg["restarts"])
  run = jax.jit(jax.vmap(jax.vmap(attack, in_axes=(None, 0)), in_axes=(0, 0)))
  return run(targets, keys)


def make_target(params, model_state, delta, site_model_state, rng, n, batch_size, local_steps,
                shuffle=True, labels=None, reveal_bn=True, positions=None) -> Target:
  """A Target; labels None: analytic for one image, else unknown (-1)."""
  if labels is None:
    labels = (analytic_label(delta)[None] if n == 1 else -jnp.ones((n,), jnp.int32))
  if positions is None:
    positions = schedule(rng, n, batch_size, local_steps, shuffle)
  return Target(params=params, model_state=model_state, delta=delta,
                site_model_state=site_model_state if reveal_bn else {},
                positions=positions, rng=rng, labels=jnp.asarray(labels, jnp.int32))


def stack(targets):
  """Stacks Targets of several sites along a new leading axis (same structure and shapes)."""
  return jax.tree.map(lambda *a: jnp.stack(a), *targets)
