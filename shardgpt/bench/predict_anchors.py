"""The cost model against published step times: each anchor's run expressed as our GPT and layout, predicted
without compiling (lab/recommend.evaluate: the layout on an AbstractMesh, theory's collectives, the
temporaries model) and set beside the published figure, with the error of both overlap bounds.

Every published figure is quoted from the source named beside it; nothing here is measured by us. What our
GPT cannot express (SwiGLU, RMSNorm, RoPE, hand-written kernels) is named per anchor.
"""

import dataclasses
import sys

from shardgpt.analysis import hardware
from shardgpt.lab import recommend
from shardgpt.model import config


@dataclasses.dataclass(frozen=True)
class Anchor:
    """One published run: what it was, our expression of it, and its figure with the source."""

    name: str
    hardware: str
    model: str  # our preset
    overrides: dict
    candidate: recommend.Candidate
    batch: int  # global sequences per step
    seq: int
    published_step_s: float
    source: str
    differs: str


ANCHORS = (
    Anchor(
        "llm.c GPT-2 1558M, 8x H100 SXM",
        "h100x8",
        "gpt2-xl",
        {"attention": "cudnn"},
        recommend.Candidate(8, 1, 1, "zero1", 8, False),  # -b 16 x 8 GPUs x 8 accumulation = 1024 rows
        1024,
        1024,
        2.80,
        "karpathy/llm.c scripts/run_gpt2_1558M.sh (commit 039904ee): '8X H100 80GB SXM ... steps in "
        "2.80s/iter', -b 16 -t 1024 -d 1048576 -r 0 -z 1, cuDNN",
        "the same architecture; llm.c's ZeRO-1 reduce-scatters the gradients (ours all-reduces, then "
        "gathers the params), its own fused CUDA kernels",
    ),
    Anchor(
        "llm.c GPT-2 124M, 8x A100 80GB SXM",
        "a100x8",
        "gpt2",
        {"attention": "cudnn"},
        recommend.Candidate(8, 1, 1, "zero1", 1, False),  # -b 64 x 8 GPUs = 512 rows, no accumulation
        512,
        1024,
        0.300,
        "karpathy/llm.c scripts/run_gpt2_124M.sh (commit 039904ee): 'on 8X A100 80GB SXM ... steps in "
        "~300ms/iter', -b 64 -t 1024 -d 524288 -r 0 -z 1, cuDNN",
        "as above; A100, not H100: the script's published figure is an A100's; the a100 profile has no "
        "measured matmul rate (datasheet x 0.7)",
    ),
    Anchor(
        "MaxText Llama2-7B (JAX-Toolbox), 8x H100 SXM",
        "h100x8",
        "gpt2",
        dict(
            n_layer=32,
            n_head=32,
            n_embd=4096,
            vocab_size=32000,
            block_size=4096,
            use_bias=False,
            tie_embeddings=False,
            attention="cudnn",
        ),  # fmt: skip
        recommend.Candidate(8, 1, 1, "zero3", 1, False),  # FSDP 8, BS/GPU 2: 16 rows
        16,
        4096,
        0.721,
        "NVIDIA/JAX-Toolbox docs/frameworks/maxtext/README.md (commit 67b79492), Configs: 7B, H100 80G SXM, "
        "BF16, seq 4096, 8 GPUs, BS/GPU 2, FSDP 8, flash attention, remat minimal_flash: step 0.721 s, "
        "22.19 sequences/s",
        "a GPT of Llama2-7B's width, depth and heads: a 4x GELU MLP (2 x 4096 x 16384, within 1% of "
        "SwiGLU's 3 x 4096 x 11008 weights), LayerNorm not RMSNorm, learned positions not RoPE; remat "
        "minimal_flash (elementwise recompute) modelled as none",
    ),
)
NOT_COMPARED = (
    "The JAX scaling book's worked example (jax-ml.github.io/scaling-book, part 6: LLaMA 3-70B on a TPU v5p "
    "pod) derives its training time from an assumed 40% MFU: a hand estimate, not a measured step time, so "
    "there is no error to compute; not compared."
)


def predict(anchor: Anchor) -> dict:
    """Our analytic prediction of one anchor's step."""
    cfg = config.preset(anchor.model, dtype="bfloat16", **anchor.overrides)
    cluster = hardware.cluster(anchor.hardware)
    return recommend.evaluate(cfg, anchor.candidate, anchor.batch, anchor.seq, cluster)


def main(argv: list[str] | None = None) -> int:
    """Print each anchor's published and predicted step time, the error, and the sources."""
    del argv
    print(
        "| anchor | our layout | published step s | predicted s (no / full overlap) | error (none / full) | "
        "MFU (predicted, none) | binds |"
    )
    print("|---|---|---|---|---|---|---|")
    for a in ANCHORS:
        row = predict(a)
        p = row["prediction"]
        none, full = p["step_time_s"]["no_overlap"], p["step_time_s"]["full_overlap"]
        errors = " / ".join(f"{100 * (t / a.published_step_s - 1):+.0f}%" for t in (none, full))
        print(
            f"| {a.name} | {a.candidate.label()}, batch {a.batch} x {a.seq} | {a.published_step_s:.3g} | "
            f"{none:.3g} / {full:.3g} | {errors} | {100 * p['mfu']['no_overlap']:.1f}% | {p['binding']} |",
            flush=True,
        )
    print()
    for a in ANCHORS:
        print(f"- {a.name}: {a.source}. Differs: {a.differs}.")
    print(f"- {NOT_COMPARED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
