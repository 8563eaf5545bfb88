r"""Communication-skipping comparison: FedAvg, SCAFFOLD, ProxSkip (p = 0.1, 0.2, 0.5, 1),
RandCom and D-SGD (ring, torus), in rounds and in bytes, on two heterogeneous problems.

  python train.py --config configs/compare_comm.py:digits,proxskip_p0.2
      # workdir runs/compare_comm-digits_proxskip_p0.2-<hash>: each variant its own
  python benchmarks/plot_comparison.py   # all 20 runs, then runs/benchmarks/compare/compare_*.png

The argument is `<problem>,<variant>`:
  problems  digits    MLP 64-128-10 on sklearn's digits
            logistic  l2-regularized multinomial logistic regression (model "linear",
                      model.l2 = 0.01) on the same digits: strongly convex, one optimum
  variants  fedavg, scaffold, proxskip_p0.1, proxskip_p0.2, proxskip_p0.5, proxskip_p1,
            randcom_ring, randcom_torus (p = 0.2), dsgd_ring, dsgd_torus (gossip every step)

Shared by all: 16 sites with Dirichlet(0.1) label skew (most sites hold 1-3 classes); every
site in every round; uniform site weights, i.e. the objective (1/S) sum_i f_i that ProxSkip,
RandCom and D-SGD minimize; a round is 10 local SGD steps (batch 10, lr 0.1), the same
computation for every variant, so rounds measure computation and bytes_total measures
communication. Messages per round (model = 9,610 floats for the MLP, 650 for the linear):
FedAvg 32, SCAFFOLD 64 (controls travel too), ProxSkip 32 per communicating step (10 p
expected a round), RandCom / D-SGD sum of degrees per gossip (ring 32, 4 x 4 torus 64).

Expected on a 2-core CPU: ~12 s a run with start-up (150 rounds). Final test accuracy on
digits: FedAvg 0.966, SCAFFOLD 0.983, ProxSkip 0.973-0.980 (184 MB sent by FedAvg, 196 MB by
ProxSkip p = 0.1, 1845 MB by p = 1), RandCom 0.976; on logistic: FedAvg 0.916 (test loss
0.591: client drift), every corrected method 0.943 (test loss 0.425-0.428), D-SGD ring 0.926.
Full tables and plots: benchmarks/RESULTS.md, benchmarks/plots/compare_*.png (committed).
"""

from fedjax_lab.config import default_config

PROBLEMS = ("digits", "logistic")
VARIANTS = ("fedavg", "scaffold", "proxskip_p0.1", "proxskip_p0.2", "proxskip_p0.5",
            "proxskip_p1", "randcom_ring", "randcom_torus", "dsgd_ring", "dsgd_torus")
RANDCOM_PROB = 0.2


def get_config(arg: str = "digits,proxskip_p0.2"):
  problem, variant = arg.split(",")
  if problem not in PROBLEMS or variant not in VARIANTS:
    raise ValueError(f"--config compare_comm.py:<problem>,<variant> with problem in {PROBLEMS}"
                     f" and variant in {VARIANTS}; got '{arg}'")
  c = default_config()
  c.rounds = 150
  c.data.name, c.data.num_sites = "digits", 16
  c.data.partition, c.data.alpha = "dirichlet", 0.1
  c.cohort_size = 16
  if problem == "digits":
    c.model.name, c.model.hidden = "mlp", (128,)
  else:
    c.model.name, c.model.l2 = "linear", 0.01
  c.client.optimizer, c.client.lr = "sgd", 0.1
  c.client.local_steps, c.client.batch_size = 10, 10
  c.server.optimizer, c.server.lr, c.server.weighting = "sgd", 1.0, "uniform"
  c.checkpoint.every = 50

  name, _, option = variant.partition("_")
  c.algorithm.name = name
  if name == "proxskip":
    c.algorithm.comm_schedule, c.algorithm.comm_prob = "bernoulli", float(option[1:])
  elif name == "randcom":
    c.algorithm.topology = option
    c.algorithm.comm_schedule, c.algorithm.comm_prob = "bernoulli", RANDCOM_PROB
  elif name == "dsgd":
    c.algorithm.topology = option
    c.algorithm.comm_schedule, c.algorithm.comm_every = "every_k", 1
  return c
