r"""The shots study: LiRA TPR at low FPR vs examples per class (fedjax_lab/attacks/shots.py).

  python -m fedjax_lab.attacks.membership --config configs/mia_shots.py
  python -m fedjax_lab.attacks.membership --config configs/mia_shots.py \
      --config.target.data.name=pbmc68k --config.mia.shots="(1,2,4,8)" \
      --config.mia.extractor=pca --config.mia.min_class_count=40 --config.mia.feature_fraction=0.3

digits: 40% of the 1797 images train the frozen MLP extractor (64-128); heads on the rest
(>= 2S per class in the pool: S up to 32). 64 heads per (S, seed), 16 LOO targets, 3 seeds.
pbmc68k (765 genes): a PCA extractor (32 whitened components) fitted on 30% of the cells, the
6 cell types with >= 40 cells (S up to 8). benchmarks/mia_study.py runs both (32 heads, 2 seeds).
"""

import ml_collections

from fedjax_lab.attacks.membership import default_mia_config
from fedjax_lab.config import default_config


def get_config():
  c = ml_collections.ConfigDict()
  c.target = default_config()
  c.target.data.name = "digits"
  c.mia = default_mia_config()
  c.mia.threat = "shots"
  return c
