"""Flower ServerApp: the lab's FedAvg server over Flower's Grid.

Each round sends the global parameters (ArrayRecord, float32) and the round index to every
connected SuperNode, receives each site's delta and example count, and applies the lab's
server step (example-weighted mean delta through config.server.optimizer). Evaluates the
final model on the config's test split and writes `run_config["out"]` (JSON): accuracy, AUC,
macro-F1, seconds per round and the bytes of the ArrayRecords sent down and up
(ArrayRecord.count_bytes: the serialised arrays, without HTTP/protobuf framing).
"""

import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedjax_lab.flower import task

app = ServerApp()


def _wait_for_nodes(grid: Grid, n: int, timeout_s: float = 300.0) -> list[int]:
  start = time.time()
  while True:
    nodes = sorted(grid.get_node_ids())
    if len(nodes) >= n:
      return nodes[:n]
    if time.time() - start > timeout_s:
      raise RuntimeError(f"{len(nodes)} of {n} SuperNodes connected after {timeout_s:.0f} s")
    time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
  rc = context.run_config
  config = task.load_config(str(rc["config"]), str(rc.get("overrides", "")))
  exp = task.build(config)
  server = task.Server(exp)
  nodes = _wait_for_nodes(grid, config.data.num_sites)
  rounds, log = [], []
  for t in range(config.rounds):
    t0 = time.perf_counter()
    arrays = ArrayRecord(numpy_ndarrays=task.leaves(server.params))
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"round": t})}),
                        dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
    replies = list(grid.send_and_receive(messages))
    errors = [r.error for r in replies if r.has_error()]
    if errors or len(replies) != len(nodes):
      raise RuntimeError(f"round {t}: {len(replies)} replies of {len(nodes)}; errors: {errors}")
    replies.sort(key=lambda r: int(r.content["metrics"]["site"]))
    deltas = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
    counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
    server.step(deltas, counts)
    down = arrays.count_bytes() * len(nodes)
    up = sum(r.content["arrays"].count_bytes() for r in replies)
    rounds.append({"round": t + 1, "seconds": time.perf_counter() - t0,
                   "bytes_down": down, "bytes_up": up})
    log.append(f"round {t + 1}: {rounds[-1]['seconds']:.2f} s")
  result = {**server.evaluate(), "rounds": rounds,
            "bytes_total": sum(r["bytes_down"] + r["bytes_up"] for r in rounds),
            "seconds_total": sum(r["seconds"] for r in rounds),
            "params": [a.tolist() for a in task.leaves(server.params)]
                      if rc.get("save-params", False) else None}
  with open(str(rc["out"]), "w") as f:
    json.dump(result, f)
