import jax
import pytest

from shardgpt.parallel.mesh import describe, make_mesh, parse_mesh_spec


def test_parse_fills_omitted_axes_and_rest():
    one = {"pp": 1, "cp": 1, "ep": 1}
    assert parse_mesh_spec("dp=2,tp=4", 8) == {"dp": 2, "tp": 4} | one
    assert parse_mesh_spec("tp=8", 8) == {"dp": 1, "tp": 8} | one
    assert parse_mesh_spec("dp=-1,tp=2", 8) == {"dp": 4, "tp": 2} | one
    assert parse_mesh_spec(" dp = 8 ", 8) == {"dp": 8, "tp": 1} | one
    assert parse_mesh_spec("pp=4,dp=2", 8) == {"dp": 2, "pp": 4, "cp": 1, "ep": 1, "tp": 1}
    assert parse_mesh_spec("dp=2,ep=4", 8) == {"dp": 2, "tp": 1} | one | {"ep": 4}


def test_mesh_has_auto_axes_over_all_devices():
    mesh = make_mesh("dp=2,tp=4")
    assert mesh.shape == {"dp": 2, "pp": 1, "cp": 1, "ep": 1, "tp": 4}  # every mesh has all five axes
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert describe(mesh) == "dp=2,tp=4" and describe(make_mesh("cp=4,dp=2")) == "dp=2,cp=4,tp=1"
    assert make_mesh("dp=1", jax.devices()[:1]).size == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dp=2,tp=2", "has 4 devices but 8 are present"),
        ("xp=8", "unknown mesh axis 'xp'"),
        ("dp2", "malformed mesh spec"),
        ("dp=two", "is not an integer"),
        ("dp=0,tp=8", "must be a positive size"),
        ("dp=-1,tp=-1", "only one mesh axis may be -1"),
        ("dp=3,tp=-1", "do not split"),
        ("dp=2,dp=4", "given twice"),
        ("", "empty mesh spec"),
    ],
)
def test_bad_specs_say_what_to_change(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)


def test_a_hand_built_mesh_without_the_rules_axes_is_refused_naming_them():
    from jax.sharding import AxisType

    from shardgpt.parallel import sharding

    mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match=r"lack pp, cp, ep: .*make_mesh"):
        sharding.tree_shardings({}, {}, mesh, sharding.rules("dp", "params"))
