"""The lab's federated task on Flower's deployment engine (optional: `pip install flwr==1.42.0`).

  python -m fedjax_lab.flower.run --config configs/gse7390_prognosis.py --supernodes 3

- `task.py`: what both sides build from the lab config (no Flower import): the model, the
  site's own examples and the lab's COMPILED client update (client.make_client_update via
  Experiment), the server optimizer step and the test evaluation;
- `client_app.py` / `server_app.py`: the Flower ClientApp / ServerApp around them;
- `app/pyproject.toml`: the Flower App (FAB) that `flwr run` ships to the SuperLink;
- `run.py`: starts `flower-superlink` and one `flower-supernode` per site as separate
  processes on loopback, submits the app with `flwr run`, and prints the lab's own simulation
  of the same run beside it (accuracy, runtime, bytes).
"""
