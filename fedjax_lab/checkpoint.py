"""Orbax checkpoints of the whole server state, for exact resume.

The state (params, optimizer and per-site states, round counter) is restored WITH the freshly
built state as the abstract target: without it optax states come back as plain lists. Every
key is derived from (seed, purpose, round, site), so nothing else is needed to continue the
run bit-for-bit; `meta` carries the running totals the logs report.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 2):
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # Synchronous: the next jitted round donates the state buffers being saved.
            enable_async_checkpointing=False))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def save(self, round_: int, state, meta: dict) -> None:
    if round_ in self._manager.all_steps():
      return  # orbax silently refuses to overwrite a step; nothing new to write
    self._manager.save(round_, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, round_: int, target_state):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    out = self._manager.restore(round_, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def read_state(workdir: str, round_: int | None = None) -> dict:
  """The state saved at `round_` (default: the latest) as nested dicts of NumPy arrays.

  For analysis after a run (attacks, plots, comparing runs): it needs no target state and
  reads a checkpoint written by any process or device layout onto this process's first device.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if round_ is None:
    with ocp.CheckpointManager(directory) as manager:
      round_ = manager.latest_step()
    if round_ is None:
      raise FileNotFoundError(f"no checkpoint under {directory}")
  path = os.path.join(directory, str(round_), "state")
  reader = ocp.StandardCheckpointer()
  metadata = reader.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  return jax.tree.map(np.asarray, reader.restore(path, target))
