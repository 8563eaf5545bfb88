r"""Synthetic data: draw it, and judge it against the real data.

  python -m fedjax_lab.generative.evaluate --workdir runs/vae [--out runs/vae/eval]

* accuracy on the REAL test set of a classifier (an MLP) trained on synthetic data only,
  over `trials` trials (a fresh synthetic set and classifier seed each): mean +- std;
* the Frechet distance between real test examples and synthetic examples in the feature
  space (last hidden layer) of the same MLP trained on REAL training data
  (||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2)), as FID does with Inception);
* one PNG grid per class of decoded samples (images only), and one of all classes.
"""

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedjax_lab import checkpoint, runs
from fedjax_lab.data import sources
from fedjax_lab.generative import models


class Classifier(nn.Module):
  hidden: tuple
  num_classes: int

  @nn.compact
  def __call__(self, x, features: bool = False):
    h = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    return h if features else nn.Dense(self.num_classes)(h)


def balanced_labels(rng: np.random.Generator, num: int, num_classes: int) -> np.ndarray:
  """[num] labels, each class num // num_classes or one more times, in random order."""
  return rng.permutation(np.arange(num) % num_classes).astype(np.int32)


def synthesize(vae, dec_params, seed: int, num: int) -> tuple[np.ndarray, np.ndarray]:
  """A labelled synthetic set: balanced labels, z ~ N(0, I), the decoder's mean."""
  y = balanced_labels(np.random.default_rng(seed), num, vae.num_classes)
  x = jax.jit(vae.generate)(dec_params, jax.random.key(seed), jnp.asarray(y))
  x = np.asarray(x, np.float32).reshape((num, -1))
  return x, y


def train_classifier(x, y, num_classes, hidden, steps, seed, batch_size=128, lr=1e-3):
  """An MLP trained with Adam on (x, y); returns (module, params)."""
  model = Classifier(tuple(hidden), num_classes)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  key = jax.random.key(seed)
  params = model.init(key, x[:1])
  tx = optax.adam(lr)

  @jax.jit
  def fit(params):
    def step(carry, t):
      params, opt = carry
      rows = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, x.shape[0])
      loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
          model.apply(p, x[rows]), y[rows]).mean()
      grads = jax.grad(loss_fn)(params)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return params

  return model, fit(params)


def accuracy(model, params, x, y) -> float:
  logits = model.apply(params, jnp.asarray(x, jnp.float32))
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to feature sets a [N, d] and b [M, d]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): symmetric PSD, so eigh is exact
  # and stable where S_a is singular (dead ReLU features), unlike sqrtm of the product.
  sqrt_a = _psd_sqrt(cov_a)
  eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
  tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0, None))))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def _psd_sqrt(m):
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def evaluate(vae, dec_params, train, test, eval_config, seed: int) -> dict:
  """Synthetic-to-real accuracy over trials and the Frechet distance (a JSON-able dict)."""
  hidden, steps = tuple(eval_config.classifier_hidden), int(eval_config.classifier_steps)
  num = int(eval_config.num_synthetic)
  accs = []
  for trial in range(int(eval_config.trials)):
    xs, ys = synthesize(vae, dec_params, seed * 1000 + trial, num)
    model, params = train_classifier(xs, ys, vae.num_classes, hidden, steps, seed=trial)
    accs.append(accuracy(model, params, test.x, test.y))
  # The feature extractor: the same MLP trained on real training data.
  model, params = train_classifier(train.x, train.y, vae.num_classes, hidden, steps, seed=0)
  features = lambda x: np.asarray(model.apply(params, jnp.asarray(x, jnp.float32), True))
  xs, _ = synthesize(vae, dec_params, seed * 1000 + 999, max(num, len(test.x)))
  return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
          "accuracies": [float(a) for a in accs], "trials": len(accs),
          "real_trained_accuracy": accuracy(model, params, test.x, test.y),
          "frechet": frechet_distance(features(test.x), features(xs)),
          "frechet_real_train_vs_test": frechet_distance(features(test.x), features(train.x))}


def save_grids(vae, dec_params, out_dir: str, seed: int = 0, per_class: int = 64,
               class_names=()) -> list[str]:
  """PNG grids of decoded samples: grid_class_<k>.png per class and grid_all.png."""
  import matplotlib  # optional: pyplot is slow to import and only the grids need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # optional: as matplotlib above
  if len(vae.input_shape) == 1 and int(np.sqrt(vae.dim)) ** 2 != vae.dim:
    return []  # not images
  side = int(np.ceil(np.sqrt(per_class)))
  os.makedirs(out_dir, exist_ok=True)
  paths, rows = [], []
  for k in range(vae.num_classes):
    labels = jnp.full((per_class,), k, jnp.int32)
    x = np.asarray(vae.generate(dec_params, jax.random.fold_in(jax.random.key(seed), k),
                                labels))
    images = _as_images(x, vae)
    rows.append(images[:10])
    fig, axes = plt.subplots(side, side, figsize=(side, side))
    for ax, i in zip(axes.flat, range(side * side)):
      ax.axis("off")
      if i < per_class:
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
    name = class_names[k] if k < len(class_names) else str(k)
    fig.suptitle(f"class {name}")
    path = os.path.join(out_dir, f"grid_class_{k}.png")
    fig.savefig(path, dpi=60)
    plt.close(fig)
    paths.append(path)
  fig, axes = plt.subplots(vae.num_classes, 10, figsize=(10, vae.num_classes))
  for k, images in enumerate(rows):
    for j in range(10):
      axes[k, j].axis("off")
      axes[k, j].imshow(images[j], cmap="gray", vmin=0, vmax=1)
  path = os.path.join(out_dir, "grid_all.png")
  fig.savefig(path, dpi=60)
  plt.close(fig)
  return paths + [path]


def _as_images(x, vae):
  x = x.reshape((x.shape[0], -1))
  if vae.kind == "conv":
    h, w, c = vae.encoder.shape
  else:
    h = w = int(np.sqrt(vae.dim))
    c = 1
  x = x.reshape((x.shape[0], h, w, c))
  return x[..., 0] if c == 1 else x


def load_decoder(workdir: str):
  """(CVAE, decoder params, model.json dict) from a trained workdir's latest checkpoint."""
  with open(os.path.join(workdir, "model.json")) as f:
    info = json.load(f)
  vae = models.CVAE(ml_collections.ConfigDict(info["generative"]), info["num_classes"],
                    tuple(info["input_shape"]))
  state = checkpoint.read_state(workdir)
  dec = jax.tree.map(jnp.asarray, state["server"]["params"]["decoder"])
  return vae, dec, info


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None, help="folder for grids and eval.json "
                      "(default WORKDIR/eval)")
  args = parser.parse_args(argv)
  vae, dec, info = load_decoder(args.workdir)
  out = args.out or os.path.join(args.workdir, "eval")
  record = runs.read_run(args.workdir)
  config = _config_from_flat(record["config"])
  train, test = sources.load_dataset(config.data)
  result = evaluate(vae, dec, train, test, config.eval, config.seed)
  result["grids"] = save_grids(vae, dec, out, class_names=info["class_names"])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"synth_to_real_accuracy={result['accuracy_mean']:.4f}+-{result['accuracy_std']:.4f} "
        f"(real-trained {result['real_trained_accuracy']:.4f}) frechet={result['frechet']:.3f} "
        f"(real train vs test {result['frechet_real_train_vs_test']:.3f}) out={out}")


def _config_from_flat(flat: dict):
  nested = {}
  for key, value in flat.items():
    node = nested
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return ml_collections.ConfigDict(nested)


if __name__ == "__main__":
  from fedjax_lab import cli  # noqa: F401  (CPU devices before jax is used)
  main()
