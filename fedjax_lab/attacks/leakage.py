r"""How much a gradient-inversion attack leaked: SSIM, PSNR and RDLV, and pictures of it.

Leakage: SSIM and PSNR (dm_pix; SSIM with a 5x5 window, sigma 1, since digits are 8x8: the
usual 11x11 window does not fit), and the Relative Data Leakage Value of the paper,
  RDLV(img) = max over reconstructions r of (SSIM(r, img) - SSIM(prior, img)) / SSIM(prior, img)
with the prior the mean image of public data (here the test split). Reconstructions of a
site with several images are matched one to one to its images (Hungarian, by SSIM).
(Hatamizadeh et al. 2022, arXiv 2202.06924; the attack: attacks/inversion_attack.py.)
"""

import math

import dm_pix
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


def ssim(a, b, window: int = 5, sigma: float = 1.0):
  """SSIM of images [..., H, W, C] in [0, 1] (dm_pix, Gaussian window)."""
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  lead = a.shape[:-3]
  flat = lambda z: z.reshape((-1, *z.shape[-3:]))
  return dm_pix.ssim(flat(a), flat(b), max_val=1.0, filter_size=window,
                     filter_sigma=sigma).reshape(lead)


def psnr(a, b):
  """PSNR in dB of images in [0, 1] (dm_pix)."""
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
  import matplotlib  # optional: pyplot is slow to import and only the pictures need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # optional: as above
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
