"""Checkpoints on orbax's CheckpointManager: async, atomic, keep N, restored straight into the current layout.

Each step's checkpoint holds the TrainState and the run's description as JSON (model config, strategy, mesh,
impl, optimizer, seed, task). Batches are a function of the step, so the step is the data position.
Restore always passes target shardings built from the *current* mesh and strategy (train.abstract_state):
resharding onto another mesh, strategy or device count is the ordinary path, not a special one.

One writer per directory: a writing Checkpointer holds the directory's lock (lock.py) from open to close, so
a second writer is refused before it touches anything; a read-only one takes no lock and deletes nothing.
"""

import gc
import inspect
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from shardgpt.io.lock import LOCK_FILE, DirectoryLock, LockedError
from shardgpt.training import loop, train

_STEP = re.compile(r"^\d+$")
_TMP = ".orbax-checkpoint-tmp"  # orbax writes here first and renames when complete: latest_step skips these
OWN_FILES = {
    "metrics.jsonl",
    "report.html",
    LOCK_FILE,
}  # the train command's log and report, and the writers' lock, live beside the steps


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as asked; nothing in it has been changed."""


class NonFiniteState(RuntimeError):
    """A state holding a NaN or inf: Checkpointer.save refuses it."""


def check_directory(directory: str | Path, read_only: bool = False):
    """Raise CheckpointError unless `directory` is absent, empty or holds only checkpoint steps.

    Orbax deletes old steps (keep N) and stale temporaries: pointed at a foreign directory it could delete
    someone's numbered folders, so anything unexpected is refused before a writing manager opens it. A
    reader skips a step folder without its items (a save in flight, or one a kill cut short).
    """
    where = Path(directory)
    if where.exists() and not where.is_dir():
        raise CheckpointError(f"checkpoint directory {where} is a file: give a directory")
    if not where.exists():
        return
    for entry in where.iterdir():
        name = entry.name
        if name in OWN_FILES or _TMP in name or name.startswith("_CHECKPOINT_METADATA"):
            continue
        if not (_STEP.match(name) and entry.is_dir()):
            raise CheckpointError(
                f"{where} is not a shardgpt checkpoint directory (it holds {name!r}): choose an empty or new "
                "directory; nothing was changed"
            )
        if not read_only and (not (entry / "meta").is_dir() or not (entry / "state").is_dir()):
            raise CheckpointError(
                f"{entry} holds no complete checkpoint (no meta/ and state/ inside: a save cut short, or "
                "not shardgpt's): resume from another directory or restore an earlier step with a reader; "
                "nothing was changed"
            )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def is_finite(state: train.TrainState) -> bool:
    """True when every float leaf of the state (params and optimizer moments) is finite."""
    return bool(_all_finite(state))


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 of x's bit patterns: each element's bits mixed (murmur3's finaliser), then summed with
    wrap-around. The sum is order-free, so the same values give the same checksum on any mesh or layout;
    a flipped bit changes its element's mix, and so the sum (but for a 2^-32 chance)."""
    width = jnp.dtype(x.dtype).itemsize * 8
    bits = jax.lax.bitcast_convert_type(x, getattr(jnp, f"uint{width}")).astype(jnp.uint32)
    h = bits * jnp.uint32(0x9E3779B1)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)


@jax.jit
def _checksums(tree: Any) -> Any:
    return jax.tree.map(_leaf_checksum, tree)


def checksums(state: train.TrainState) -> dict[str, int]:
    """{leaf path: checksum} of every leaf, computed on the devices where the state lives."""
    return _by_path(_checksums(state))


def _by_path(sums: Any) -> dict[str, int]:
    sums = jax.device_get(sums)
    return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def _collect_quietly():
    """A failed orbax restore leaves its other reads suspended (coroutines never resumed); each would print
    pages of TensorStore spec when finalised, so close them now, quietly."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        gc.collect()
        for obj in gc.get_objects():
            if inspect.iscoroutine(obj) and obj.cr_frame is not None and "orbax" in obj.cr_code.co_filename:
                try:
                    obj.close()
                except Exception:  # the read's own failure, already reported by the restore
                    pass
        gc.collect()
    finally:
        sys.unraisablehook = hook


class Checkpointer:
    """Save TrainStates asynchronously into `directory` (the last `keep` kept); restore into any layout.

    A writer (the default) holds the directory's lock until `close` (process 0 for a job of several): a
    second writer gets CheckpointError naming the holder. `read_only=True` opens it to restore only: no
    lock, no cleanup, no save.
    """

    def __init__(
        self,
        directory: str | Path,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
        verify: bool = True,
    ):
        if keep is not None and keep < 1:
            raise CheckpointError(f"--keep must be >= 1, got {keep}")
        self.directory, self.read_only, self.lock = Path(directory).resolve(), read_only, None
        self.verify = verify  # record each leaf's checksum at save and check it at restore
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory {self.directory}")
        # Every process of a job writes its own shards; the job's lock is process 0's.
        if not read_only and jax.process_index() == 0:
            check_directory(directory)  # before creating anything in it (the lock's file)
            try:
                self.lock = DirectoryLock(self.directory).acquire()
            except LockedError as e:
                raise CheckpointError(f"{e}: wait for it to finish, or use another directory") from None
            except OSError as e:
                raise CheckpointError(f"{self.directory}: cannot write there ({e.strerror or e})") from None
        check_directory(directory, read_only)  # again under the lock: no writer can be mid-save now
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # a save killed midway leaves a temporary: never a step
            read_only=read_only,
            # What read_only implies, said here so that orbax does not warn that it changed them.
            **(dict(save_interval_steps=0, create=False) if read_only else {}),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._saved: set[int] = set()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (its state.step), or None."""
        return self.manager.latest_step()

    def save(self, state: train.TrainState, description: dict, loss: float | None = None) -> int:
        """Start saving `state` under its own step, with `description` and the training `loss` of the
        step that made it (None: unknown); returns the step.

        The device-to-host copy happens now; the write continues in the background (async). A state with
        a NaN or inf is refused (NonFiniteState) so the last good checkpoint stays the latest.
        """
        step = int(state.step)
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only: open a writer to save")
        if step in self._saved or step in self.manager.all_steps():
            return step  # saved already (maybe still in flight), or by the run this one resumes: same state
        # Both passes over the state dispatched before either is read: one wait, not two in turn.
        finite, sums = _all_finite(state), _checksums(state) if self.verify else None
        if not bool(finite):
            raise NonFiniteState(f"step {step}: the state holds NaN or inf; not saved")
        meta = {**description, "loss": loss if loss is None or math.isfinite(loss) else None}
        if self.verify:  # orbax's own checksums cover its index, not the arrays' bytes
            meta["checksums"] = _by_path(sums)
        json.dumps(meta, allow_nan=False)  # fail now, not in the background thread
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args)
        self._saved.add(step)
        return step

    def description(self, step: int | None = None) -> dict:
        """The run description saved with `step` (default: the latest)."""
        step = self._step(step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many kinds; the user needs the path and the reason
            raise CheckpointError(f"{self.directory}/{step}: cannot read its description ({e})") from e
        if not isinstance(restored.meta, dict) or "model" not in restored.meta:
            raise CheckpointError(f"{self.directory}/{step}: not a shardgpt checkpoint (no model in meta)")
        return restored.meta

    def restore(self, target: train.TrainState, step: int | None = None) -> train.TrainState:
        """The state saved at `step` (default: the latest), placed as `target` says.

        `target` is train.abstract_state(...)'s tree of ShapeDtypeStructs carrying the *current* mesh's
        shardings, so each device reads only its own slices, whatever mesh or strategy saved them.
        """
        step = self._step(step)
        state, problem = self._restore_verified(target, step)
        if problem is None:
            return state
        older = next((k for k in sorted(self.manager.all_steps(), reverse=True) if k < step
                      and self._restore_verified(target, k)[1] is None), None)  # fmt: skip
        then = (
            "no older step verifies"
            if older is None
            else (f"the newest older step that verifies is {older}: resume it with --resume --step {older}")
        )
        raise CheckpointError(f"{self.directory}/{step}: {problem}; {then}; nothing was deleted")

    def _restore_verified(self, target: train.TrainState, step: int) -> tuple[Any, str | None]:
        """(state, None), or (None, why step `step` cannot be used): unreadable, or a leaf whose checksum
        differs from the one recorded at save (checkpoints saved without checksums are not checked)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        try:
            state = self.manager.restore(step, args=args).state
        except Exception as e:  # orbax raises many kinds: the user needs the path and the first line
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _collect_quietly()
            return None, f"cannot restore the state ({reason[:300]}): corrupt, or from another model"
        saved = self.description(step).get("checksums") if self.verify else None
        if saved:
            now = checksums(state)
            bad = [path for path, value in saved.items() if now.get(path) != value]
            if bad:
                return None, f"{len(bad)} array(s) do not match their checksums (e.g. {bad[0]}): corrupt data"
        return state, None

    def last_good_step(self, step_losses: dict[int, float] | None = None) -> int | None:
        """The newest checkpoint good to resume from, judged by the loss computed *from* its state: the
        next step's (`step_losses[k + 1]`, e.g. metrics.jsonl's, None meaning NaN or inf; else the next
        checkpoint's recorded one). Good when that is finite and at most SPIKE_FACTOR x the lowest loss
        before it. A state an update already ruined is finite, and its own recorded loss (from the state
        before) looks fine: the loss after it does not. With no later loss known, its own judges it."""
        steps = sorted(self.manager.all_steps())
        # Step k's loss is computed from state k - 1; a checkpoint records the loss of the step that made it.
        losses = {k: loss for k in steps if (loss := self.description(k).get("loss")) is not None}
        losses |= {k: math.inf if v is None else v for k, v in (step_losses or {}).items()}  # null: NaN/inf
        good = None
        for k in steps:
            after = losses.get(k + 1, losses.get(k))
            lowest = min((v for s, v in losses.items() if s <= k and math.isfinite(v)), default=math.inf)
            if after is None or (
                math.isfinite(after) and (lowest == math.inf or after <= SPIKE_FACTOR * lowest)
            ):
                good = k
        return good

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            at = "" if step is None else f" at step {step}"
            raise CheckpointError(f"no checkpoint{at} in {self.directory}")
        return step

    def wait(self):
        """Block until every save in flight is on disk."""
        self.manager.wait_until_finished()

    def close(self):
        """Finish pending saves, release the manager, then the directory's lock; call before exiting."""
        self.manager.wait_until_finished()
        self.manager.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


SPIKE_FACTOR = 2.0  # a checkpoint whose loss exceeds this times an older one's is not a good one to resume

# Model fields that change how a step computes, not what the state holds: they may differ on resume.
COMPUTE_FIELDS = ("dtype", "attention", "remat", "ring_layout")


def check_compatible(saved: dict, current: dict) -> list[str]:
    """Raise CheckpointError if the saved model differs from the current one (compute fields aside); else
    return notes on what else changed (mesh, strategy, impl: resharded on restore)."""
    old, new = saved.get("model", {}), current.get("model", {})
    differ = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in COMPUTE_FIELDS
    )
    if differ:
        fields = ", ".join(f"{k}: saved {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
        raise CheckpointError(
            f"the checkpoint holds another model ({fields}): resume with the saved model's flags, "
            "or use another --ckpt-dir"
        )
    notes = [
        f"model.{k}: saved {old.get(k)!r}, now {new.get(k)!r}"
        for k in COMPUTE_FIELDS
        if old.get(k) != new.get(k)
    ]
    for key in ("mesh", "strategy", "impl", "task", "seed", "batch", "microbatches"):
        if saved.get(key, 1 if key == "microbatches" else None) != current.get(key):
            notes.append(f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}")
    old_optim, new_optim = saved.get("optim", {}), current.get("optim", {})
    for key in sorted(old_optim.keys() | new_optim.keys()):
        if old_optim.get(key) != new_optim.get(key):
            notes.append(f"optim.{key}: saved {old_optim.get(key)!r}, now {new_optim.get(key)!r}")
    return notes


class SaveEvery(loop.Callback):
    """Save the state every `every` steps (by state.step) through a Checkpointer; finite states only."""

    def __init__(self, checkpointer: Checkpointer, every: int, description: dict):
        self.checkpointer, self.every, self.description = checkpointer, every, description
        self.saved: list[int] = []

    def wants_state(self, step: int) -> bool:
        return (step + 1) % self.every == 0  # state.step == step + 1 after the step

    def on_step_end(self, trainer, step, metrics, state=None):
        if state is None or not self.wants_state(step):
            return
        if not all(math.isfinite(metrics.get(k, 0.0)) for k in ("loss", "grad_norm")):
            return  # the NaN guard stops the run; the last good checkpoint stays the latest
        try:
            self.saved.append(self.checkpointer.save(state, self.description, metrics.get("loss")))
        except NonFiniteState:  # finite metrics, yet an update overflowed: stop as the NaN guard would
            raise loop.NonFiniteError(step + 1, metrics, "state (params or optimizer moments)") from None
