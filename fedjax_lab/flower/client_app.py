"""Flower ClientApp: one hospital's site, running the lab's compiled client update.

Node config (flower-supernode --node-config): `partition-id=<site>` picks the site of the
config's partition (loopback demo and tests: every SuperNode derives the same partition of
the same data set and keeps its own share). At a real hospital the SuperNode runs where the
data is; point the run config's `overrides` at that node's file (data.path) with num_sites=1
per node, or keep partition-id for a shared public benchmark. Run config: `config` (a lab
config spec) and `overrides` ('key=value ...'), the same for every node and the server.

Flower's SuperNode starts one ClientApp process per message, so each round this process
builds the lab task (data, model) and compiles the client update afresh: runtime the lab's
simulation does not pay.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedjax_lab.flower import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
  config = task.load_config(str(context.run_config["config"]),
                            str(context.run_config.get("overrides", "")))
  exp = task.build(config)
  client = task.SiteClient(exp, int(context.node_config["partition-id"]))
  params = task.unflatten(exp.init_state().params,
                          msg.content["arrays"].to_numpy_ndarrays())
  delta, loss = client.train(params, int(msg.content["config"]["round"]))
  return Message(RecordDict({
      "arrays": ArrayRecord(numpy_ndarrays=delta),
      "metrics": MetricRecord({"num-examples": client.count, "train_loss": loss,
                               "site": client.site})}), reply_to=msg)
