"""Write diffusers folders as single-file checkpoints, the way real ones are distributed.

Test support only: it lets the tests load single files through the same code path real
checkpoints take, with no network. SD 1.x and SDXL become one original-layout (LDM / SGM)
`.safetensors` file (DreamShaper, Realistic Vision, RealVisXL ship so); a FLUX transformer
becomes a file of its own, the rest of the pipeline coming from a diffusers folder (`config`).
"""

from __future__ import annotations

import json
import pathlib

from safetensors.torch import load_file, save_file


def unet_to_ldm(sd, cfg):
    lpb = cfg["layers_per_block"]
    down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
    n = len(down_types)
    m = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's size and pooled-text embedding
        "add_embedding.linear_2.": "label_emb.0.2.",
    }
    idx = 1
    for i in range(n):
        for j in range(lpb):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{idx}.0."
            if "CrossAttn" in down_types[i]:
                m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{idx}.1."
            idx += 1
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{idx}.0.op."
            idx += 1
    idx = 0
    for i in range(n):
        attn = "CrossAttn" in up_types[i]
        for j in range(lpb + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{idx}.0."
            if attn:
                m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{idx}.1."
            if j == lpb and i < n - 1:
                m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{idx}.{2 if attn else 1}."
            idx += 1
    m["mid_block.resnets.0."] = "middle_block.0."
    m["mid_block.attentions.0."] = "middle_block.1."
    m["mid_block.resnets.1."] = "middle_block.2."
    res = [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ]
    out = {}
    for k, v in sd.items():
        pre = max((p for p in m if k.startswith(p)), key=len)
        rest = k[len(pre) :]
        if ".resnets." in pre:
            for a, b in res:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
        out["model.diffusion_model." + m[pre] + rest] = v
    return out


def vae_to_ldm(sd, cfg):
    n = len(cfg["block_out_channels"])
    m = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    for i in range(n):
        for j in range(cfg["layers_per_block"]):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(cfg["layers_per_block"] + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        m[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        m[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    attn = {
        "group_norm.": "norm.",
        "to_q.": "q.",
        "to_k.": "k.",
        "to_v.": "v.",
        "to_out.0.": "proj_out.",
    }
    out = {}
    for k, v in sd.items():
        cands = [p for p in m if k.startswith(p)]
        pre = max(cands, key=len) if cands else ""
        rest = k[len(pre) :]
        new = (m[pre] if pre else "") + rest.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for a, b in attn.items():
                if rest.startswith(a):
                    new = m[pre] + b + rest[len(a) :]
            if v.ndim == 2:
                v = v[:, :, None, None]  # linear -> 1x1 conv, as in the original VAE
        out["first_stage_model." + new] = v
    return out


def te_to_ldm(sd, prefix="cond_stage_model.transformer."):
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
    }


OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def te2_to_open_clip(sd, prefix="conditioner.embedders.1.model."):
    """SDXL's second text encoder (CLIPTextModelWithProjection) in OpenCLIP's layout."""
    import torch

    out = {}
    fused = {}
    for key, value in sd.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out[prefix + "ln_final." + k.removeprefix("final_layer_norm.")] = value
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif k.startswith("encoder.layers."):
            index, rest = k.removeprefix("encoder.layers.").split(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                projection, kind = rest.split(".")[1:3]
                fused.setdefault((block, kind), {})[projection] = value
                continue
            for old, new in OPEN_CLIP_LAYER.items():
                if rest.startswith(old):
                    out[block + new + rest.removeprefix(old)] = value
                    break
            else:
                raise KeyError(key)
        elif not k.endswith("position_ids"):
            raise KeyError(key)
    for (block, kind), parts in fused.items():
        q, k, v = (parts[name] for name in ("q_proj", "k_proj", "v_proj"))
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([q, k, v])
    return out


def convert_sdxl(folder, dst):  # type: ignore[no-untyped-def]
    """An SDXL folder as one SGM-layout file (UNet, VAE and both text encoders)."""
    folder = pathlib.Path(folder)
    unet = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae/diffusion_pytorch_model.safetensors")
    te = load_file(folder / "text_encoder/model.safetensors")
    te2 = load_file(folder / "text_encoder_2/model.safetensors")
    ucfg = json.loads((folder / "unet/config.json").read_text())
    vcfg = json.loads((folder / "vae/config.json").read_text())
    state = {
        **unet_to_ldm(unet, ucfg),
        **vae_to_ldm(vae, vcfg),
        **te_to_ldm(te, "conditioner.embedders.0.transformer."),
        **te2_to_open_clip(te2),
    }
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(dst), metadata={"format": "pt"})
    return state


def flux_transformer_file(folder, dst):  # type: ignore[no-untyped-def]
    """A FLUX folder's transformer as a file of its own (the rest stays in the folder)."""
    folder = pathlib.Path(folder)
    state = load_file(folder / "transformer/diffusion_pytorch_model.safetensors")
    save_file(state, str(dst), metadata={"format": "pt"})
    return state


def convert(folder, dst, half=False):  # type: ignore[no-untyped-def]
    folder = pathlib.Path(folder)
    unet = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae/diffusion_pytorch_model.safetensors")
    te = load_file(folder / "text_encoder/model.safetensors")
    ucfg = json.loads((folder / "unet/config.json").read_text())
    vcfg = json.loads((folder / "vae/config.json").read_text())
    state = {**unet_to_ldm(unet, ucfg), **vae_to_ldm(vae, vcfg), **te_to_ldm(te)}
    assert len(state) == len(unet) + len(vae) + len(te)
    if half:
        state = {k: v.half() for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(dst), metadata={"format": "pt"})
    return state
