"""One of the processes that test_multiprocess starts with shardgpt.parallel.distributed.launch (2 x 4 CPU
devices).

Every process runs the same checks; process 0 writes what the test compares against one process x 8:
    python tests/_multiprocess_worker.py OUT.json RESTORE_DIR SAVE_DIR --coordinator ... --devices 4
- the training runs of tests/_runs.py (zero3 on dp=2,tp=4: GSPMD, shard_map and explicit sharding);
- the global batch assembled from per-process rows, and how many rows this process built;
- how many processes a tp group and a dp group span;
- greedy generation from the zero3 run's params on the 2-process mesh;
- a checkpoint saved by one process restored here, and this run's zero3 state saved for the test to restore.
"""

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The three impls at ZeRO-3, whose step has every kind of collective across processes: gathers,
# reduce-scatters and all-reduces (the gradients of params dp does not split); explicit's state and batch
# also cross from the Auto mesh onto its Explicit twin there. dp's runs are left out for the suite's time.
RUNS = [("gspmd", "zero3"), ("shard_map", "zero3"), ("explicit", "zero3")]
MESH = "dp=2,tp=4"
PROMPTS = [[0, 1, 2, 1, 0, 2], [2, 2, 1, 0, 0, 1]]
NEW_TOKENS = 5


def digest(tree) -> str:
    """A hash of every leaf's bytes, in tree order: equal trees, equal digests."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("restore_dir")
    p.add_argument("save_dir")
    for flag in ("--coordinator", "--num-processes", "--process-id", "--devices"):
        p.add_argument(flag)
    args = p.parse_args()
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"

    import jax
    import numpy as np

    from shardgpt.generation import generate
    from shardgpt.io import checkpoint
    from shardgpt.parallel import distributed, sharding
    from shardgpt.parallel.mesh import make_mesh, processes_per_group
    from shardgpt.training import data, train

    distributed.initialize(args.coordinator, int(args.num_processes), int(args.process_id))
    import _runs  # after initialize: it builds meshes over jax.devices()

    out = {"processes": jax.process_count(), "devices": jax.device_count()}
    for impl, strategy in RUNS:
        run = _runs.run(impl, MESH, strategy)
        out[f"{impl} {strategy}"] = {"losses": run.losses.tolist(), "grad_norms": run.grad_norms.tolist()}

    mesh = make_mesh(MESH)
    built = []

    class Counting:  # the sort task, counting the rows this process builds
        seq_len = _runs.TASK.seq_len

        def rows(self, step, rows, split="train"):
            built.extend(rows)
            return _runs.TASK.rows(step, rows, split)

    batch = data.global_batch(Counting(), 3, 8, sharding.batch_sharding(mesh, "dp"))
    out["batch_equal"] = bool(
        np.array_equal(distributed.to_host(batch["inputs"]), _runs.TASK.rows(3, range(8))[0])
    )
    out["rows_built_by_process_0"] = sorted(set(built))
    out["tp_spans"], out["dp_spans"] = processes_per_group(mesh, "tp"), processes_per_group(mesh, "dp")

    trained = _runs.run("gspmd", MESH, "zero3").state
    tokens = generate.generate(_runs.MODEL, trained.params, PROMPTS, NEW_TOKENS, mesh=mesh, strategy="zero3")
    out["generated"] = [t.tolist() for t in tokens]

    target, shardings = train.abstract_state(_runs.MODEL, _runs.TX, mesh, "zero3")
    restored = checkpoint.Checkpointer(args.restore_dir)
    out["restored_digest"] = digest(distributed.to_host(restored.restore(target)))
    restored.close()
    saver = checkpoint.Checkpointer(args.save_dir, async_save=False)
    saver.save(distributed.place(trained, shardings.state), {"model": {}})
    saver.close()
    out["saved_digest"] = digest(trained)

    if jax.process_index() == 0:
        Path(args.out).write_text(json.dumps(out))
    print(f"process {jax.process_index()}: done")


if __name__ == "__main__":
    main()
