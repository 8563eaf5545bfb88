r"""DP-FTRL / matrix-factorization noise vs DP-FedAvg at equal epsilon against the server.

  python train.py --config configs/dp_ftrl.py --config.dp.mechanism=blt
  (or tree, banded, gaussian; :2 / :4 / :8 picks the server epsilon, default 4)
  python train.py --config configs/dp_ftrl.py:example --config.dp.mechanism=blt

:example  EXAMPLE-level DP-SGD with matrix-factorization noise (privacy/mechanism.py): 10 IID
digits sites of 150 examples, all in every round, 20 rounds of 5 local SGD steps (lr 0.5) on
a linear softmax model; each site permutes its examples once into k = 150 // 15 = 10 fixed
batches of 15 and step t trains batch t mod 10 (no sampling), so an example joins at most 10
of its site's 100 steps, 10 apart; each example's gradient clipped to 1; each site adds its
own dp.mechanism noise, correlated over all its 100 steps, calibrated to epsilon 4 (delta
1e-5, RDP) per example against the server that sees every update. Measured (seed 0, one run
each, 2 shared CPU cores, 25-45 s): dense 0.852, banded 0.838, blt 0.835, tree 0.690,
gaussian (independent noise on the same batches) 0.720.

Site-level DP on sklearn's digits: 100 IID sites, cohorts of 10 in turn (dp.participation=
cyclic: the sites are permuted once and cut into b = 10 groups; round r trains group r mod 10,
so a site takes part in at most k = 10 of the 100 rounds, exactly 10 apart), each site's
update clipped to 0.2, the server adding the dp.mechanism's noise to the sum. Every mechanism
is calibrated to the same epsilon (delta 1e-5, RDP) against whoever sees the released models,
INCLUDING the server that picks the cohorts: the run is one Gaussian mechanism of sensitivity
max ||C u|| over the allowed participations u (privacy/mechanism.py), nothing is amplified by
sampling, and the server's guarantee row says sampling_prob 1.0. dp.mechanism=gaussian here is
DP-FedAvg's independent noise through the same cyclic schedule (C = I, sensitivity sqrt(10)),
the baseline at equal server epsilon; with Poisson cohorts (dp.participation=poisson) its
headline epsilon would be amplified, but not against the server.

Model and learning rates, tuned modestly on gaussian at epsilon 4 (clip 1.0 / 0.3 / 0.2, 3 or
10 local steps): a linear softmax model (650 parameters: the noise is per coordinate), 10
local SGD steps of 5 examples at lr 0.5. The server optimizer is SGD with lr 1, i.e. FedAvg:
the model after round t is the initial model plus the prefix sum of the released (noised)
mean updates, which is the workload (prefix sums, A = lower-triangular ones) the tree / blt /
banded factorizations are optimized for; a server with momentum or Adam would be a different
workload (the factorization would then want A times the optimizer's matrix).

Measured (`python benchmarks/mf_noise.py --accuracy`, 2 shared CPU cores, 3 seeds, 100
rounds, ~8 s a run, 329 s for all 36; test accuracy, mean [min, max] over seeds 0-2):

  server epsilon  gaussian              tree                  blt                   banded (10)
  2               0.501 [0.404, 0.566]  0.314 [0.242, 0.374]  0.768 [0.714, 0.825]  0.798 [0.761, 0.842]
  4               0.795 [0.721, 0.838]  0.669 [0.599, 0.721]  0.903 [0.899, 0.909]  0.914 [0.902, 0.923]
  8               0.905 [0.892, 0.919]  0.884 [0.879, 0.889]  0.934 [0.933, 0.936]  0.933 [0.929, 0.936]

(the same run without DP, dp.level=none: 0.973, seed 0). blt and banded beat gaussian at every epsilon, by
the most where noise dominates (epsilon 2: +0.27 / +0.30); tree loses to gaussian. Sensitivity
under this participation (b = 10, k = 10): gaussian 3.16, tree 10.49, blt 5.35 (1 buffer),
banded 3.16 (10 bands = b: a site's rounds see orthogonal columns); root mean squared error
of the 100 prefix sums relative to gaussian's at equal epsilon: tree 0.83, blt 0.44, banded
0.42. Runtime of one run: ~10 s (gaussian, tree, banded), ~35 s for blt (its strategy is
optimized first, ~25 s; 66 s measured with another job on the cores).
"""

from fedjax_lab.config import default_config

EPSILONS = (2.0, 4.0, 8.0)


def _digits_blt(level, *, rounds, sites, cohort, local_steps, batch, epsilon):
  """Digits, iid sites, a linear model, blt noise on cyclic participation at `level`."""
  c = default_config()
  c.rounds = rounds
  c.data.name, c.data.partition = "digits", "iid"
  c.data.num_sites, c.cohort_size = sites, cohort
  c.model.name, c.model.hidden = "mlp", ()
  c.client.optimizer, c.client.lr = "sgd", 0.5
  c.client.local_steps, c.client.batch_size = local_steps, batch
  c.server.optimizer, c.server.lr = "sgd", 1.0
  c.dp.level, c.dp.mechanism, c.dp.participation = level, "blt", "cyclic"
  c.dp.target_epsilon, c.dp.delta = epsilon, 1e-5
  return c


def get_config(epsilon: str = "4"):
  if epsilon == "example":
    return example_config()
  eps = float(epsilon)
  if eps not in EPSILONS:
    raise ValueError(f"epsilon must be one of 2, 4, 8, got {epsilon!r}")
  c = _digits_blt("site", rounds=100, sites=100, cohort=10, local_steps=10, batch=5,
                  epsilon=eps)
  c.dp.clip_norm = 0.2
  c.dp.bands = 10
  c.checkpoint.every = 50
  return c


def example_config():
  """:example: example-level DP-SGD with matrix-factorization noise (module docstring)."""
  c = _digits_blt("example", rounds=20, sites=10, cohort=10, local_steps=5, batch=15,
                  epsilon=4.0)
  c.dp.clip_norm = 1.0
  c.dp.bands = 10
  c.checkpoint.every = 10
  return c
