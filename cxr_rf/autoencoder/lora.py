"""LoRA for fine-tuning a pretrained Flax parameter tree (RadiT LoRA-fine-tunes FLUX.2's VAE).

Every selected kernel W gets a low-rank update, merged into the parameters before the model's
ordinary ``apply`` (so no module changes and no special layers):

    W' = stop_gradient(W) + (alpha / rank) · reshape(A_Ixr @ B_rxO, W.shape)

Kernel layouts (Flax): Dense [I, O]; Conv [kh, kw, in, O] (any number of spatial axes). The
fan-in I is the product of every axis but the last (a conv's LoRA factorises the kernel
flattened to (kh·kw·in) × out, i.e. it is a kh x kw conv to r channels followed by a 1x1 conv
to O, as peft's Conv2d LoRA). A is initialised like peft's (kaiming-uniform, bound 1/√I) and
B to zeros, so the merged tree equals the base exactly at init and training starts from the
pretrained model.

Only the LoRA tree is trained: differentiate with respect to it and hand it to the optimiser;
the base enters through stop_gradient, so even a gradient taken with respect to the base is
zero. Typical use in a train step:

    lora = init_lora(base, rank=16, alpha=16, rng=key)        # select: default_select
    opt_state = tx.init(lora)
    def loss_fn(lora):
        return objective(model.apply({"params": apply_lora(base, lora)}, batch))
    grads = jax.grad(loss_fn)(lora); updates, opt_state = tx.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    export = apply_lora(base, lora)                           # plain params for inference

Trees are unboxed (``nn.unbox`` a logically partitioned tree first). The factors are tiny;
replicate them (their PartitionSpec is P()). Paths are "/"-joined dict keys, e.g.
"decoder/conv_out/kernel".
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

Path = tuple[str, ...]
Select = Callable[[Path, jax.Array], bool]


@struct.dataclass
class Lora:
    """The trainable LoRA tree: ``factors[path] = {"a": [I, r], "b": [r, O]}`` (float32) and
    the static ``scale`` = alpha / rank (not a leaf: optimisers and gradients skip it)."""
    factors: dict[str, dict[str, jax.Array]]
    scale: float = struct.field(pytree_node=False, default=1.0)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(path) -> Path:
    return tuple(_key_str(k) for k in path)


def default_select(path: Path, leaf: jax.Array) -> bool:
    """Every Dense ([I, O]) and 2-D Conv ([kh, kw, in, O]) kernel."""
    return bool(path) and path[-1] == "kernel" and getattr(leaf, "ndim", 0) in (2, 4)


def init_lora(params: Any, rank: int, alpha: float | None = None, *,
              select: Select = default_select, rng: jax.Array) -> Lora:
    """LoRA factors for every leaf of ``params`` where ``select(path, leaf)``: A [I, r]
    ~ U(±1/√I), B [r, O] = 0. ``alpha`` defaults to ``rank`` (scale 1). ``rank`` larger than
    min(I, O) is allowed (then it is simply not low rank). Raises when nothing is selected
    (almost certainly a wrong selector) or a selected leaf has fewer than 2 axes."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    leaves = [(_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    chosen = [(p, x) for p, x in leaves if select(p, x)]
    if not chosen:
        raise ValueError("LoRA selected no parameter (check the select function and that "
                         "the tree is unboxed)")
    factors = {}
    for i, (p, x) in enumerate(chosen):
        if x.ndim < 2:
            raise ValueError(f"LoRA needs a kernel with >= 2 axes; {'/'.join(p)} has shape {x.shape}")
        fan_in, fan_out = math.prod(x.shape[:-1]), x.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, rank), jnp.float32,
                               -bound, bound)
        factors["/".join(p)] = {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)}
    return Lora(factors=factors, scale=float(alpha if alpha is not None else rank) / rank)


def delta(lora: Lora, path: str, shape: tuple[int, ...]) -> jax.Array:
    """The update scale · A @ B of one kernel, reshaped to its ``shape`` (float32)."""
    f = lora.factors[path]
    prec = jax.lax.Precision.HIGHEST   # a merge, not a hot matmul: keep it exact
    return (lora.scale * jnp.matmul(f["a"], f["b"], precision=prec)).reshape(shape)


def apply_lora(params: Any, lora: Lora) -> Any:
    """``params`` with every LoRA'd kernel replaced by stop_gradient(W) + delta, in W's dtype.
    The other leaves pass through unchanged (also stop-gradient: the base is frozen)."""
    seen = set()

    def merge(path, w):
        key = "/".join(_path(path))
        w0 = jax.lax.stop_gradient(w)
        if key not in lora.factors:
            return w0
        seen.add(key)
        return (w0.astype(jnp.float32) + delta(lora, key, w.shape)).astype(w.dtype)

    out = jax.tree_util.tree_map_with_path(merge, params)
    missing = set(lora.factors) - seen
    if missing:
        raise ValueError(f"LoRA factors for parameters not in the tree: {sorted(missing)[:5]}")
    return out


def num_params(lora: Lora) -> int:
    """Trainable parameter count of the LoRA tree."""
    return sum(x.size for x in jax.tree_util.tree_leaves(lora))
