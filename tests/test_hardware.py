"""Hardware profiles (shardgpt.analysis.hardware): every figure says what it is and where it comes from, and
a name that is not a profile is refused with the list."""

import re

import pytest

from shardgpt.analysis import hardware

EXPECTED = {"h100", "h200", "a100", "tpu-v4", "tpu-v5e", "tpu-v5p", "cpu"}


def test_the_profiles_are_the_expected_machines_gpus_first():
    assert set(hardware.names()) == EXPECTED
    backends = [hardware.profile(name).backend for name in hardware.names()]
    assert backends == sorted(backends, key=hardware.BACKENDS.index)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_figure_has_a_kind_and_a_source(name):
    p = hardware.profile(name)
    figures = p.figures()
    assert {"memory_bytes", "peak_bf16_flops", "hbm_bytes_per_s"} <= set(figures)
    for field, figure in figures.items():
        assert figure.kind in hardware.KINDS and figure.value > 0, (name, field)
        if figure.kind == "datasheet":  # names the vendor's document
            assert "datasheet" in figure.source or "documentation" in figure.source, (name, field, figure)
        else:  # says when, or with which jax, it was measured
            assert re.search(r"20\d\d-\d\d|jax \d", figure.source), (name, field, figure)
    assert (p.torus_dims is not None) == (p.backend == "tpu")
    assert (p.inter_node_bytes_per_s is None) == (name in ("tpu-v4", "cpu")), "no source states it there"


def test_the_h200_carries_its_measured_calibration():
    h200 = hardware.profile("h200")
    assert (h200.matmul_bf16_flops.value, h200.matmul_bf16_flops.kind) == (766e12, "measured")
    assert (h200.copy_bytes_per_s.value, h200.copy_bytes_per_s.kind) == (2.7e12, "measured")
    assert h200.peak_bf16_flops.kind == "datasheet" and h200.memory_bytes.value == 141e9


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown hardware profile 'h1000': known are a100, h100, h200"):
        hardware.profile("h1000")


def test_jax_device_kinds_map_to_profiles_and_only_exactly():
    kinds = {
        "NVIDIA H200": "h200",
        "NVIDIA H100 80GB HBM3": "h100",
        "TPU v5 lite": "tpu-v5e",
        "TPU v5": "tpu-v5p",
    }
    kinds |= {"cpu": "cpu", "NVIDIA H100 PCIe": None, "NVIDIA A100-SXM4-40GB": None, "Tesla T4": None}
    assert {kind: hardware.for_device_kind(kind) for kind in kinds} == kinds


def test_a_figure_without_a_source_is_refused():
    text = 'name = "x"\ndescription = "x"\nbackend = "gpu"\nvendor = "x"\ndevice_kinds = []\n'
    good = '[{}]\nvalue = 1\nkind = "measured"\nsource = "timed here, 2026"\n'
    figures = "".join(good.format(f) for f in ("memory_bytes", "peak_bf16_flops"))
    assert hardware._read("x", text + figures + good.format("hbm_bytes_per_s")).hbm_bytes_per_s.value == 1
    with pytest.raises(ValueError, match="hbm_bytes_per_s needs value, kind"):
        hardware._read(
            "x", text + figures + '[hbm_bytes_per_s]\nvalue = 1\nkind = "datasheet"\nsource = ""\n'
        )
    with pytest.raises(ValueError, match="hbm_bytes_per_s is missing"):
        hardware._read("x", text + figures)
