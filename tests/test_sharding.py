"""Mesh resolution and the early, readable failures for bad mesh/batch combinations."""
import jax
import pytest

from cxr_rf import sharding


def test_minus_one_takes_the_remaining_devices():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 4) == (1, 4, 1)


@pytest.mark.parametrize("mesh, devices, needle", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "at most one mesh axis may be -1"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "does not divide 8 devices"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "needs 4 devices, have 8"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, 1, "positive or -1"),
])
def test_bad_meshes_fail_with_the_reason(mesh, devices, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        sharding.mesh_shape(mesh, devices)


def test_batch_must_split_over_data_and_fsdp():
    mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    sharding.check_batch(8, mesh)
    with pytest.raises(ValueError, match="global batch 6 is not divisible by data\\*fsdp = 4"):
        sharding.check_batch(6, mesh)


def test_every_logical_name_of_the_model_has_a_rule():
    """A name without a rule is silently replicated; the table must cover what the model uses."""
    from cxr_rf import config
    from cxr_rf.model import abstract_params, build_model
    c = config.base()
    names = set()
    specs = jax.tree.leaves(
        __import__("flax").linen.get_partition_spec(abstract_params(build_model(c), 32)),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for spec in specs:
        names.update(n for n in spec if n is not None)
    ruled = {name for name, _ in sharding.RULES}
    assert names <= ruled, f"logical names without a rule: {sorted(names - ruled)}"


def test_mesh_sizes_must_divide_the_dimensions_they_split():
    """38 heads over tensor=4 (cxr_8b's first mesh) fails in one line before compiling."""
    from cxr_rf import config
    from cxr_rf.model import abstract_params, build_model
    c = config.base()
    c.model.update(width=48, heads=3)               # 3 heads, width 48
    boxed = abstract_params(build_model(c), 32)
    sharding.check_divisible(boxed, jax.sharding.AbstractMesh((1, 4, 1), sharding.MESH_AXES))
    with pytest.raises(ValueError, match=r"along 'heads' .* does not split into 2 \(tensor\)") as e:
        sharding.check_divisible(boxed, jax.sharding.AbstractMesh((1, 1, 2), sharding.MESH_AXES))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not split into 5 \\(fsdp\\)"):
        sharding.check_divisible(boxed, jax.sharding.AbstractMesh((1, 5, 1), sharding.MESH_AXES))


def _constrained_activation_names(c):
    """Every logical name the model passes to sharding.constrain while tracing (on a
    one-device mesh, where constraints are applied)."""
    from cxr_rf import step as step_lib
    from cxr_rf.model import build_model
    seen, real = set(), sharding.constrain

    def spy(x, names):
        seen.update(n for n in names if n is not None)
        return real(x, names)

    model = build_model(c)
    batch = step_lib.dummy_batch(c, 2)
    t = jax.ShapeDtypeStruct((2,), batch["image"].dtype)
    sharding.constrain = spy
    try:
        with sharding.use(sharding.make_mesh(c.mesh, jax.devices()[:1])):
            params = step_lib.abstract_state(c).params
            jax.eval_shape(lambda p, x, t, tok: model.apply({"params": p}, x, t, tok),
                           params, batch["image"], t, batch["tokens"])
    finally:
        sharding.constrain = real
    return seen


def test_activations_have_their_own_logical_names_and_rules():
    """Activations never reuse a weight name (editing a weight rule must not reshard them, and
    vice versa), and every activation name the model uses has a rule."""
    from cxr_rf import config
    from cxr_rf.model import abstract_params, build_model
    c = config.base()
    act = _constrained_activation_names(c)
    weights = set()
    for spec in jax.tree.leaves(
            __import__("flax").linen.get_partition_spec(abstract_params(build_model(c), 32)),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        weights.update(n for n in spec if n is not None)
    assert act and all(n.startswith("activation_") for n in act), act
    assert not any(n.startswith("activation_") for n in weights), weights
    ruled = {name for name, _ in sharding.RULES}
    assert act <= ruled, f"activation names without a rule: {sorted(act - ruled)}"
    # The placement the rules give (checked against the compiled program on 8 devices in
    # tests/scale_worker.py "sharded").
    P = jax.sharding.PartitionSpec
    assert sharding.mesh_axes(("activation_batch", "activation_length", "activation_embed")) \
        == P(("data", "fsdp"), None, None)
    assert sharding.mesh_axes(("activation_batch", "activation_length", "activation_mlp")) \
        == P(("data", "fsdp"), None, "tensor")
    assert sharding.mesh_axes(("embed", "mlp")) == P("fsdp", "tensor")
