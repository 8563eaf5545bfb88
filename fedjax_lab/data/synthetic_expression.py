"""`data.name=synthetic_expression`: negative-binomial single-cell counts with batch effects
(the model and its cost: `ExpressionModel`, the `sources` module docstring)."""

import concurrent.futures
import dataclasses
import os

import numpy as np

from fedjax_lab.data.dataset import Dataset, stratified_split
from fedjax_lab.errors import ConfigError

SYNTHETIC_DTYPES = ("float32", "float16")
# Cells per independently seeded chunk of synthetic counts: fixed, so that a cell's counts do
# not depend on how many threads generated them.
_SYNTHETIC_CHUNK_CELLS = 2048


@dataclasses.dataclass(frozen=True, eq=False)
class ExpressionModel:
  """Gamma-Poisson (negative-binomial) single-cell counts with batch effects and cell types.

  For cell i of type t_i in batch b_i and gene g, with mean

    mu_ig = base_mean_g * exp(signal * marker[t_i, g] + batch_log_effect[b_i, g]),

  counts_ig ~ Poisson(lambda_ig), lambda_ig ~ Gamma(shape=1/phi, scale=mu_ig * phi), so
  counts_ig ~ NB with E = mu_ig and Var = mu_ig + phi * mu_ig^2 (phi = `dispersion`;
  phi = 0 is Poisson). log base_mean_g ~ N(-1, 1) (mean ~0.6 counts per gene, so ~1,200
  per cell at 2,000 genes, like 10x data); each cell type has max(1, G // (4 T)) marker genes;
  batch_log_effect ~ N(0, batch_effect^2) per batch and gene.

  Attributes:
    base_mean: [G] mean count of each gene without signal or batch effect.
    marker: [T, G] 1.0 where gene g is a marker of cell type t, else 0.0.
    batch_log_effect: [B, G] additive log-scale effect of each batch on each gene.
    signal: log-scale up-regulation of marker genes.
    dispersion: phi of the NB.
  """
  base_mean: np.ndarray
  marker: np.ndarray
  batch_log_effect: np.ndarray
  signal: float
  dispersion: float

  def mean(self, cell_type: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """[n] cell types, [n] batches -> [n, G] float32 NB means mu."""
    log_mu = (np.log(self.base_mean).astype(np.float32)[None]
              + np.float32(self.signal) * self.marker[cell_type]
              + self.batch_log_effect[batch])
    return np.exp(log_mu, out=log_mu)

  def sample_counts(self, cell_type: np.ndarray, batch: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """[n] cell types, [n] batches -> [n, G] int64 NB counts."""
    rate = self.mean(cell_type, batch)
    if self.dispersion > 0:
      shape = 1.0 / self.dispersion
      # Scalar-shape float32 gamma is ~2x faster than passing the [n, G] scale to numpy.
      rate *= rng.standard_gamma(shape, size=rate.shape, dtype=np.float32)
      rate *= np.float32(self.dispersion)
    return rng.poisson(rate)


def expression_model(synthetic_config) -> ExpressionModel:
  """The per-gene parameters of `data.synthetic`, drawn from default_rng([seed, 0])."""
  c = synthetic_config
  rng = np.random.default_rng([c.seed, 0])
  base_mean = np.exp(rng.normal(-1.0, 1.0, size=c.num_genes))
  num_markers = max(1, c.num_genes // (4 * c.num_cell_types))
  marker = np.zeros((c.num_cell_types, c.num_genes), np.float32)
  for t in range(c.num_cell_types):
    marker[t, rng.choice(c.num_genes, size=num_markers, replace=False)] = 1.0
  batch_log_effect = rng.normal(0.0, c.batch_effect, size=(c.num_batches, c.num_genes))
  return ExpressionModel(base_mean=base_mean, marker=marker,
                         batch_log_effect=batch_log_effect.astype(np.float32),
                         signal=float(c.signal), dispersion=float(c.dispersion))


def synthetic_cells(synthetic_config) -> tuple[np.ndarray, np.ndarray]:
  """([N] int32 cell types, [N] int32 batches), uniform and independent, default_rng([seed, 1])."""
  c = synthetic_config
  rng = np.random.default_rng([c.seed, 1])
  cell_type = rng.integers(0, c.num_cell_types, size=c.num_cells, dtype=np.int32)
  batch = rng.integers(0, c.num_batches, size=c.num_cells, dtype=np.int32)
  return cell_type, batch


def _chunk_counts(model: ExpressionModel, synthetic_config, cell_type, batch, chunk: int):
  """Counts of cells [chunk * C, (chunk + 1) * C): [<=C, G] int64, seeded by the chunk alone."""
  rows = slice(chunk * _SYNTHETIC_CHUNK_CELLS, (chunk + 1) * _SYNTHETIC_CHUNK_CELLS)
  rng = np.random.default_rng([synthetic_config.seed, 2, chunk])
  return model.sample_counts(cell_type[rows], batch[rows], rng)


def synthetic_counts(synthetic_config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The raw counts behind `synthetic_expression` (small configs: returns [N, G] int64).

  Returns:
    (counts [N, G] int64, cell_type [N] int32, batch [N] int32), cells in generation order;
    `log_normalize(counts)` are the features `load_dataset` splits into train and test.
  """
  _check_synthetic(synthetic_config)
  model = expression_model(synthetic_config)
  cell_type, batch = synthetic_cells(synthetic_config)
  num_chunks = -(-synthetic_config.num_cells // _SYNTHETIC_CHUNK_CELLS)
  counts = [_chunk_counts(model, synthetic_config, cell_type, batch, k)
            for k in range(num_chunks)]
  return np.concatenate(counts), cell_type, batch


def log_normalize(counts: np.ndarray, dtype=np.float32) -> np.ndarray:
  """[n, G] counts -> [n, G] log1p(counts / library size * 1e4), the usual scRNA-seq transform."""
  library = np.maximum(counts.sum(axis=1, keepdims=True), 1).astype(np.float32)
  x = counts.astype(np.float32)
  x *= np.float32(1e4) / library
  return np.log1p(x, out=x).astype(dtype, copy=False)


def _check_synthetic(c) -> None:
  for key in ("num_cells", "num_genes", "num_cell_types", "num_batches"):
    if int(c[key]) != c[key] or c[key] < 1:
      raise ConfigError(f"data.synthetic.{key}", f"must be a positive integer, got {c[key]}")
  if c.num_cells < 2:
    raise ConfigError("data.synthetic.num_cells", f"must be >= 2 (train and test), got "
                      f"{c.num_cells}")
  for key in ("batch_effect", "dispersion", "signal"):
    if c[key] < 0:
      raise ConfigError(f"data.synthetic.{key}", f"must be >= 0, got {c[key]}")
  if c.dtype not in SYNTHETIC_DTYPES:
    raise ConfigError("data.synthetic.dtype", f"unknown '{c.dtype}'; allowed: "
                      f"{', '.join(SYNTHETIC_DTYPES)}")


def load(data_config) -> tuple[Dataset, Dataset]:
  c = data_config.synthetic
  _check_synthetic(c)
  model = expression_model(c)
  cell_type, batch = synthetic_cells(c)
  train_idx, test_idx = stratified_split(cell_type, data_config.test_fraction,
                                         data_config.split_seed)
  # Train rows first, then test: both splits are views of ONE array, so a 1e6 x 2000 data set
  # is never copied. Chunks are generated in cell order and scattered to their split rows.
  position = np.empty(c.num_cells, np.int64)
  position[np.concatenate([train_idx, test_idx])] = np.arange(c.num_cells)
  x = np.empty((c.num_cells, c.num_genes), np.dtype(c.dtype))

  def fill(chunk):
    counts = _chunk_counts(model, c, cell_type, batch, chunk)
    rows = np.arange(chunk * _SYNTHETIC_CHUNK_CELLS,
                     chunk * _SYNTHETIC_CHUNK_CELLS + len(counts))
    x[position[rows]] = log_normalize(counts, x.dtype)

  num_chunks = -(-c.num_cells // _SYNTHETIC_CHUNK_CELLS)
  # NumPy's samplers release the GIL, so threads scale; chunk seeds make it thread-count-free.
  with concurrent.futures.ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
    list(pool.map(fill, range(num_chunks)))
  n_train = len(train_idx)
  names = tuple(f"type_{t}" for t in range(c.num_cell_types))
  make = lambda rows, idx: Dataset(
      x=x[rows], y=cell_type[idx], num_classes=int(c.num_cell_types),
      columns={"batch": batch[idx]}, name="synthetic_expression", class_names=names)
  return make(slice(0, n_train), train_idx), make(slice(n_train, None), test_idx)

