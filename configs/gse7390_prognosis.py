r"""Breast-cancer prognosis on GSE7390: distant metastasis within 5 years, federated vs central.

  python train.py --config configs/gse7390_prognosis.py          # logistic regression
  python train.py --config configs/gse7390_prognosis.py:mlp      # MLP 81-32-2

Data (fedjax_lab/data/gse7390.py): 198 tumours (Desmedt et al. 2007), 76 genes + age, size,
grade, ER; tumours censored before 5 years are excluded (the log says how many: 9), leaving
189 (35 positive); 30% stratified test split (57 tumours, 11 positive), features standardised
with the training examples' mean/std. 3 sites (IID), all sites every round, FedAvg. The run
also trains the same model on one site holding all the training data (eval.centralized_baseline)
and prints both AUCs with 95% bootstrap intervals over the test tumours (eval.bootstrap).
"""

from fedjax_lab.config import default_config


def get_config(arg: str = "lr"):
  c = default_config()
  c.rounds = 40
  c.cohort_size = 3
  c.data.name = "gse7390"
  c.data.test_fraction = 0.3
  c.data.num_sites = 3
  c.data.partition = "iid"
  c.data.min_examples = 5
  if arg == "mlp":
    c.model.name = "transcriptomics_mlp"
    c.model.hidden = (32,)
    c.model.dropout = 0.2
  elif arg == "lr":
    c.model.name = "linear"      # 2-class softmax regression = logistic regression
  else:
    raise ValueError(f"configs/gse7390_prognosis.py:{arg}: unknown argument; allowed: lr, mlp")
  c.model.l2 = 0.01
  c.client.optimizer = "sgd"
  c.client.lr = 0.05
  c.client.local_steps = 5
  c.client.batch_size = 16
  c.checkpoint.every = 20
  c.eval.centralized_baseline = True
  return c
