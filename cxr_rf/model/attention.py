"""Joint-attention implementations, chosen per backend by ``cfg.model.attention``.

Every implementation computes the same function,

    out_BTNK = softmax(q_BTNK · k_BSNKᵀ / √K, masked to keep_BS) · v_BSNK,

with float32 logits, softmax and accumulation for any input dtype, output in the input dtype,
and exactly zero weight on the keys ``keep_BS`` (bool, optional) leaves out. At least one key
per example must be kept (a row with none has no softmax). ``tests/test_attention.py`` pins
each one that runs on a CPU to a float64 reference, values and gradients.

    auto     gpu: cudnn where cuDNN supports it (bf16/f16, head dim ≤ 128), else xla;
             tpu: splash; cpu: blocked from 256 keys on, else matmul (measured, see
             ``cpu_auto``).
    xla      jax.nn.dot_product_attention(implementation="xla").
    matmul   heads moved in front, two batched matmuls: XLA:CPU runs [B,N,T,K]x[B,N,K,S]
             about twice as fast as the head-interleaved einsum of "xla".
    cudnn    jax.nn.dot_product_attention(implementation="cudnn") (cuDNN flash attention).
             Where cuDNN cannot run it (f32, head dim, not a GPU) it falls back to xla with
             one logged warning saying why.
    splash   Pallas TPU splash attention, one kernel per shard (shard_map over the batch and
             head mesh axes). T and S are padded to the kernel's 128-multiple blocks inside
             the wrapper (padded keys masked through kv segment ids, padded queries dropped).
             Off TPU it runs in Pallas interpret mode (slow; for tests) with one warning.
    blocked  online-softmax (flash-style) attention over query and key tiles in jnp/lax, with
             a custom VJP that recomputes each tile's probabilities from the saved logsumexp:
             residuals are q, k, v, out and the logsumexp, never a [T, S] matrix.

The platform is the one the program is compiled for: the devices of the current mesh
(``sharding.use``) when there is one (the AOT planner compiles for TPU devices on a CPU host),
else ``jax.default_backend()``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from cxr_rf import sharding

IMPLEMENTATIONS = ("auto", "xla", "matmul", "cudnn", "splash", "blocked")

# blocked: the largest tiles. A sequence is cut into ceil(len / max) equal tiles (a multiple
# of 8 each, little padding). Key tiles of 64 were fastest at the bench shape on the 2-core
# box: the [B, N, T, 64] float32 tile stays in cache (BUILD_NOTES "Attention per backend").
BLOCK_Q = 512
BLOCK_K = 64
# "auto" on a CPU runs blocked from this many keys on, matmul below (see ``cpu_auto``).
CPU_BLOCKED_MIN_KV = 256
# blocked: outside differentiation (sampling, evaluation) tile loops up to this many trips
# are unrolled: 40% faster forward on XLA:CPU at the bench shape, and XLA's cost analysis,
# which counts a loop body once, sees every tile. Under jax.grad forward and backward stay
# loops: unrolled, forward+backward ran 25-60% slower.
UNROLL_MAX = 8

# splash: sequence lengths are padded to a multiple of this; the kernel's blocks are the
# largest multiple of it up to SPLASH_MAX_BLOCK that divides the padded length.
SPLASH_ALIGN = 128
SPLASH_MAX_BLOCK = 512

_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    """One absl warning per distinct reason for the life of the process (the block is traced
    once per layer kind and per program, a warning per trace would repeat)."""
    if key not in _warned:
        _warned.add(key)
        logging.warning(msg)


def check_name(name: str) -> None:
    """ValueError unless ``name`` is one of IMPLEMENTATIONS."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {name!r}; allowed: {', '.join(IMPLEMENTATIONS)}")


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": where the program being traced will run."""
    mesh = sharding._CURRENT.get()  # the mesh of sharding.use, which knows the target devices
    if mesh is not None:
        platform = mesh.devices.flat[0].platform
    else:
        platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def _cudnn_unsupported(dtype, head_dim: int, platform: str) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None when it can."""
    if platform != "gpu":
        return f"the backend is {platform}, not gpu"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"inputs are {jnp.dtype(dtype).name}; cuDNN flash attention takes bf16/f16"
    if head_dim % 8 or head_dim > 128:
        return f"head dim {head_dim} is not a multiple of 8 up to 128"
    return None


def cpu_auto(kv_len: int) -> str:
    """What "auto" runs on a CPU, measured on the 2-core box (BUILD_NOTES "Attention per
    backend"): at the shared bench shape (S = 320) blocked did the attention forward+backward
    in 2/3 of matmul's CPU time, 1/4 to 1/2 of its wall time; at S = 160 and S = 83 (the smoke
    run) matmul was 10-20% faster, and blocked only adds scan loops to compile."""
    return "blocked" if kv_len >= CPU_BLOCKED_MIN_KV else "matmul"


def resolve(name: str, dtype, head_dim: int, platform: str | None = None,
            kv_len: int = 0) -> str:
    """The implementation that runs for ``name`` (``auto`` and an unsupported ``cudnn``
    become a concrete one); ``kv_len`` is S, which the CPU choice depends on."""
    check_name(name)
    platform = platform or target_platform()
    if name == "auto":
        if platform == "gpu":
            return "xla" if _cudnn_unsupported(dtype, head_dim, platform) else "cudnn"
        return "splash" if platform == "tpu" else cpu_auto(kv_len)
    if name == "cudnn":
        why = _cudnn_unsupported(dtype, head_dim, platform)
        if why:
            _warn_once(f"cudnn:{why}", f"attention 'cudnn' falls back to 'xla': {why}")
            return "xla"
    return name


def attention(q_BTNK: jax.Array, k_BSNK: jax.Array, v_BSNK: jax.Array,
              keep_BS: jax.Array | None = None, *, implementation: str = "auto") -> jax.Array:
    """Joint attention by the named implementation (see the module docstring)."""
    impl = resolve(implementation, q_BTNK.dtype, q_BTNK.shape[-1], kv_len=k_BSNK.shape[1])
    return _IMPLS[impl](q_BTNK, k_BSNK, v_BSNK, keep_BS)


# ------------------------------------------------------------------------------ xla, cudnn

def _xla(q_BTNK, k_BSNK, v_BSNK, keep_BS):
    mask = None if keep_BS is None else keep_BS[:, None, None, :]
    return jax.nn.dot_product_attention(q_BTNK, k_BSNK, v_BSNK, mask=mask, implementation="xla")


def _cudnn(q_BTNK, k_BSNK, v_BSNK, keep_BS):
    mask = None
    if keep_BS is not None:
        # A full [B, 1, T, S] mask: jax turns it into a bias, and cuDNN's bias broadcasts over
        # batch and heads but not (in every version) over the query axis.
        b, t, s = q_BTNK.shape[0], q_BTNK.shape[1], k_BSNK.shape[1]
        mask = jnp.broadcast_to(keep_BS[:, None, None, :], (b, 1, t, s))
    return jax.nn.dot_product_attention(q_BTNK, k_BSNK, v_BSNK, mask=mask,
                                        implementation="cudnn")


# ---------------------------------------------------------------------------------- matmul

def _matmul(q_BTNK, k_BSNK, v_BSNK, keep_BS):
    scale = 1.0 / math.sqrt(q_BTNK.shape[-1])
    q_BNTK = jnp.swapaxes(q_BTNK, 1, 2)
    k_BNKS = jnp.transpose(k_BSNK, (0, 2, 3, 1))
    v_BNSK = jnp.swapaxes(v_BSNK, 1, 2)
    logits_BNTS = jnp.matmul(q_BNTK, k_BNKS, preferred_element_type=jnp.float32) * scale
    if keep_BS is not None:
        logits_BNTS = jnp.where(keep_BS[:, None, None, :], logits_BNTS, -jnp.inf)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(v_BSNK.dtype)
    return jnp.swapaxes(jnp.matmul(probs_BNTS, v_BNSK), 1, 2)


# --------------------------------------------------------------------------------- blocked
# Lower-case suffix letters are tile axes: q / k the query / key tile index (leading, scanned),
# t / s a position inside a query / key tile; e.g. k_kBNsK is K split into key tiles.

def _tiles(n: int, max_tile: int) -> tuple[int, int]:
    """(tile, count) covering n: ceil(n / max_tile) tiles of equal size, rounded up to a
    multiple of 8 (SIMD width, no ragged vector tails), unless one tile holds all of n."""
    count = -(-n // max_tile)
    if count == 1:
        return n, 1
    tile = _round_up(-(-n // count), 8)
    return tile, -(-n // tile)


def _to_tiles(x_BLNK: jax.Array, tile: int, count: int) -> jax.Array:
    """[B, L, N, K] -> [count, B, N, tile, K], zero-padded along L."""
    b, n_len, heads, k = x_BLNK.shape
    x_BLNK = jnp.pad(x_BLNK, ((0, 0), (0, tile * count - n_len), (0, 0), (0, 0)))
    return x_BLNK.reshape(b, count, tile, heads, k).transpose(1, 0, 3, 2, 4)


def _blocked(q_BTNK, k_BSNK, v_BSNK, keep_BS, block_q: int | None = None,
             block_k: int | None = None):
    b, t, _, k = q_BTNK.shape
    s = k_BSNK.shape[1]
    # Read at call time, so a benchmark or test can set the module's tile sizes.
    tq, nq = _tiles(t, block_q or BLOCK_Q)
    tk, nk = _tiles(s, block_k or BLOCK_K)
    if keep_BS is None:
        keep_BS = jnp.ones((b, s), bool)
    # Padded keys are masked like report padding; padded queries are computed and dropped.
    keep_BS = jnp.pad(keep_BS, ((0, 0), (0, tk * nk - s)))
    keep_tBs = keep_BS.reshape(b, nk, tk).transpose(1, 0, 2)
    out_tBNtK = _flash(_to_tiles(q_BTNK, tq, nq), _to_tiles(k_BSNK, tk, nk),
                       _to_tiles(v_BSNK, tk, nk), keep_tBs, 1.0 / math.sqrt(k))
    out_BTNK = out_tBNtK.transpose(1, 0, 3, 2, 4).reshape(b, tq * nq, -1, k)
    return out_BTNK[:, :t]


def _scan(f, init, xs, unroll_max: int = 0):
    """lax.scan over the leading (tile) axis, fully unrolled up to ``unroll_max`` trips."""
    n = jax.tree.leaves(xs)[0].shape[0]
    return jax.lax.scan(f, init, xs, unroll=n <= unroll_max)


def _logits(q_BNtK, k_BNsK, keep_Bs, scale):
    """Scaled float32 logits of one (query tile, key tile), -inf where a key is not kept."""
    s_BNts = jnp.einsum("bntk,bnsk->bnts", q_BNtK, k_BNsK,
                        preferred_element_type=jnp.float32) * scale
    return jnp.where(keep_Bs[:, None, None, :], s_BNts, -jnp.inf)


def _flash_fwd_tiles(q_qBNtK, k_kBNsK, v_kBNsK, keep_kBs, scale, unroll_max: int = 0):
    """(out [nq, B, N, tq, K] in q's dtype, logsumexp [nq, B, N, tq] float32)."""
    def one_query_tile(q_BNtK):
        def step(carry, kv):
            m_BNt, l_BNt, acc_BNtK = carry
            k_BNsK, v_BNsK, keep_Bs = kv
            s_BNts = _logits(q_BNtK, k_BNsK, keep_Bs, scale)
            m_new = jnp.maximum(m_BNt, s_BNts.max(-1))
            # A tile whose keys are all masked leaves m at -inf: shift by 0 there so that
            # exp(-inf - shift) is 0, not NaN.
            shift_BNt = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p_BNts = jnp.exp(s_BNts - shift_BNt[..., None])
            alpha_BNt = jnp.exp(m_BNt - shift_BNt)
            l_BNt = alpha_BNt * l_BNt + p_BNts.sum(-1)
            acc_BNtK = alpha_BNt[..., None] * acc_BNtK + jnp.einsum(
                "bnts,bnsk->bntk", p_BNts.astype(v_BNsK.dtype), v_BNsK,
                preferred_element_type=jnp.float32)
            return (m_new, l_BNt, acc_BNtK), None

        shape = q_BNtK.shape[:-1]
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q_BNtK.shape[:-1] + v_kBNsK.shape[-1:], jnp.float32))
        (m_BNt, l_BNt, acc_BNtK), _ = _scan(step, init, (k_kBNsK, v_kBNsK, keep_kBs),
                                            unroll_max)
        out_BNtK = (acc_BNtK / l_BNt[..., None]).astype(q_BNtK.dtype)
        return out_BNtK, m_BNt + jnp.log(l_BNt)

    return _scan(lambda _, q_BNtK: (None, one_query_tile(q_BNtK)), None, q_qBNtK,
                 unroll_max)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_qBNtK, k_kBNsK, v_kBNsK, keep_kBs, scale):
    # Not differentiated: the unrolled forward (see UNROLL_MAX).
    return _flash_fwd_tiles(q_qBNtK, k_kBNsK, v_kBNsK, keep_kBs, scale, UNROLL_MAX)[0]


def _flash_fwd(q_qBNtK, k_kBNsK, v_kBNsK, keep_kBs, scale):
    out, lse_qBNt = _flash_fwd_tiles(q_qBNtK, k_kBNsK, v_kBNsK, keep_kBs, scale)
    return out, (q_qBNtK, k_kBNsK, v_kBNsK, keep_kBs, out, lse_qBNt)


def _flash_bwd(scale, res, g_qBNtK):
    """Flash-attention backward: per key tile, per query tile, P = exp(logits - lse);
    dV += Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)), dQ += dS K, dK += dSᵀ Q (× scale)."""
    q_qBNtK, k_kBNsK, v_kBNsK, keep_kBs, out_qBNtK, lse_qBNt = res
    dt = q_qBNtK.dtype
    delta_qBNt = jnp.sum(g_qBNtK.astype(jnp.float32) * out_qBNtK.astype(jnp.float32), -1)

    def one_key_tile(dq_qBNtK, kv):
        k_BNsK, v_BNsK, keep_Bs = kv

        def one_query_tile(carry, qs):
            dk_BNsK, dv_BNsK = carry
            q_BNtK, g_BNtK, lse_BNt, delta_BNt = qs
            # Masked keys have -inf logits, so exactly 0 probability and 0 gradient.
            p_BNts = jnp.exp(_logits(q_BNtK, k_BNsK, keep_Bs, scale) - lse_BNt[..., None])
            dv_BNsK += jnp.einsum("bnts,bntk->bnsk", p_BNts.astype(dt), g_BNtK,
                                  preferred_element_type=jnp.float32)
            dp_BNts = jnp.einsum("bntk,bnsk->bnts", g_BNtK, v_BNsK,
                                 preferred_element_type=jnp.float32)
            ds_BNts = (p_BNts * (dp_BNts - delta_BNt[..., None]) * scale).astype(dt)
            dk_BNsK += jnp.einsum("bnts,bntk->bnsk", ds_BNts, q_BNtK,
                                  preferred_element_type=jnp.float32)
            dq_BNtK = jnp.einsum("bnts,bnsk->bntk", ds_BNts, k_BNsK,
                                 preferred_element_type=jnp.float32)
            return (dk_BNsK, dv_BNsK), dq_BNtK

        init = (jnp.zeros(k_BNsK.shape, jnp.float32), jnp.zeros(v_BNsK.shape, jnp.float32))
        (dk_BNsK, dv_BNsK), ddq_qBNtK = _scan(
            one_query_tile, init, (q_qBNtK, g_qBNtK, lse_qBNt, delta_qBNt))
        return dq_qBNtK + ddq_qBNtK, (dk_BNsK, dv_BNsK)

    dq_qBNtK, (dk_kBNsK, dv_kBNsK) = _scan(
        one_key_tile, jnp.zeros(q_qBNtK.shape, jnp.float32), (k_kBNsK, v_kBNsK, keep_kBs))
    return (dq_qBNtK.astype(dt), dk_kBNsK.astype(k_kBNsK.dtype),
            dv_kBNsK.astype(v_kBNsK.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------- splash

_SEQ_BTNK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _splash_block(padded: int) -> int:
    """The largest multiple of SPLASH_ALIGN up to SPLASH_MAX_BLOCK that divides ``padded``."""
    return max(b for b in range(SPLASH_ALIGN, SPLASH_MAX_BLOCK + 1, SPLASH_ALIGN)
               if padded % b == 0)


def _splash_kernel(heads: int, t_pad: int, s_pad: int, interpret: bool):
    """A splash MHA kernel over a full (non-causal) [t_pad, s_pad] mask; padding and report
    masking come from segment ids, so one kernel serves every batch. Built per trace, not
    cached: it holds arrays made while tracing, which would leak into the next trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # imports Pallas TPU
    bq, bkv = _splash_block(t_pad), _splash_block(s_pad)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((t_pad, s_pad))] * heads)
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q_BTNK, k_BSNK, v_BSNK, keep_BS, *, interpret: bool):
    """Splash attention of one shard's examples and heads (the kernel sees [N, T, K] per
    example; vmap runs it over the local batch)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    _, t, n, k = q_BTNK.shape
    s = k_BSNK.shape[1]
    t_pad, s_pad = _round_up(t, SPLASH_ALIGN), _round_up(s, SPLASH_ALIGN)
    kernel = _splash_kernel(n, t_pad, s_pad, interpret)
    # The kernel does not scale the logits.
    q_BTNK = q_BTNK * jnp.asarray(1.0 / math.sqrt(k), q_BTNK.dtype)
    pad = lambda x, n_pad: jnp.pad(x, ((0, 0), (0, n_pad - x.shape[1]), (0, 0), (0, 0)))
    q_BNTK = jnp.swapaxes(pad(q_BTNK, t_pad), 1, 2)
    k_BNSK = jnp.swapaxes(pad(k_BSNK, s_pad), 1, 2)
    v_BNSK = jnp.swapaxes(pad(v_BSNK, s_pad), 1, 2)
    # Segment ids: every query is in segment 1, a key only when kept; padded keys are not.
    # Padded queries see the kept keys (no empty softmax row) and are dropped below.
    seg_kv_BS = jnp.pad(keep_BS, ((0, 0), (0, s_pad - s))).astype(jnp.int32)
    seg_q_T = jnp.ones((t_pad,), jnp.int32)

    def one(q_NTK, k_NSK, v_NSK, seg_kv_S):
        return kernel(q_NTK, k_NSK, v_NSK, segment_ids=sa.SegmentIds(q=seg_q_T, kv=seg_kv_S))

    out_BNTK = jax.vmap(one)(q_BNTK, k_BNSK, v_BNSK, seg_kv_BS)
    return jnp.swapaxes(out_BNTK, 1, 2)[:, :t]


def _divisible_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
    """``spec`` with the axes that do not divide their dimension left out (replicated there):
    model init traces the model at batch 1 under the training mesh."""
    out = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        out.append(entry if size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return P(*out)


def _splash(q_BTNK, k_BSNK, v_BSNK, keep_BS):
    platform = target_platform()
    interpret = platform != "tpu"
    if interpret:
        _warn_once("splash:interpret", f"attention 'splash' runs in Pallas interpret mode on "
                                       f"{platform}: correct but slow, meant for tests")
    if keep_BS is None:
        keep_BS = jnp.ones(k_BSNK.shape[:2], bool)
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = sharding._CURRENT.get()
    if mesh is None or mesh.size == 1:
        return local(q_BTNK, k_BSNK, v_BSNK, keep_BS)
    # A Pallas kernel is not partitioned by XLA: run it per shard, on the layout the block's
    # sharding.constrain already gives q, k, v (batch over data×fsdp, heads over tensor).
    spec_BTNK = _divisible_spec(sharding.mesh_axes(_SEQ_BTNK), q_BTNK.shape, mesh)
    spec_BS = P(spec_BTNK[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec_BTNK, spec_BTNK, spec_BTNK, spec_BS),
                         out_specs=spec_BTNK, check_vma=False)(q_BTNK, k_BSNK, v_BSNK, keep_BS)


_IMPLS = {"xla": _xla, "matmul": _matmul, "cudnn": _cudnn, "splash": _splash,
          "blocked": _blocked}
