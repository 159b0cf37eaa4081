"""--format=detr: the exported state dict loads strictly into a PyTorch DETR (transformer and
heads built here from nn.MultiheadAttention, Linear and LayerNorm, as facebookresearch/detr
lays them out) and reproduces the Haiku detector's outputs on the same input."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon.models import detr, networks
from detcon.weights import export

from conftest import REPO

torch = pytest.importorskip("torch", reason="torch is needed for the PyTorch transcription")
nn = torch.nn


class _EncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, pre_norm):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, src, pad, pos):
        if self.pre_norm:
            x = self.norm1(src)
            src = src + self.self_attn(x + pos, x + pos, x, key_padding_mask=pad)[0]
            return src + self.linear2(torch.relu(self.linear1(self.norm2(src))))
        src = self.norm1(src + self.self_attn(src + pos, src + pos, src, key_padding_mask=pad)[0])
        return self.norm2(src + self.linear2(torch.relu(self.linear1(src))))


class _DecoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, pre_norm):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.multihead_attn = nn.MultiheadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, tgt, memory, pad, pos, query_pos):
        assert self.pre_norm
        x = self.norm1(tgt)
        tgt = tgt + self.self_attn(x + query_pos, x + query_pos, x)[0]
        x = self.norm2(tgt)
        tgt = (
            tgt + self.multihead_attn(x + query_pos, memory + pos, memory, key_padding_mask=pad)[0]
        )
        return tgt + self.linear2(torch.relu(self.linear1(self.norm3(tgt))))


class _Stack(nn.Module):
    def __init__(self, layers, norm):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class _Transformer(nn.Module):
    def __init__(self, d, heads, ffn, enc, dec, pre_norm):
        super().__init__()
        self.encoder = _Stack(
            [_EncoderLayer(d, heads, ffn, pre_norm) for _ in range(enc)],
            nn.LayerNorm(d) if pre_norm else None,
        )
        self.decoder = _Stack(
            [_DecoderLayer(d, heads, ffn, pre_norm) for _ in range(dec)], nn.LayerNorm(d)
        )

    def forward(self, src, pad, query, pos):
        # Sequence-first, as DETR: src [n, b, d], query [Q, b, d], pos [n, b, d].
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, pad, pos)
        if hasattr(self.encoder, "norm"):
            memory = self.encoder.norm(memory)
        tgt, outs = torch.zeros_like(query), []
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, pad, pos, query)
            outs.append(self.decoder.norm(tgt))
        return torch.stack(outs)  # [L, Q, b, d]


class _MLP(nn.Module):
    def __init__(self, d, out, num_layers):
        super().__init__()
        sizes = [d] * (num_layers - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip([d] + sizes[:-1], sizes))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


class _DETRHead(nn.Module):
    """DETR minus the backbone: input_proj, query_embed, transformer, class and box heads."""

    def __init__(self, channels, d, heads, ffn, enc, dec, queries, classes, pre_norm=True):
        super().__init__()
        self.input_proj = nn.Conv2d(channels, d, kernel_size=1)
        self.query_embed = nn.Embedding(queries, d)
        self.transformer = _Transformer(d, heads, ffn, enc, dec, pre_norm)
        self.class_embed = nn.Linear(d, classes + 1)
        self.bbox_embed = _MLP(d, 4, 3)

    def forward(self, c5, pad, pos):
        """c5 [b, C, h, w], pad [b, h, w] True on padding, pos [b, d, h, w]."""
        src = self.input_proj(c5).flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        query = self.query_embed.weight.unsqueeze(1).repeat(1, c5.shape[0], 1)
        hs = self.transformer(src, pad.flatten(1), query, pos).transpose(1, 2)  # [L, b, Q, d]
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()


def _torch_sine(mask: np.ndarray, feats: int) -> "torch.Tensor":
    """DETReg's PositionEmbeddingSine(normalize=True) on a padding mask [b, h, w] (True: pad)."""
    not_mask = ~torch.from_numpy(mask)
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


DEPTH, SIZE, D, HEADS, FFN, ENC, DEC, QUERIES, CLASSES = 10, 64, 32, 4, 48, 2, 2, 7, 3


def _haiku_detector(seed: int = 0):
    cfg = detr.DetectorConfig(DEPTH, 1, QUERIES, CLASSES, networks.stage_channels(DEPTH)[1], 4)
    tcfg = detr.TransformerConfig(D, HEADS, ENC, DEC, FFN, dropout=0.1, pre_norm=True)
    net = detr.make_detector(cfg, tcfg)
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    pad_mask = np.ones((2, SIZE, SIZE), bool)
    pad_mask[1, :, 24:] = False  # image 1 is 24 px wide: feature column 1 (pixel 32) is padding
    images[~pad_mask] = 0.0
    crops = rng.normal(size=(2, 3, 32, 32, 3)).astype(np.float32)
    inputs = detr.DetectorInputs(
        jnp.asarray(images),
        jnp.asarray(pad_mask),
        jnp.asarray(crops),
        jnp.zeros((2, 2), jnp.uint32),
    )
    params, state = net.init(jax.random.PRNGKey(seed), inputs, is_training=True)
    # Non-trivial LayerNorm and BatchNorm terms, so a swapped weight/bias would show.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    state = jax.tree_util.tree_map(
        lambda x: x * 1.5 + 0.1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )
    out, _ = net.apply(params, state, None, inputs, is_training=False)
    return params, state, inputs, out


def test_detr_export_loads_strictly_and_reproduces_the_detector():
    params, state, inputs, out = _haiku_detector()
    sd = export.haiku_to_detr(params, state, DEPTH)
    assert not any(k.startswith(("feature_embed", "classifier")) for k in sd)
    assert sd["transformer.encoder.layers.0.self_attn.in_proj_weight"].shape == (3 * D, D)
    assert sd["class_embed.weight"].shape == (CLASSES + 1, D)
    assert not any(k.endswith("num_batches_tracked") for k in sd)  # FrozenBatchNorm2d
    assert "backbone.0.body.layer4.0.downsample.1.running_var" in sd
    head = _DETRHead(networks.stage_channels(DEPTH)[3], D, HEADS, FFN, ENC, DEC, QUERIES, CLASSES)
    head_sd = {k: torch.tensor(v) for k, v in sd.items() if not k.startswith("backbone.")}
    head.load_state_dict(head_sd, strict=True)  # every key and shape, nothing left over
    head.eval()

    torso = networks.torso_fn(DEPTH)
    torso_params = {k: v for k, v in params.items() if k.startswith("res_net")}
    torso_state = {k: v for k, v in state.items() if k.startswith("res_net")}
    c5, _ = torso.apply(torso_params, torso_state, None, inputs.images, is_training=False)
    c5 = np.array(c5)
    valid = np.asarray(detr.feature_mask(inputs.pad_mask, c5.shape[1], c5.shape[2]))
    assert not valid[1].all() and valid[0].all()
    with torch.no_grad():
        logits, boxes = head(
            torch.from_numpy(c5).permute(0, 3, 1, 2),
            torch.from_numpy(~valid),
            _torch_sine(~valid, D // 2),
        )
    np.testing.assert_allclose(out.pred_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.pred_boxes, boxes.numpy(), rtol=1e-4, atol=1e-5)


def test_detr_export_refuses_a_network_without_a_detector():
    params, state = {"res_net10/~/initial_conv": {"w": np.zeros((7, 7, 3, 64))}}, {}
    with pytest.raises(ValueError, match="needs a DETReg run"):
        export.haiku_to_detr(params, state, 10)


@pytest.mark.slow
def test_main_loop_smoke_run_exports_and_loads_into_the_transcription(tmp_path):
    workdir, out = str(tmp_path / "w"), str(tmp_path / "detr.pth")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True)
    run(
        "-m",
        "detcon.main_loop",
        "--config=configs/detreg.py",
        "--mock_data",
        "--max_steps=2",
        "--batch_size=8",
        "--config.model.depth=10",
        "--config.data.image_size=64",
        f"--workdir={workdir}",
    )
    run(
        "scripts/export_checkpoint.py",
        f"--checkpoint={workdir}",
        "--format=detr",
        f"--output={out}",
    )
    sd = torch.load(out)["model"]
    head = _DETRHead(512, 256, 8, 2048, 6, 6, 100, 91)
    head.load_state_dict(
        {k: v for k, v in sd.items() if not k.startswith("backbone.")}, strict=True
    )
    assert any(k.startswith("backbone.0.body.layer4.") for k in sd)
