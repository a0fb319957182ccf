"""llama.cpp's block formats as metalq's affine (and mxfp4) groups: codes, scales and biases, losslessly.

Every type here stores ``w = scale * code + bias`` per run of consecutive weights, so it is metalq's format once
the codes are put in order (ggml packs them by nibble or bit plane inside a block; metalq wants them sequential)
and the block constants are turned into one scale and one bias per group:

======  =====  ==============================  =====================================  ====  =====  =======
type    block  bytes                           ggml's value                           bits  group  scales
======  =====  ==============================  =====================================  ====  =====  =======
Q4_0    32     d, 16 nibbles                   d * (q - 8)                            4     32     float16
Q4_1    32     d, m, 16 nibbles                d * q + m                              4     32     float16
Q5_0    32     d, 4 high bits, 16 nibbles      d * (q - 16)                           5     32     float16
Q5_1    32     d, m, 4 high bits, 16 nibbles   d * q + m                              5     32     float16
Q8_0    32     d, 32 int8                      d * q                                  8     32     float16
Q2_K    256    16 scale/min nibbles, 64, d, dm  d * sc * q - dmin * m                  2     16     float32
Q3_K    256    32 high bits, 64, 12 scales, d  d * (sc - 32) * (q - 4)                3     16     float32
Q4_K    256    d, dmin, 12 scales, 128         d * sc * q - dmin * m                  4     32     float32
Q5_K    256    d, dmin, 12, 32 high bits, 128  d * sc * q - dmin * m                  5     32     float32
Q6_K    256    128, 64 high bits, 16 int8, d   d * sc * (q - 32)                      6     16     float32
MXFP4   32     e8m0 exponent, 16 nibbles       E2M1(q) * 2^(e - 127)                  4     32     uint8 (mode mxfp4)
======  =====  ==============================  =====================================  ====  =====  =======

The scales are exact: ``d`` is a float16, the sub-block factors are small integers, so ``d * sc`` needs at most
18 significant bits; float16 holds the legacy types' constants, float32 the K types'. Each product ``scale * code``
is then exact in float32 too, so a dequantized metalq weight equals ``gguf.quants.dequantize`` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class BlockFormat:
    """How one ggml type maps: its block (weights, bytes), metalq's bits / group size / mode and scale dtype."""

    block: int
    nbytes: int
    bits: int
    group_size: int
    scales_dtype: torch.dtype
    decode: Callable[[torch.Tensor], tuple]  # (blocks, block bytes) uint8 -> codes, scales, biases
    mode: str = "affine"


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields (``(..., 2)`` bytes) as float32 ``(..., 1)``."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(raw: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` bytes to ``(..., 2n)`` values: the low nibbles of all bytes, then the high nibbles (ggml's order
    for Q4_0, Q4_1, Q5_*, Q4_K / Q5_K sub-block pairs and MXFP4)."""
    return torch.cat([raw & 0x0F, raw >> 4], dim=-1)


def _planes(raw: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """``(..., n)`` bytes read as ``count`` planes of ``width``-bit fields: plane ``p`` holds bits
    ``[p * width, (p + 1) * width)`` of every byte, and the planes follow each other (ggml's order for the 2-bit
    fields of Q2_K / Q3_K, the high bits of Q3_K / Q5_K / Q6_K)."""
    mask = (1 << width) - 1
    return torch.cat([(raw >> (p * width)) & mask for p in range(count)], dim=-1)


def _blocks(raw: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(n, bytes)`` reshaped to ``(n, bytes / chunk, chunk)``: ggml lays a super-block's codes out in chunks."""
    return raw.reshape(raw.shape[0], -1, chunk)


def _legacy(high_bits: bool, offset: Optional[int]):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1: ``d``, then ``m`` (``offset=None``) or an implicit zero point ``offset``,
    then 32 high bits (bit ``i`` of the little-endian word is weight ``i``'s fifth bit), then 16 bytes of nibbles."""

    def decode(raw):
        d = _f16(raw[:, 0:2])
        at = 2 if offset is not None else 4
        codes = _nibbles(raw[:, at + (4 if high_bits else 0):])
        if high_bits:  # planes give bit p of byte j at 4 p + j; weight 8 j + p wants it
            high = _planes(raw[:, at:at + 4], 1, 8).reshape(-1, 8, 4).transpose(1, 2).reshape(-1, 32)
            codes = codes | (high << 4)
        bias = -offset * d if offset is not None else _f16(raw[:, 2:4])
        return codes, d, bias

    return decode


def _q8_0(raw):
    d = _f16(raw[:, 0:2])
    codes = (raw[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return codes, d, -128 * d


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K / Q5_K block from its 12 bytes (ggml's ``get_scale_min_k4``):
    bytes 0-3 hold scales 0-3 and the top bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11 the
    low nibbles of scales 4-7 (low) and mins 4-7 (high)."""
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    mins = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()


def _q4_k(raw):
    d, dmin = _f16(raw[:, 0:2]), _f16(raw[:, 2:4])
    sc, mn = _scale_min_k4(raw[:, 4:16])
    codes = _nibbles(_blocks(raw[:, 16:144], 32)).reshape(-1, 256)  # chunk c: sub-blocks 2c (low), 2c+1 (high)
    return codes, d * sc, -dmin * mn


def _q5_k(raw):
    d, dmin = _f16(raw[:, 0:2]), _f16(raw[:, 2:4])
    sc, mn = _scale_min_k4(raw[:, 4:16])
    low = _nibbles(_blocks(raw[:, 48:176], 32)).reshape(-1, 256)
    high = _planes(raw[:, 16:48], 1, 8)  # bit p of byte j: weight 32 p + j
    return low | (high << 4), d * sc, -dmin * mn


def _q6_k(raw):
    low = _nibbles(_blocks(raw[:, 0:128], 64)).reshape(-1, 256)  # half h: 64 low nibbles, then 64 high
    high = _planes(_blocks(raw[:, 128:192], 32), 2, 4).reshape(-1, 256)
    scales = _f16(raw[:, 208:210]) * raw[:, 192:208].contiguous().view(torch.int8).float()
    return low | (high << 4), scales, -32 * scales


def _q2_k(raw):
    sc = raw[:, 0:16]
    d, dmin = _f16(raw[:, 80:82]), _f16(raw[:, 82:84])
    codes = _planes(_blocks(raw[:, 16:80], 32), 2, 4).reshape(-1, 256)
    return codes, d * (sc & 0x0F).float(), -dmin * (sc >> 4).float()


def _q3_k(raw):
    d = _f16(raw[:, 108:110])
    packed = raw[:, 96:108]
    low = _planes(packed[:, 0:8], 4, 2)  # 16 low nibbles: scale i in byte i % 8, nibble i // 8
    high = _planes(packed[:, 8:12], 2, 4)  # 16 high pairs: scale i in byte i % 4, pair i // 4
    scales = d * ((low | (high << 4)).float() - 32)
    codes = _planes(_blocks(raw[:, 32:96], 32), 2, 4).reshape(-1, 256)
    codes = codes | (_planes(raw[:, 0:32], 1, 8) << 2)  # ggml's q - 4 with the high bit as +4: code = q + 4
    return codes, scales, -4 * scales


def _mxfp4(raw):
    return _nibbles(raw[:, 1:17]), raw[:, 0:1], None


FORMATS = {
    "Q4_0": BlockFormat(32, 18, 4, 32, torch.float16, _legacy(high_bits=False, offset=8)),
    "Q4_1": BlockFormat(32, 20, 4, 32, torch.float16, _legacy(high_bits=False, offset=None)),
    "Q5_0": BlockFormat(32, 22, 5, 32, torch.float16, _legacy(high_bits=True, offset=16)),
    "Q5_1": BlockFormat(32, 24, 5, 32, torch.float16, _legacy(high_bits=True, offset=None)),
    "Q8_0": BlockFormat(32, 34, 8, 32, torch.float16, _q8_0),
    "Q2_K": BlockFormat(256, 84, 2, 16, torch.float32, _q2_k),
    "Q3_K": BlockFormat(256, 110, 3, 16, torch.float32, _q3_k),
    "Q4_K": BlockFormat(256, 144, 4, 32, torch.float32, _q4_k),
    "Q5_K": BlockFormat(256, 176, 5, 32, torch.float32, _q5_k),
    "Q6_K": BlockFormat(256, 210, 6, 16, torch.float32, _q6_k),
    "MXFP4": BlockFormat(32, 17, 4, 32, torch.uint8, _mxfp4, mode="mxfp4"),
}


def decode_rows(raw: torch.Tensor, kind: str, rows: int, cols: int):
    """The codes ``(rows, cols)`` uint8, scales and biases ``(rows, cols / group_size)`` of a ggml tensor's bytes."""
    spec = FORMATS[kind]
    blocks = raw.reshape(rows * cols // spec.block, spec.nbytes)
    codes, scales, biases = spec.decode(blocks)
    groups = cols // spec.group_size
    scales = scales.reshape(rows, groups)
    if spec.mode == "affine":
        scales = scales.to(spec.scales_dtype)
        biases = biases.reshape(rows, groups).to(spec.scales_dtype)
    return codes.reshape(rows, cols), scales, biases
