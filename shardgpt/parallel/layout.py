"""Will one run lay out on its mesh? Every check of a run against its mesh, raised before any compile with
the fix in the message: the axes (pp needs shard_map and stacked layers; cp and +sp both split the
sequence), the batch (dp, microbatches, filling the pipeline), the sequence (+sp over tp, cp's chunks)
and the context. The param shapes are checked where their shardings are built (sharding.tree_shardings).
"""

from jax.sharding import Mesh

from shardgpt.model.config import ModelConfig
from shardgpt.parallel import microbatch, pipeline, sharding
from shardgpt.parallel.mesh import check_axes


def check(
    mesh: Mesh,
    strategy: str,
    impl: str,
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    microbatches: int,
) -> None:
    """Every check below for one run: ValueError naming what to change, or None."""
    check_mesh_axes(mesh, strategy, impl, config, microbatches)
    check_batch(config, mesh, strategy, batch_size, seq_len, microbatches)
    check_experts(mesh, strategy, impl, config, batch_size, microbatches)


def check_mesh_axes(mesh: Mesh, strategy: str, impl: str, config: ModelConfig, microbatches: int = 1) -> None:
    """Raise before compiling where pp or cp cannot run: pp needs shard_map (GPipe is written there) and the
    stacked layers; cp does not combine with +sp (both split the sequence); explicit sharding runs dp, tp,
    ZeRO and +sp (on one process or several), not yet cp."""
    check_axes(mesh)
    pp, cp = mesh.shape.get("pp", 1), mesh.shape.get("cp", 1)
    if impl == "explicit" and cp > 1:
        raise ValueError(
            f"--impl explicit runs dp, tp, ZeRO-1/2/3, +sp and microbatches (on one process or several), not "
            f"yet cp={cp}: use --impl gspmd or shard_map" + (" (pp: shard_map only)" if pp > 1 else "")
        )
    n_layer, scan_layers = config.n_layer, config.scan_layers
    if pp > 1 and impl != "shard_map":
        raise ValueError(
            f"pp={pp}: the pipeline (GPipe's schedule) is written in shard_map: use --impl shard_map, or a "
            "mesh without pp"
        )
    if pp > 1 and not scan_layers:
        raise ValueError(f"pp={pp} splits the stacked layers into stages: drop --no-scan")
    if pp > 1 and n_layer % pp:
        raise ValueError(f"n_layer {n_layer} does not split into pp={pp} equal stages: choose pp dividing it")
    if cp > 1 and sharding.is_sequence_parallel(strategy):
        raise ValueError(
            f"{sharding.canonical(strategy)} on cp={cp}: +sp and cp both split the sequence: drop one"
        )


def check_batch(
    config: ModelConfig, mesh: Mesh, strategy: str, batch_size: int, seq_len: int, microbatches: int = 1
):
    """Raise before compiling when the batch cannot run: too long for the context, not divisible by dp (or
    its dp shards by `microbatches`), a sequence that +sp cannot split over tp or cp over cp, or a pipeline
    that M microbatches cannot fill (pipeline.check)."""
    if seq_len > config.block_size:
        raise ValueError(
            f"sequence length {seq_len} exceeds the model's block_size {config.block_size}: "
            f"shorten the sequence or set model.block_size >= {seq_len}"
        )
    spec = sharding.batch_sharding(mesh, strategy).spec
    sharding.check_divisible("batch", (batch_size, seq_len), ("batch", "length"), spec, mesh)
    check_sequence_parallel(mesh, strategy, seq_len)
    shards = sharding.batch_shards(mesh)
    microbatch.check(batch_size, microbatches, shards)
    cp, zigzag = mesh.shape.get("cp", 1), config.ring_layout == "zigzag"
    if cp > 1 and seq_len % (2 * cp if zigzag else cp):
        parts = f"2 x cp = {2 * cp} chunks (ring_layout zigzag)" if zigzag else f"cp={cp}"
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {parts}: choose --seq a multiple of "
            f"{2 * cp if zigzag else cp} (a chars:PATH task; sort's length is odd), or another cp"
        )
    if (pp := mesh.shape.get("pp", 1)) > 1:
        pipeline.check(config.n_layer, pp, microbatches, batch_size // shards)


def check_sequence_parallel(mesh: Mesh, strategy: str, seq_len: int) -> None:
    """Raise before compiling when "+sp" cannot run: no tp axis to split over, or a sequence it does not
    divide."""
    if not sharding.is_sequence_parallel(strategy):
        return
    tp, name = mesh.shape.get("tp", 1), sharding.canonical(strategy)
    if tp == 1:
        raise ValueError(
            f"{name}: sequence parallelism splits the sequence over tp, and this mesh "
            "has tp=1: use a mesh with tp > 1 (e.g. dp=2,tp=4) or drop +sp"
        )
    if seq_len % tp:
        raise ValueError(
            f"{name}: sequence length {seq_len} is not divisible by tp={tp}: choose "
            f"--seq a multiple of {tp} (a chars:PATH task; sort's length is odd), or a tp dividing {seq_len}"
        )


def check_experts(
    mesh: Mesh, strategy: str, impl: str, config: ModelConfig, batch_size: int, microbatches: int = 1
) -> None:
    """Raise before compiling where experts cannot lay out: ep without experts or not dividing them, an MoE
    with the axes and loops it does not run with yet, or a device's rows not filling whole routing groups."""
    ep = mesh.shape.get("ep", 1)
    if not config.moe:
        if ep > 1:
            raise ValueError(
                f"ep={ep} splits a mixture of experts' experts, and this model is dense: use an MoE model "
                "(gpt-moe-pico, gpt2-moe, or --model.n_experts=8) or a mesh without ep"
            )
        return
    if config.n_experts % ep:
        raise ValueError(f"n_experts {config.n_experts} does not split over ep={ep}: choose ep dividing it")
    pp, cp = mesh.shape.get("pp", 1), mesh.shape.get("cp", 1)
    unsupported = [
        what
        for what, present in (
            (f"pp={pp}", pp > 1),
            (f"cp={cp}", cp > 1),
            (sharding.canonical(strategy), sharding.is_sequence_parallel(strategy)),
        )
        if present
    ]
    if unsupported:
        raise ValueError(
            f"a mixture of experts runs on dp, ep, tp and ZeRO, not yet with {' or '.join(unsupported)}: "
            "drop it, or use a dense model"
        )
    if microbatches > 1 and impl != "shard_map":
        raise ValueError(
            f"a mixture of experts with --microbatches {microbatches} runs under --impl shard_map: the "
            f"{impl} microbatch loop keeps each device's rows apart in a vmap over dp x ep, which the "
            "experts' split over ep cannot enter; use --impl shard_map or --microbatches 1"
        )
    rows = batch_size // (sharding.batch_shards(mesh) * microbatches)
    if rows % config.moe_group_rows:
        raise ValueError(
            f"each device routes {rows} rows a microbatch, not whole groups of model.moe_group_rows="
            f"{config.moe_group_rows}: choose a batch (or moe_group_rows) so that batch / (dp x ep x "
            "microbatches) is a multiple of it"
        )
