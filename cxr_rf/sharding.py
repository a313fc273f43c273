"""Mesh construction and the one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names in the model (see
``cxr_rf/model/layers.py``); ``RULES`` decides where each name lives on the mesh
(``data``, ``fsdp``, ``tensor``). Change sharding strategy here, nowhere else.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxr_rf import errors

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Weights and activations
# have separate names (model/layers.py lists them), so changing how one is laid out never
# silently reshards the other.
RULES: tuple[tuple[str, Any], ...] = (
    # Weights (and with them the EMA and the Adam moments).
    ("embed", "fsdp"),         # FSDP: parameters sharded along their model dimension
    ("mlp", "tensor"),         # Megatron-style tensor parallelism of MLP / modulation outputs
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("layers", None),
    ("patch", None),
    ("freq", None),            # timestep sinusoid features
    ("ctx", None),             # rows of the context position table
    # Autoencoder convolutions (cxr_rf/autoencoder): replicated. 84M parameters at most, and
    # the first and last convolutions have one channel, which no mesh axis divides.
    ("conv_in", None),
    ("conv_out", None),
    # Activations. The batch is split over data and fsdp (FSDP is data parallel for
    # activations: each fsdp shard computes its own examples with gathered weights); the model
    # dimension stays whole, tensor parallelism splits MLP hidden and heads like the weights.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
)


def mesh_axes(names: tuple[str | None, ...]) -> P:
    """The PartitionSpec RULES give to logical ``names``."""
    return nn.logical_to_mesh_axes(names, RULES)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve the configured axis sizes (one may be -1 = the rest) against the device count."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise errors.UserError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise errors.UserError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise errors.UserError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise errors.UserError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all).

    Devices stay in process order (``jax.devices()`` is sorted by process), so the leading
    batch axis (data, fsdp) walks processes first: each process's local batch lands on its own
    devices when assembled with ``make_array_from_process_local_data``.
    """
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape({a: mesh_cfg[a] for a in MESH_AXES}, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


# The mesh of the innermost ``use`` (read by ``constrain`` while tracing).
_CURRENT: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("cxr_rf_mesh", default=None)


@contextlib.contextmanager
def use(mesh: Mesh):
    """Make ``mesh`` and the logical-axis RULES current (for tracing and running steps).

    Uses the legacy ``with mesh:`` context on purpose: under ``jax.set_mesh`` flax 0.12.8
    applies the scanned parameters' stacked ("layers", ...) constraint to the per-layer value
    during init and fails on the rank mismatch.
    """
    token = _CURRENT.set(mesh)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*context manager has been deprecated")
            with mesh, nn.logical_axis_rules(RULES):
                yield
    finally:
        _CURRENT.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical names, on the mesh of the enclosing ``use``
    (a no-op outside one, e.g. in the single-device sampler).

    Not ``nn.with_logical_constraint``: flax 0.12.8 applies it only when jax's abstract mesh
    is set, which the legacy ``with mesh`` of ``use`` does not do, so it silently did nothing
    and GSPMD was free to replicate activations over fsdp (compute and memory of the global
    batch on every chip). ``tests/test_scale.py`` checks the compiled per-device FLOPs.
    """
    mesh = _CURRENT.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_axes(names)))


def logical_sharding(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of logically-annotated (boxed) values or abstract values."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The global batch: its leading axis laid out as ``activation_batch``."""
    return NamedSharding(mesh, mesh_axes(("activation_batch",)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated placement."""
    return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, microbatches: int = 1) -> None:
    """Fail before compiling when the batch (or each microbatch) does not split over the batch axes."""
    n = math.prod(mesh.shape[a] for a in _axes(mesh_axes(("activation_batch",))[0]))
    if microbatches < 1 or global_batch % microbatches:
        raise errors.UserError(f"global batch {global_batch} is not divisible into {microbatches} microbatches")
    if global_batch % n:
        raise errors.UserError(
            f"global batch {global_batch} is not divisible by data*fsdp = {n} of mesh {dict(mesh.shape)}")
    if (global_batch // microbatches) % n:
        raise errors.UserError(f"microbatch {global_batch // microbatches} (batch {global_batch} / "
                         f"{microbatches} microbatches) is not divisible by data*fsdp = {n}")


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _uses_model_axes(spec: P, mesh: Mesh) -> bool:
    """Whether a partition spec splits its array over fsdp or tensor (axes of size > 1)."""
    for entry in spec:
        for axis in _axes(entry):
            if axis in ("fsdp", "tensor") and mesh.shape[axis] > 1:
                return True
    return False


def replicated_fraction(boxed_params: Any, mesh: Mesh) -> tuple[float, int]:
    """(fraction of parameter elements not split over fsdp/tensor, total parameter count).

    Replication over ``data`` is by design (hybrid FSDP); replication over the model axes is
    what costs memory on every device.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_params), RULES)
    values = jax.tree.leaves(nn.unbox(boxed_params))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    total = replicated_n = 0
    for v, spec in zip(values, spec_leaves, strict=True):
        n = math.prod(v.shape)
        total += n
        if not _uses_model_axes(spec, mesh):
            replicated_n += n
    return (replicated_n / total if total else 0.0), total


def check_divisible(boxed_params: Any, mesh: Mesh) -> None:
    """Refuse a mesh whose fsdp/tensor sizes do not divide the parameter dimensions they split
    (e.g. tensor=4 with 38 heads), naming the first such parameter, before anything compiles."""
    logical = jax.tree.leaves(nn.get_partition_spec(boxed_params), is_leaf=lambda x: isinstance(x, P))
    values = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed_params))
    for (path, v), names in zip(values, logical, strict=True):
        spec = mesh_axes(tuple(names))
        for dim, (size, name, axes) in enumerate(zip(v.shape, names, spec)):
            axes = _axes(axes)
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                raise errors.UserError(
                    f"mesh {dict(mesh.shape)}: parameter {jax.tree_util.keystr(path)} has "
                    f"{size} along '{name}' (dim {dim}), which does not split into {parts} "
                    f"({'×'.join(axes)}); choose mesh sizes that divide it")


def check_replication(boxed_params: Any, mesh: Mesh, max_fraction: float = 0.02,
                      min_params: int = 100_000_000) -> None:
    """Refuse a mesh that leaves a large (>= min_params) model mostly replicated on every device."""
    if mesh.size == 1:
        return  # nothing to shard over
    frac, total = replicated_fraction(boxed_params, mesh)
    if total >= min_params and frac > max_fraction:
        raise errors.UserError(
            f"{100 * frac:.1f}% of the {total / 1e6:.0f}M parameters are replicated on mesh "
            f"{dict(mesh.shape)} (limit {100 * max_fraction:g}%); use fsdp/tensor > 1 "
            f"or raise mesh.max_replicated")
