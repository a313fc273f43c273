"""The two-stream MMDiT (SD3) over pixel patches, conditioned on structured context tokens.

    x_BHWC ─patchify─ Dense ─(+2D sincos)─┐                t_B ─sinusoid─MLP─┐
    tokens_BL ─Embed(+learned pos)────────┤── pooled first NUM_STRUCTURED ─MLP─(+)─> c_BD
                                          ▼
         (depth-1) × MMDiTBlock  (nn.scan or loop; optional remat)   adaLN-Zero from c
         1 × MMDiTBlock(context_pre_only)  context only feeds k, v
                                          ▼
         final adaLN + LayerNorm + zero-init Dense(p*p*C) ─unpatchify─> out_BHWC (float32)

Each block keeps separate weights per stream (image x, context ctx) and runs one joint
attention over [x; ctx]. The analytic ``param_count`` and ``flops_per_image`` below mirror the
modules term by term; tests check the first against the real parameter tree.

Shape suffixes (the legend; every letter has one meaning in the whole package):

    B  batch (images)                  H, W  image height, width in pixels
    C  image channels                  P     pixel features of one patch, p·p·C
    I  image tokens, (H/p)·(W/p)       L     context tokens, NUM_STRUCTURED + report_len
    T  token positions of a stream or of the queries (I, L; I + L in joint attention, I in
       the last block)
    S  key/value positions, I + L      D     model width
    N  attention heads                 K     head dim, D/N
    M  MLP hidden, mlp_ratio·D         F     sinusoidal timestep features (FREQ_DIM)
    V  context-token vocabulary        X     adaLN modulation outputs, n·D
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_rf import conditioning, errors, sharding
from cxr_rf.model import attention, layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs, as plain hashable values (a valid flax Module field).

    ``ModelConfig(**cfg.model, report_len=cfg.data.report_len)`` is the one path from an
    experiment config (``from_config``); each field is a ``cfg.model`` key of the same name,
    validated in ``__post_init__``.
    """
    patch: int = 4               # p: pixels per patch side
    width: int = 64              # D
    depth: int = 2               # blocks (the last one context_pre_only)
    heads: int = 2               # N; head dim K = D/N
    mlp_ratio: float = 4.0       # M = mlp_ratio·D
    in_channels: int = 1         # C
    qk_norm: bool = True         # RMSNorm on q and k (SD3)
    pos_embed: str = "sincos"    # "sincos" (2D, added) or "rope" (2D axial rotary on q, k)
    rope_theta: float = 10_000.0
    scan: bool = True            # nn.scan over the depth-1 regular blocks
    scan_unroll: int = 1         # blocks per trip of that scan (lax.scan unroll; >= depth-1: all)
    remat: str = "none"          # see layers.REMAT_POLICIES
    attention: str = "auto"      # see attention.IMPLEMENTATIONS (picked per backend by "auto")
    dtype: str = "float32"       # compute dtype
    param_dtype: str = "float32"
    report_len: int = 0          # report bytes in the context (L = NUM_STRUCTURED + report_len)
    vocab_size: int = dataclasses.field(default_factory=conditioning.vocab_size)   # V

    def __post_init__(self):
        def bad(msg):
            raise errors.UserError(f"model config: {msg}")
        for name in ("patch", "width", "depth", "heads", "in_channels", "vocab_size",
                     "scan_unroll"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.report_len < 0:
            bad(f"report_len must be >= 0, got {self.report_len}")
        if self.width % self.heads:
            bad(f"width {self.width} is not divisible by heads {self.heads}")
        if not self.mlp_ratio > 0 or self.mlp_dim < 1:
            bad(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.pos_embed not in layers.POS_EMBEDS:
            bad(f"unknown pos_embed {self.pos_embed!r}; allowed: {', '.join(layers.POS_EMBEDS)}")
        if self.pos_embed == "sincos" and self.width % 4:
            bad(f"pos_embed 'sincos' needs width divisible by 4, got {self.width}")
        if self.pos_embed == "rope" and self.head_dim % 4:
            bad(f"pos_embed 'rope' needs head_dim = width/heads divisible by 4, got {self.head_dim}")
        if not self.rope_theta > 1:
            bad(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.remat not in layers.REMAT_POLICIES:
            bad(f"unknown remat policy {self.remat!r}; allowed: {', '.join(layers.REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            bad(f"unknown attention {self.attention!r}; allowed: "
                f"{', '.join(attention.IMPLEMENTATIONS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"unknown {name} {getattr(self, name)!r}; allowed: {', '.join(DTYPES)}")

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelConfig":
        """The model of a full experiment config: ``cfg.model`` plus ``cfg.data.report_len``."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"report_len", "vocab_size"}
        unknown = sorted(set(cfg.model.keys()) - fields)
        if unknown:
            raise errors.UserError(f"unknown model config key(s) {unknown}; allowed: "
                                   f"{', '.join(sorted(fields))}")
        return cls(**cfg.model, report_len=int(cfg.data.get("report_len", 0)))

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_ratio * self.width)

    @property
    def ctx_len(self) -> int:
        """Context tokens per example: NUM_STRUCTURED + report_len."""
        return conditioning.num_tokens(self.report_len)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def check_resolution(self, height: int, width: int | None = None) -> None:
        """UserError unless the image size is a positive multiple of the patch."""
        for side in (height, height if width is None else width):
            if side < 1 or side % self.patch:
                raise errors.UserError(f"resolution {side} is not a positive multiple of patch "
                                       f"{self.patch}")


# Logical names of the activations (sharding.RULES places them; weights have their own names).
_SEQ_BTNK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
_EMB_BID = ("activation_batch", "activation_length", "activation_embed")


class MMDiTBlock(nn.Module):
    """One SD3 MMDiT block; ``context_pre_only`` makes the context stream only feed k, v.

    Signature fits nn.scan: ``((x_BID, ctx_BLD), c_BD, rope, keep_BS) -> ((x_BID, ctx_BLD),
    None)``; ``keep_BS`` marks the keys queries may attend to (report padding is masked). A
    context_pre_only block returns the context unchanged.
    """
    cfg: ModelConfig
    context_pre_only: bool = False

    @nn.compact
    def __call__(self, carry, c_BD, rope, keep_BS):
        x_BID, ctx_BLD = carry
        cfg, n_img = self.cfg, x_BID.shape[1]
        D, N, K = cfg.width, cfg.heads, cfg.head_dim
        dt = cfg.compute_dtype
        kw = dict(dtype=dt, param_dtype=cfg.params_dtype)
        seq = _SEQ_BTNK

        # adaLN-Zero: per stream, shift/scale/gate for attention (msa) and for the MLP.
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = layers.Modulation(6, D, name="x_mod", **kw)(c_BD)
        if self.context_pre_only:
            c_shift_msa, c_scale_msa = layers.Modulation(2, D, name="ctx_mod", **kw)(c_BD)
        else:
            (c_shift_msa, c_scale_msa, c_gate_msa,
             c_shift_mlp, c_scale_mlp, c_gate_mlp) = layers.Modulation(
                6, D, name="ctx_mod", **kw)(c_BD)
        hx_BID = layers.modulate(layers.layer_norm(dt)(x_BID), shift_msa, scale_msa)
        hc_BLD = layers.modulate(layers.layer_norm(dt)(ctx_BLD), c_shift_msa, c_scale_msa)

        def qk(h, stream, which):
            y = layers.heads_proj(N, K, name=f"{stream}_{which}", **kw)(h)
            if cfg.qk_norm:
                y = layers.RMSNorm(name=f"{stream}_{which}_norm", **kw)(y)
            return y

        qx_BINK, kx_BINK = qk(hx_BID, "x", "q"), qk(hx_BID, "x", "k")
        vx_BINK = layers.heads_proj(N, K, name="x_v", **kw)(hx_BID)
        if rope is not None:  # 2D axial rotary on image tokens only; context is unrotated
            qx_BINK, kx_BINK = layers.apply_rope(qx_BINK, *rope), layers.apply_rope(kx_BINK, *rope)
        kc_BLNK = qk(hc_BLD, "ctx", "k")
        vc_BLNK = layers.heads_proj(N, K, name="ctx_v", **kw)(hc_BLD)
        k_BSNK = sharding.constrain(jnp.concatenate([kx_BINK, kc_BLNK], axis=1), seq)
        v_BSNK = sharding.constrain(jnp.concatenate([vx_BINK, vc_BLNK], axis=1), seq)
        if self.context_pre_only:
            # Context outputs would be discarded, so only image queries attend.
            q_BTNK = qx_BINK
        else:
            q_BTNK = jnp.concatenate([qx_BINK, qk(hc_BLD, "ctx", "q")], axis=1)
        o_BTNK = sharding.constrain(
            layers.joint_attention(sharding.constrain(q_BTNK, seq), k_BSNK, v_BSNK, keep_BS,
                                   implementation=cfg.attention),
            seq)

        x_BID = x_BID + gate_msa * layers.out_proj(D, name="x_out", **kw)(o_BTNK[:, :n_img])
        x_BID = x_BID + gate_mlp * layers.Mlp(cfg.mlp_dim, name="x_mlp", **kw)(
            layers.modulate(layers.layer_norm(dt)(x_BID), shift_mlp, scale_mlp))
        x_BID = sharding.constrain(x_BID, _EMB_BID)
        if not self.context_pre_only:
            ctx_BLD = ctx_BLD + c_gate_msa * layers.out_proj(D, name="ctx_out", **kw)(
                o_BTNK[:, n_img:])
            ctx_BLD = ctx_BLD + c_gate_mlp * layers.Mlp(cfg.mlp_dim, name="ctx_mlp", **kw)(
                layers.modulate(layers.layer_norm(dt)(ctx_BLD), c_shift_mlp, c_scale_mlp))
            ctx_BLD = sharding.constrain(ctx_BLD, _EMB_BID)
        return (x_BID, ctx_BLD), None


def _block_class(cfg: ModelConfig, prevent_cse: bool):
    """MMDiTBlock, wrapped in nn.remat with the named policy unless remat == "none"."""
    if cfg.remat == "none":
        return MMDiTBlock
    return nn.remat(MMDiTBlock, policy=layers.remat_policy(cfg.remat), prevent_cse=prevent_cse)


class MMDiT(nn.Module):
    """Velocity (or x) predictor: ``(x_BHWC, t_B, tokens_BL) -> out_BHWC`` in float32."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, t_B: jax.Array, tokens_BL: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, height, width, chans = x_BHWC.shape
        cfg.check_resolution(height, width)
        if chans != cfg.in_channels:
            raise errors.UserError(f"input has {chans} channels, model expects {cfg.in_channels}")
        if tokens_BL.shape != (b, cfg.ctx_len):
            raise errors.UserError(f"tokens shape {tokens_BL.shape} != (batch, ctx_len) = "
                                   f"{(b, cfg.ctx_len)} (report_len {cfg.report_len})")
        p, D, dt = cfg.patch, cfg.width, cfg.compute_dtype
        gh, gw = height // p, width // p
        kw = dict(dtype=dt, param_dtype=cfg.params_dtype)

        # Image stream.
        x_BID = layers.dense(D, ("patch", "embed"), name="x_embed", **kw)(
            layers.patchify(x_BHWC.astype(dt), p))
        rope = None
        if cfg.pos_embed == "sincos":
            x_BID = x_BID + jnp.asarray(layers.sincos_2d(gh, gw, D), dt)[None]
        else:
            rope = tuple(jnp.asarray(a)
                         for a in layers.rope_2d(gh, gw, cfg.head_dim, cfg.rope_theta))
        x_BID = sharding.constrain(x_BID, _EMB_BID)

        # Context stream: shared token table + learned positions; each std 1/sqrt(2) so the
        # sum starts at unit scale. A known age (an id beyond the table) is the table's
        # "age value" row plus a projection of Fourier features of its years.
        init = nn.initializers.normal(2 ** -0.5)
        is_age_BL = tokens_BL >= cfg.vocab_size
        tok_BLD = nn.Embed(cfg.vocab_size, D, name="ctx_embed",
                           embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                           **kw)(jnp.where(is_age_BL, conditioning.age_value_row(), tokens_BL))
        age_BD = layers.dense(D, ("freq", "embed"), name="age_embed", **kw)(
            layers.age_features(conditioning.age_years(tokens_BL[:, conditioning.AGE_POS])))
        tok_BLD = tok_BLD + jnp.where(is_age_BL[..., None], age_BD[:, None].astype(dt), 0)
        pos_LD = self.param("ctx_pos", nn.with_logical_partitioning(init, ("ctx", "embed")),
                            (cfg.ctx_len, D), cfg.params_dtype)
        ctx_BLD = sharding.constrain(tok_BLD + pos_LD.astype(dt)[None], _EMB_BID)

        # adaLN input: timestep embedding + pooled structured metadata (not report bytes).
        pooled_BD = jnp.mean(tok_BLD[:, :conditioning.NUM_STRUCTURED].astype(jnp.float32),
                             axis=1).astype(dt)
        pooled_BD = layers.dense(D, ("embed", "mlp"), name="pool_fc1", **kw)(pooled_BD)
        pooled_BD = layers.dense(D, ("mlp", "embed"), name="pool_fc2", **kw)(nn.silu(pooled_BD))
        c_BD = layers.TimestepEmbedder(D, name="t_embed", **kw)(t_B) + pooled_BD
        c_BD = sharding.constrain(c_BD, ("activation_batch", "activation_embed"))

        # Keys a query may attend to: every image token and every context token but report
        # padding (so the padding of a short report changes nothing).
        keep_BS = jnp.concatenate([jnp.ones((b, gh * gw), bool),
                                   tokens_BL != conditioning.report_pad_id()], axis=1)

        carry = (x_BID, ctx_BLD)
        if cfg.depth > 1:
            if cfg.scan:
                blocks = nn.scan(_block_class(cfg, prevent_cse=False),
                                 variable_axes={"params": 0}, split_rngs={"params": True},
                                 in_axes=(nn.broadcast,) * 3, length=cfg.depth - 1,
                                 unroll=min(cfg.scan_unroll, cfg.depth - 1),
                                 metadata_params={nn.PARTITION_NAME: "layers"})
                carry, _ = blocks(cfg, name="blocks")(carry, c_BD, rope, keep_BS)
            else:
                block_cls = _block_class(cfg, prevent_cse=True)
                for i in range(cfg.depth - 1):
                    carry, _ = block_cls(cfg, name=f"blocks_{i}")(carry, c_BD, rope, keep_BS)
        (x_BID, _), _ = _block_class(cfg, prevent_cse=True)(
            cfg, context_pre_only=True, name="last_block")(carry, c_BD, rope, keep_BS)

        # Final layer: zero-init projection, so the untrained model outputs exactly zero. It
        # runs in float32 whatever the compute dtype: under bf16 a bf16 output would carry
        # ~8 bits, and the pixels (x-prediction) or velocities are what the user keeps.
        f32 = dict(dtype=jnp.float32, param_dtype=cfg.params_dtype)
        shift, scale = layers.Modulation(2, D, name="final_mod", **f32)(c_BD.astype(jnp.float32))
        x_BID = layers.modulate(layers.layer_norm(jnp.float32)(x_BID.astype(jnp.float32)),
                                shift, scale)
        out_BIP = layers.dense(p * p * cfg.in_channels, ("embed", "patch"), zero=True,
                               name="final_proj", **f32)(x_BID)
        return layers.unpatchify(out_BIP, height, width, p, cfg.in_channels)


# --------------------------------------------------------------------------------------------
# Analytic size and cost. Kept next to the modules they mirror; tests pin them to the real tree.
# --------------------------------------------------------------------------------------------

def param_count(mcfg: ModelConfig) -> int:
    """Exact number of parameters, closed form (no model is built). No parameter depends on
    the resolution (positions are sin-cos or rotary, computed per call)."""
    D, M, K = mcfg.width, mcfg.mlp_dim, mcfg.head_dim
    P = mcfg.patch ** 2 * mcfg.in_channels      # pixel features per patch
    V, L, F = mcfg.vocab_size, mcfg.ctx_len, layers.FREQ_DIM
    qk = 2 * K if mcfg.qk_norm else 0            # RMSNorm scales for q and k (one per stream)
    k_only = K if mcfg.qk_norm else 0            # context_pre_only: k norm only
    # One full stream of a regular block.
    stream = ((6 * D * D + 6 * D)                # adaLN-Zero modulation D -> 6D
              + 3 * (D * D + D)                  # q, k, v projections
              + qk                               # q/k RMSNorm scales
              + (D * D + D)                      # attention output projection
              + (D * M + M) + (M * D + D))       # MLP
    block = 2 * stream                           # image + context streams
    last = (stream                               # image stream is complete
            + (2 * D * D + 2 * D)                # context modulation: shift, scale only
            + 2 * (D * D + D)                    # context k, v (no q, no out proj, no MLP)
            + k_only)
    embed = ((P * D + D)                         # patch embedding
             + V * D + L * D                     # context token table + learned positions
             + (layers.AGE_FEATURES * D + D)     # continuous age: Fourier features -> D
             + (D * D + D) * 2                   # pooled-conditioning MLP
             + (F * D + D) + (D * D + D))        # timestep MLP
    final = (2 * D * D + 2 * D) + (D * P + P)    # final modulation + zero-init projection
    return (mcfg.depth - 1) * block + last + embed + final


def approx_param_count(mcfg: ModelConfig) -> int:
    """SD3-style leading term: depth * (20 + 4*mlp_ratio) * width^2.

    Per block and stream: modulation 6D² + qkv 3D² + out 1D² + MLP 2·r·D² = (10 + 2r)D²;
    two streams give (20 + 4r)D² = 36D² at r = 4, i.e. SD3's 36·depth·(64·depth)² with
    width = 64·depth. The exact count differs by the embeddings/final layer (+~5D² + V·D)
    and the lighter context_pre_only block (-13D² at r = 4), so this overestimates the exact
    count by 1.8% at depth 12, 0.95% at depth 24, 0.6% at depth 38 (tests assert < 3%).
    """
    return int(mcfg.depth * (20 + 4 * mcfg.mlp_ratio) * mcfg.width ** 2)


def flops_per_image(mcfg: ModelConfig, resolution: int) -> float:
    """Analytic forward FLOPs for one image at ``resolution``² (2 × multiply-adds of matmuls).

    Counts every Dense/einsum including attention scores (QKᵀ) and AV over the joint sequence
    S = I + L; ignores norms, activations, rotary and softmax (elementwise, < 1%). A training
    step costs ~3× this (forward + backward ≈ 2× forward), plus one more forward of the
    rematerialised blocks with remat "full" (~4×); "dots"/"save_attn" recompute less.
    """
    mcfg.check_resolution(resolution)
    D, M, p, C = mcfg.width, mcfg.mlp_dim, mcfg.patch, mcfg.in_channels
    I = (resolution // p) ** 2                   # image tokens
    L, F, P = mcfg.ctx_len, layers.FREQ_DIM, p * p * C
    S = I + L
    per_tok = 3 * D * D + D * D + 2 * D * M      # qkv + out proj + MLP multiply-adds per token
    block = (S * per_tok                         # both streams, all tokens
             + 2 * S * S * D                     # scores + AV (summed over heads: H·K = D)
             + 2 * 6 * D * D)                    # two modulation Denses (once per image)
    last = (I * per_tok                          # image stream
            + L * 2 * D * D                      # context k, v only
            + 2 * I * S * D                      # image queries over joint keys
            + (6 + 2) * D * D)                   # modulations
    embed = I * P * D + (F * D + D * D) + 2 * D * D + layers.AGE_FEATURES * D
    final = 2 * D * D + I * D * P
    macs = (mcfg.depth - 1) * block + last + embed + final
    return 2.0 * macs


def build_model(cfg: Any) -> MMDiT:
    """The MMDiT for a full experiment config (ml_collections) or a ModelConfig."""
    mcfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_config(cfg)
    return MMDiT(mcfg)


def example_inputs(mcfg: ModelConfig, resolution: int, batch: int = 1):
    """Zero (x_BHWC, t_B, tokens_BL) of the right shapes and dtypes: what ``init`` traces."""
    mcfg.check_resolution(resolution)
    return (jnp.zeros((batch, resolution, resolution, mcfg.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, mcfg.ctx_len), jnp.int32))


def init_params(model: MMDiT, rng: jax.Array, resolution: int, batch: int = 1):
    """Initial params, BOXED: leaves are ``nn.Partitioned`` holding logical axis names.

    ``nn.get_partition_spec(params)`` gives the logical specs; ``nn.meta.unbox(params)`` the
    plain arrays. ``model.apply({"params": params}, ...)`` accepts either form.
    """
    return model.init(rng, *example_inputs(model.cfg, resolution, batch))["params"]


def abstract_params(model: MMDiT, resolution: int, batch: int = 1):
    """Boxed ShapeDtypeStruct tree of the params (jax.eval_shape: no memory, no compute)."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0), resolution, batch))
