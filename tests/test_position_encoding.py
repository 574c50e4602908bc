"""Sine position encodings: the image encoding against values written out for tiny masks,
padding invariance, which temperature acts on which axis, and the anchor embedding."""

import math

import torch

from dab_detr.layers.position_encoding import PositionEmbeddingSine, box_sine_embedding

TWO_PI = 2 * math.pi


def _features(v: torch.Tensor, temperature: float) -> torch.Tensor:
    """num_pos_feats = 4: frequencies 1, 1, t^(-1/2), t^(-1/2) -> (sin, cos, sin, cos)."""
    s = math.sqrt(temperature)
    return torch.stack([v.sin(), v.cos(), (v / s).sin(), (v / s).cos()], dim=-1)


def _reference(h: int, w: int, temperature_h: float, temperature_w: float) -> torch.Tensor:
    """``(1, 8, h, w)`` encoding of an unpadded h x w image: position (i + 1) / h along y
    and (j + 1) / w along x, times 2 pi; channels 0-3 encode y, 4-7 x."""
    y = (torch.arange(1, h + 1, dtype=torch.float32) / h * TWO_PI)[:, None].expand(h, w)
    x = (torch.arange(1, w + 1, dtype=torch.float32) / w * TWO_PI)[None, :].expand(h, w)
    enc = torch.cat([_features(y, temperature_h), _features(x, temperature_w)], -1)
    return enc.permute(2, 0, 1)[None]


def test_unpadded_values():
    encoder = PositionEmbeddingSine(num_pos_feats=4, temperature_h=20, temperature_w=7)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    out = encoder(mask)
    assert out.shape == (1, 8, 2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(2, 3, 20, 7), rtol=0, atol=1e-5)
    # a few entries by hand: y of row 0 is pi (1 / 2 of 2 pi), x of column 0 is 2 pi / 3
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([
        math.sin(math.pi), math.cos(math.pi),
        math.sin(math.pi / math.sqrt(20)), math.cos(math.pi / math.sqrt(20)),
        math.sin(TWO_PI / 3), math.cos(TWO_PI / 3),
        math.sin(TWO_PI / 3 / math.sqrt(7)), math.cos(TWO_PI / 3 / math.sqrt(7)),
    ]), rtol=0, atol=1e-5)


def test_padded_image_matches_image_alone():
    """A 2 x 3 image padded to 4 x 5 (batched with an unpadded 4 x 5 one) gets the encoding
    of the image alone in its valid region; the unpadded one gets its own."""
    encoder = PositionEmbeddingSine(num_pos_feats=4, temperature_h=20, temperature_w=10)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 2:, :] = True
    mask[0, :, 3:] = True
    out = encoder(mask)
    alone = encoder(torch.zeros(1, 2, 3, dtype=torch.bool))
    torch.testing.assert_close(out[:1, :, :2, :3], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:1, :, :2, :3], _reference(2, 3, 20, 10), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1:], _reference(4, 5, 20, 10), rtol=0, atol=1e-5)


def test_temperature_h_acts_on_y_and_temperature_w_on_x():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    base = PositionEmbeddingSine(4, temperature_h=20, temperature_w=20)(mask)
    new_h = PositionEmbeddingSine(4, temperature_h=100, temperature_w=20)(mask)
    new_w = PositionEmbeddingSine(4, temperature_h=20, temperature_w=100)(mask)
    # channels 0, 1 and 4, 5 have frequency 1, whatever the temperature
    unchanged_h = [0, 1, 4, 5, 6, 7]
    torch.testing.assert_close(new_h[:, unchanged_h], base[:, unchanged_h], rtol=0, atol=0)
    torch.testing.assert_close(new_h, _reference(3, 4, 100, 20), rtol=0, atol=1e-5)
    unchanged_w = [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(new_w[:, unchanged_w], base[:, unchanged_w], rtol=0, atol=0)
    torch.testing.assert_close(new_w, _reference(3, 4, 20, 100), rtol=0, atol=1e-5)
    # the temperature-dependent channels did change
    assert (new_h[:, 2:4] - base[:, 2:4]).abs().amin() > 1e-3
    assert (new_w[:, 6:8] - base[:, 6:8]).abs().amin() > 1e-3


def test_box_sine_embedding_order_and_values():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # cx, cy, w, h
    out = box_sine_embedding(box, num_pos_feats=4, temperature=10000.0)
    assert out.shape == (1, 16)
    # 10000 ** (2 / 4) = 100; the order is (y, x, w, h)
    expected = torch.cat([_features(torch.tensor(v * TWO_PI), 10000.0)
                          for v in (0.2, 0.1, 0.3, 0.4)])
    torch.testing.assert_close(out[0], expected)
    # anchor points (D = 2): (y, x)
    points = box_sine_embedding(box[:, :2], num_pos_feats=4, temperature=10000.0)
    torch.testing.assert_close(points, expected[None, :8])
    # leading dimensions are kept: (B, NQ, 4) -> (B, NQ, 4 * n)
    boxes = torch.rand(2, 3, 4)
    batched = box_sine_embedding(boxes, num_pos_feats=4)
    assert batched.shape == (2, 3, 16)
    torch.testing.assert_close(batched[1, 2], box_sine_embedding(boxes[1, 2:3], 4)[0])
