"""Make tests/fixtures/dinov2_tiny/: a tiny random DINOv2 and its reference outputs, computed by
the PyTorch ``transformers`` implementation, for the parity tests of ``cxr_rf.features.dinov2``.

Run once, in a separate reference environment (torch and transformers are never dependencies of
cxr_rf; the fixture is committed):

    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.57.6 safetensors==0.8.0 numpy pillow
    /tmp/refvenv/bin/python scripts/make_dinov2_fixture.py [OUT_DIR]

It is deterministic (seeded) and was generated with torch 2.13.0+cpu, transformers 4.57.6,
safetensors 0.8.0, numpy 2.4.6, pillow 13.0.0. OUT_DIR (default tests/fixtures/dinov2_tiny)
receives a Hugging Face folder, as ``microsoft/rad-dino`` is laid out:

    config.json, model.safetensors    ``Dinov2Model.save_pretrained`` (hidden 16, 2 layers,
                                      2 heads, patch 14, image 42 = 3x3 patches; every
                                      LayerScale, LayerNorm, CLS and position embedding
                                      randomised so that each of them matters)
    preprocessor_config.json          a ``BitImageProcessor`` with NON-ImageNet, per-channel
                                      different mean/std; shortest_edge 48 then crop 42, so
                                      the resize and the crop are both exercised
    reference.npz                     the inputs and the reference outputs:

        images_a_u16 [2, 42, 42], images_b_u16 [1, 64, 64]   uint16 codes of the input images;
                              the float images are ``codes.astype(float32) / 65535``
        pv_default_a, pv_default_b          [B, 3, 42, 42] pixel_values, ``default`` protocol
        pv_chexgenbench_a, pv_chexgenbench_b [B, 3, 42, 42] pixel_values, ``chexgenbench``
        pooler_native, hidden_native       model outputs for pv_chexgenbench_a (native 42 px)
        pooler_up, hidden_up               ... for ``upsized(pv_chexgenbench_a)`` (70 px: the
                                           3x3 position grid interpolated to 5x5)
        pooler_down, hidden_down           ... for ``pv_chexgenbench_a[:, :, :28, :28]`` (2x2)

    ``upsized(pv)`` = pv tiled to 70 px by concatenating its first 28 rows/columns (pure slicing,
    so the test rebuilds it exactly).

Protocols (see cxr_rf.features.dinov2.preprocess):
    chexgenbench  CheXGenBench's chain: 8-bit image (round(x * 255)) -> PIL convert("RGB") ->
                  PIL bilinear resize to 299x299 -> uint8 batch [B, 3, 299, 299] -> the Hugging
                  Face processor itself (PIL bicubic to shortest_edge, centre crop, rescale,
                  normalise). Everything after the uint8 batch is transformers' own code.
    default       the float image, replicated to 3 channels, PIL mode "F" resize with the
                  processor's filter to the processor's shortest edge (done here: the Hugging
                  Face processor would quantise a float image to uint8 before its PIL resize),
                  then the processor itself with do_resize=False, do_rescale=False (centre crop
                  and normalisation are transformers' code).
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
from transformers.image_transforms import get_resize_output_image_size

CHEXGENBENCH_SIZE = 299
MEAN = [0.5307, 0.4812, 0.4413]     # Rad-DINO-like values, made per-channel distinct so that a
STD = [0.2583, 0.2921, 0.2337]      # channel-order or ImageNet-constant bug shows


def upsized(pv):
    """[B, C, 42, 42] -> [B, C, 70, 70] by appending the first 28 rows, then columns."""
    pv = np.concatenate([pv, pv[:, :, :28]], axis=2)
    return np.concatenate([pv, pv[:, :, :, :28]], axis=3)


def images(rng, n, size):
    """Smooth structure plus noise, as uint16 codes (a chest-film-like range of grey levels)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(1, 4, 2)
        base = 0.5 + 0.3 * np.sin(2 * np.pi * (f[0] * xx + rng.uniform())) * np.cos(2 * np.pi * f[1] * yy)
        im = np.clip(base + 0.15 * rng.standard_normal((size, size)), 0, 1)
        out.append(np.round(im * 65535).astype(np.uint16))
    return np.stack(out)


def chexgenbench_uint8(images_BxHxW):
    """CheXGenBench's chain up to its uint8 batch [B, 3, 299, 299]."""
    out = []
    for im in images_BxHxW:
        pil = Image.fromarray(np.round(im * 255.0).astype(np.uint8), mode="L").convert("RGB")
        out.append(np.asarray(pil.resize((CHEXGENBENCH_SIZE, CHEXGENBENCH_SIZE), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def default_float(images_BxHxW, proc):
    """The float image at the processor's shortest edge, 3 channels, [B, S', S', 3] float32."""
    out = []
    for im in images_BxHxW:
        h, w = get_resize_output_image_size(im[..., None], proc.size["shortest_edge"],
                                            default_to_square=False)
        r = np.asarray(Image.fromarray(im, mode="F").resize((w, h), proc.resample), np.float32)
        out.append(np.repeat(r[..., None], 3, axis=-1))
    return np.stack(out)


def main(out_dir):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                       patch_size=14, image_size=42, num_channels=3, layer_norm_eps=1e-6,
                       hidden_act="gelu", qkv_bias=True, layerscale_value=1.0,
                       use_swiglu_ffn=False, drop_path_rate=0.0)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.empty_like(p).uniform_(0.3, 1.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias") or "cls_token" in name or "position_embeddings" in name:
                p.copy_((0.5 if "embeddings." in name and "patch" not in name else 0.1)
                        * torch.randn_like(p))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    proc = BitImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42},
                             resample=Image.BICUBIC, image_mean=MEAN, image_std=STD,
                             do_convert_rgb=True)
    proc.save_pretrained(out_dir)

    ref = {"images_a_u16": images(rng, 2, 42), "images_b_u16": images(rng, 1, 64)}
    for k in ("a", "b"):
        x = ref[f"images_{k}_u16"].astype(np.float32) / 65535
        ref[f"pv_chexgenbench_{k}"] = proc(chexgenbench_uint8(x), return_tensors="np")["pixel_values"]
        ref[f"pv_default_{k}"] = proc(list(default_float(x, proc)), do_resize=False,
                                      do_rescale=False, input_data_format="channels_last",
                                      return_tensors="np")["pixel_values"]
    pv = ref["pv_chexgenbench_a"]
    for tag, x in (("native", pv), ("up", upsized(pv)), ("down", pv[:, :, :28, :28])):
        with torch.no_grad():
            o = model(pixel_values=torch.from_numpy(np.ascontiguousarray(x)))
        ref[f"pooler_{tag}"] = o.pooler_output.numpy()
        ref[f"hidden_{tag}"] = o.last_hidden_state.numpy()
    ref = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in ref.items()}
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), **ref)
    with open(os.path.join(out_dir, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "numpy": np.__version__, "pillow": Image.__version__}, f, indent=1)
    print({k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                      "dinov2_tiny"))
