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
model's convolutions run as im2col matmuls inside the attack (`conv_as_matmul`, attack.conv).

Leakage: SSIM and PSNR (dm_pix; SSIM with a 5x5 window, sigma 1, since digits are 8x8: the
usual 11x11 window does not fit), and the Relative Data Leakage Value of the paper,
  RDLV(img) = max over reconstructions r of (SSIM(r, img) - SSIM(prior, img)) / SSIM(prior, img)
with the prior the mean image of public data (here the test split). Reconstructions of a
site with several images are matched one to one to its images (Hungarian, by SSIM).

  python -m fedjax_lab.attacks.inversion --config configs/inversion_digits.py [--workdir W] [--out D]

attacks the updates a training run recorded (attack.record_sites / attack.record_rounds,
attacks/record.py) in W, or, without --workdir, a freshly simulated site; it writes
leakage.json and grid PNGs (originals above reconstructions) to --out (default
runs/inversion-<config>), and prints one line per site.
"""

import contextlib
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.models import Model
from fedjax_lab.privacy import randomness

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
      from fedjax_lab.errors import ConfigError
      raise ConfigError(f"attack.inversion.{k}", f"unknown key; allowed: {', '.join(DEFAULTS)}")
    out[k] = v
  for k, allowed in (("replay", ("unrolled", "gradient")), ("conv", ("matmul", "xla")),
                     ("labels", ("auto", "known", "optimize")), ("init", ("uniform", "prior"))):
    if out[k] not in allowed:
      from fedjax_lab.errors import ConfigError
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
  from fedjax_lab.client import minibatch_positions
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


def _conv_matmul(conv: nn.Conv, x):
  """nn.Conv's output on x [N, H, W, C] as im2col (kh kw shifted slices, concatenated on the
  channels in the kernel's (kh, kw, c) order) and one matmul; None where the convolution is
  not a plain one (stride, dilation, groups, mask or padding other than 'SAME')."""
  def ones(v):
    return v is None or all(s == 1 for s in (v if isinstance(v, (tuple, list)) else (v,)))
  if (x.ndim != 4 or conv.padding != "SAME" or not ones(conv.strides)
      or not ones(conv.input_dilation) or not ones(conv.kernel_dilation)
      or conv.feature_group_count != 1 or conv.mask is not None):
    return None
  kernel = conv.get_variable("params", "kernel")
  kh, kw, cin, cout = kernel.shape
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], -1)
  y = cols @ kernel.reshape(kh * kw * cin, cout)
  return y + conv.get_variable("params", "bias") if conv.use_bias else y


def _conv_interceptor(next_fun, args, kwargs, context):
  if context.method_name == "__call__" and isinstance(context.module, nn.Conv) and args:
    y = _conv_matmul(context.module, args[0])
    if y is not None:
      return y
  return next_fun(*args, **kwargs)


def conv_as_matmul():
  """A context in which the model's stride-1 'SAME' convolutions (flax nn.Conv) run as im2col
  + one matmul: the same function (up to float rounding), differentiated as slices and
  matmuls. The attack differentiates through the replay's weight gradient, so a vmapped
  restart or site axis makes both operands of those convolutions batched, which XLA lowers to
  grouped convolutions (slow on CPU); as matmuls they become batched matmuls. Also faster for
  one restart on CPU (benchmarks/RESULTS.md, issue 16)."""
  return nn.intercept_methods(_conv_interceptor)


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


# ----------------------------------------------------------------------------- leakage


def ssim(a, b, window: int = 5, sigma: float = 1.0):
  """SSIM of images [..., H, W, C] in [0, 1] (dm_pix, Gaussian window)."""
  import dm_pix
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  lead = a.shape[:-3]
  flat = lambda z: z.reshape((-1, *z.shape[-3:]))
  return dm_pix.ssim(flat(a), flat(b), max_val=1.0, filter_size=window,
                     filter_sigma=sigma).reshape(lead)


def psnr(a, b):
  """PSNR in dB of images in [0, 1] (dm_pix)."""
  import dm_pix
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  lead = a.shape[:-3]
  flat = lambda z: z.reshape((-1, *z.shape[-3:]))
  return dm_pix.psnr(flat(a), flat(b)).reshape(lead)


def leakage(recon, originals, prior, image_shape, window=5, sigma=1.0):
  """Per original image: SSIM/PSNR of its best reconstruction and its RDLV.

  recon [restarts, n, ...], originals [n, ...], prior [...] (one image). Within a restart the
  n reconstructions are matched one to one to the n originals (Hungarian, max total SSIM);
  each original then takes the max over restarts. Returns a dict of [n] arrays: ssim, psnr,
  prior_ssim, rdlv (max over restarts of (SSIM - prior SSIM) / prior SSIM).
  """
  from scipy.optimize import linear_sum_assignment
  R, n = recon.shape[:2]
  shape = tuple(image_shape)
  rec = jnp.asarray(recon).reshape((R, n, *shape))
  org = jnp.asarray(originals).reshape((n, *shape))
  pri = jnp.broadcast_to(jnp.asarray(prior).reshape(shape), org.shape)
  # [R, n_recon, n_orig]
  s = np.asarray(ssim(rec[:, :, None], jnp.broadcast_to(org[None, None], (R, n, n, *shape)),
                      window, sigma))
  p = np.asarray(psnr(rec[:, :, None], jnp.broadcast_to(org[None, None], (R, n, n, *shape))))
  best_s, best_p = np.full(n, -np.inf), np.full(n, -np.inf)
  for r in range(R):
    rows, cols = linear_sum_assignment(-s[r])
    best_s[cols] = np.maximum(best_s[cols], s[r, rows, cols])
    best_p[cols] = np.maximum(best_p[cols], p[r, rows, cols])
  prior_s = np.asarray(ssim(pri, org, window, sigma))
  return {"ssim": best_s, "psnr": best_p, "prior_ssim": prior_s,
          "rdlv": (best_s - prior_s) / prior_s}


def matched(recon, originals, image_shape, window=5, sigma=1.0):
  """[n, ...] the best reconstruction of each original (max SSIM over restarts, one to one)."""
  from scipy.optimize import linear_sum_assignment
  R, n = recon.shape[:2]
  rec = np.asarray(recon).reshape((R, n, *image_shape))
  org = np.asarray(originals).reshape((n, *image_shape))
  s = np.asarray(ssim(jnp.asarray(rec)[:, :, None],
                      jnp.broadcast_to(jnp.asarray(org)[None, None], (R, n, n, *image_shape)),
                      window, sigma))
  out, best = np.zeros_like(org), np.full(n, -np.inf)
  for r in range(R):
    rows, cols = linear_sum_assignment(-s[r])
    for i, j in zip(rows, cols):
      if s[r, i, j] > best[j]:
        best[j], out[j] = s[r, i, j], rec[r, i]
  return out


def save_grid(path, originals, reconstructions, image_shape, titles=None):
  """A PNG: each column one image, originals above their reconstructions (matplotlib Agg)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  org = np.asarray(originals).reshape((-1, *image_shape))
  rec = np.asarray(reconstructions).reshape((-1, *image_shape))
  n = org.shape[0]
  fig, axes = plt.subplots(2, n, figsize=(1.1 * n + 0.4, 2.5), squeeze=False)
  for j in range(n):
    for i, img in enumerate((org[j], rec[j])):
      ax = axes[i, j]
      ax.imshow(np.clip(img[..., 0] if img.shape[-1] == 1 else img, 0, 1), cmap="gray_r",
                vmin=0, vmax=1)
      ax.set_xticks([]), ax.set_yticks([])
      if titles is not None and i == 1:
        ax.set_xlabel(titles[j], fontsize=7)
  axes[0, 0].set_ylabel("original", fontsize=8)
  axes[1, 0].set_ylabel("recon", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def mean_ci(values, z: float = 1.96):
  """(mean, half-width of the normal 95% interval of the mean) of a 1-d sample."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float(v.mean()), float("nan")
  return float(v.mean()), float(z * v.std(ddof=1) / math.sqrt(v.size))


# ----------------------------------------------------------------------------- from a run


def local_for(exp, count: int) -> Local:
  """The local hyper-parameters of a site of `count` examples in Experiment `exp`."""
  from fedjax_lab.privacy.shares import example_dp_divisor
  from fedjax_lab.models.cnn import image_shape
  cfg = exp.config
  data_shape = tuple(exp.train.x.shape[1:])
  clip, divisor = None, 1.0
  if exp.example_dp is not None:  # the replay clips like DP-SGD (its noise is unknown)
    clip = cfg.dp.clip_norm
    divisor = float(example_dp_divisor(exp.example_dp, cfg.client.batch_size, float(count)))
  return Local(tx=exp.client_tx, lr=cfg.client.lr, local_steps=cfg.client.local_steps,
               num_images=count, image_shape=image_shape(cfg.model, data_shape),
               data_shape=data_shape, num_classes=exp.train.num_classes, clip_norm=clip,
               divisor=divisor)


def target_for(exp, rec: dict, reveal_bn: bool = True, known_labels: bool = False) -> Target:
  """The Target of a recorded (or simulated) update, attacks/record.py's dict."""
  cfg, n = exp.config, int(rec["count"])
  # Records from before rng_impl was saved hold threefry keys.
  rng = randomness.wrap_key_data(rec["rng"], rec.get("rng_impl", "threefry2x32"))
  positions = None
  if exp.example_dp is not None:  # Poisson batches: known only when every example joins
    positions = jnp.tile(jnp.arange(n), (cfg.client.local_steps, 1))
  labels = jnp.asarray(exp.train.y)[jnp.asarray(rec["rows"])] if known_labels else None
  return make_target(rec["global_params"], rec["global_model_state"], rec["delta"],
                     rec["model_state"], rng, n, cfg.client.batch_size, cfg.client.local_steps,
                     cfg.client.shuffle, labels=labels, reveal_bn=reveal_bn, positions=positions)


def attack_record(exp, rec: dict, cfg=None, key=None, reveal_bn=True):
  """Attacks one recorded update; returns (reconstructions [R, n, ...], leakage dict)."""
  cfg = attack_config(cfg if cfg is not None else exp.config.attack.inversion)
  local = local_for(exp, int(rec["count"]))
  target = target_for(exp, rec, reveal_bn=reveal_bn)
  key = jax.random.key(0) if key is None else key
  xs, _, _ = attack_sites(exp.model, local, cfg, stack([target]), key)
  originals = np.asarray(exp.train.x)[np.asarray(rec["rows"])]
  prior = np.asarray(exp.test.x).mean(0)
  return xs[0], leakage(xs[0], originals, prior, local.image_shape, cfg["ssim_window"],
                        cfg["ssim_sigma"])


def simulate(exp, round_number: int, site: int) -> dict:
  """A fresh site's update: train round_number - 1 rounds, then what `site` sends next."""
  from fedjax_lab.attacks import record
  state = exp.run_rounds(exp.init_state(), round_number - 1)
  return record.site_update(exp, state, round_number - 1, site)


def main(argv):
  """python -m fedjax_lab.attacks.inversion --config C [--workdir W] [--out D]"""
  import json
  import os
  from absl import flags
  from fedjax_lab import cli
  from fedjax_lab.attacks import record
  from fedjax_lab.experiment import Experiment
  from fedjax_lab.errors import ConfigError
  del argv
  cli.quiet_logs()
  config, path = cli.load_config(_CONFIG)
  name = os.path.splitext(os.path.basename(path))[0]
  try:
    cfg = attack_config(config.attack.inversion)
    exp = Experiment(config)  # validates the config and loads the data
  except ConfigError as e:
    cli.fail(str(e))
  out = cli.make_workdir(flags.FLAGS.out or os.path.join("runs", f"inversion-{name}"))
  workdir = flags.FLAGS.workdir
  if workdir:
    recs = [record.load(p) for p in record.list_records(workdir)]
    if not recs:
      cli.fail(f"--workdir: no recorded updates in {workdir}/{record.FOLDER}; train with "
               "--config.attack.record_sites=S, --config.attack.record_rounds=R,")
  else:  # a fresh site: the first listed site (or 0) at the first listed round (or the last)
    site = int(config.attack.record_sites[0]) if config.attack.record_sites else 0
    rnd = int(config.attack.record_rounds[0]) if config.attack.record_rounds else config.rounds
    recs = [simulate(exp, rnd, site)]
  results = []
  for rec in recs:
    xs, leak = attack_record(exp, rec, cfg)
    tag = f"round{int(rec['round'])}_site{int(rec['site'])}"
    originals = np.asarray(exp.train.x)[np.asarray(rec["rows"])]
    best = matched(xs, originals, local_for(exp, int(rec["count"])).image_shape,
                   cfg["ssim_window"], cfg["ssim_sigma"])
    save_grid(os.path.join(out, f"{tag}.png"), originals, best,
              local_for(exp, int(rec["count"])).image_shape,
              titles=[f"{s:.2f}" for s in leak["ssim"]])
    row = {"record": tag, **{k: [float(v) for v in leak[k]] for k in leak}}
    results.append(row)
    print(f"{tag}: images={int(rec['count'])} ssim={np.mean(leak['ssim']):.3f} "
          f"prior_ssim={np.mean(leak['prior_ssim']):.3f} psnr={np.mean(leak['psnr']):.1f} "
          f"rdlv={np.mean(leak['rdlv']):.2f} grid={os.path.join(out, tag + '.png')}")
  with open(os.path.join(out, "leakage.json"), "w") as f:
    json.dump({"attack": cfg, "results": results}, f, indent=2)


if __name__ == "__main__":
  from absl import app, flags as _flags
  from fedjax_lab import cli as _cli
  _CONFIG = _cli.define_config_flag(
      default=__import__("os").path.join(_cli.CONFIGS, "inversion_digits.py"))
  _flags.DEFINE_string("workdir", None, "A training workdir with recorded updates "
                       "(attack.record_sites); without it a fresh site is simulated.")
  _flags.DEFINE_string("out", None, "Output folder (default runs/inversion-<config>).")
  app.run(main, flags_parser=_cli.parse_flags)
