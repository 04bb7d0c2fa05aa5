"""Triton preprocessing kernel: a batch of differently sized uint8 images -> one normalized batch tensor.

What it fuses. One launch does, for every image of the batch: the antialiased bilinear resize of the
shorter side to ``spec.resize`` (PIL's triangle filter, support widened by the downscale factor, the
same window clipping and weight normalisation as PIL's ``ImagingResample``), the center crop (only the
crop's pixels are computed), PIL's rounding to uint8 after the horizontal and after the vertical pass,
``ToTensor`` + ``Normalize``, HWC -> CHW and the cast to fp32/fp16/bf16, written straight into ``out``
(which may be a slot range of a bigger batch tensor, any strides).

How the work is split. Images are packed back to back in one uint8 buffer; a small int64/float32
table holds each image's offset, strides, size, crop origin and resampling scale. Two implementations
share that entry, the grid (crop tiles, images: one program owns a BY x BX tile of one image's crop)
and the numerics (fp32 sums, PIL's uint8 rounding after the horizontal pass, the vertical pass as a
tensor-core product with hi/lo fp16 weights, bf16 rounded to nearest; only the horizontal weights
differ: fp32 in banded, hi/lo fp16 in dense, which may flip PIL's rounding by one level on rare
pixels); env AURORA_TRITON_IMPL (or ``impl=``) picks one, "banded" by default:

- banded (``_banded_kernel``): the program walks the source rows of its tile's vertical windows in
  chunks of BR. For each chunk the horizontal pass reads only the filter taps: one lane per (source
  row, output column) loads PIL's window of that column (first source column xmin, at most
  ceil(support) * 2 + 1 taps, the count per image, so small and large images share a launch without
  padding to the largest) as whole aligned 16-byte blocks, int32 words through one ld.global.v4 each;
  the words are unpacked with shifts and masks in registers, and every byte is weighted into its
  channel's fp32 sum (one block stream serves all three channels of HWC rows; CHW planes, as nvJPEG
  writes them, take one stream per plane), then rounded to uint8. The vertical pass is
  Wy[BY, BR] @ H[BR, BX]  over the chunk. The source window is read once per tile plus the filter
  margin; the tap weights are computed in registers (no host tables). The 16-byte blocks may start
  up to 15 bytes before an image and end up to 15 after it, so the packed buffer is 16-byte aligned
  and padded to a multiple of 16 bytes (``wide_readable``).
- dense (``_preprocess_kernel``, the first version): both passes as tensor-core products over the
  tile's whole source window,  P[BR, BK] @ Wx[BK, BX]  then  Wy[BY, BR] @ H[BR, BX].

The triangle weights are computed in registers from the tile's coordinates. Pixel values 0..255 are
exact in fp16; each tensor-core weight matrix is split into an fp16 high and low part, so the two
products together carry ~22 bits of weight precision (one fp16 product alone keeps 11 bits: up to
~0.12 of a level at 255, enough to flip PIL's roundings). The rounding after the horizontal pass
follows classic Pillow; Pillow 13 was seen to run the vertical pass first on some tall images, so a
pixel can differ by one level there.

Where it stops being fast. Dense: its horizontal product costs ~12 * BX * s^2 flops per output pixel
for a downscale factor s against ~3 * s^2 bytes read, so it is compute-bound; on an H200 it reached
3.5 to 7.3% of the copy bandwidth (benchmarks/RESULTS.md, run 1), and it still loads one byte per
lane. Banded: the byte-per-lane version reached 5.1 to 9.4% (run 3), bound by load instructions; its
wide-load rewrite (this version) issues one 16-byte load per ~5 HWC taps but spends ~15 ALU
operations per loaded byte on unpacking and weighting (ceil((15 + 3 * taps) / 16) blocks per lane:
2 at s < 2), neighbouring windows overlap (~2 reads per source byte, from L1), and the misalignment
slack wastes up to 15 bytes a block; not yet measured on a GPU (issue 16). The vertical product costs
~6 * BY * s MACs per pixel. Both: batches of 1 fill only ~49-98 programs (a fraction of the SMs);
CPU inputs pay one host-to-device copy of the packed bytes, which for large photos costs more than the
kernel. Under TRITON_INTERPRET=1 it runs on the CPU for tests only (slow: small shapes).
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Columns of the per-image tables.
_I_OFF, _I_H, _I_W, _I_SROW, _I_SCOL, _I_SCH, _I_TOP, _I_LEFT, _I_RH, _I_RW = range(10)
_NI = 10
_F_SY, _F_SX = range(2)
_NF = 2

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs():
    if _INTERPRET:
        return [triton.Config({"BY": 32, "BX": 32, "BR": 32, "BK": 32}, num_warps=4)]
    # Smaller BX wastes fewer tensor-core flops on the band matrix (2*BX*s^2 per pixel); larger BY
    # re-reads fewer filter-margin rows. BK=32: the three [BR, BK] byte gathers hold 64-bit pointers,
    # and BK=64 took 253 registers (BX=32: 364 bytes of spills) in ptxas -v for sm_90a (triton 3.8,
    # compiled on the CPU machine); these take 127-233 with no spills. Autotuning picks per card.
    return [
        triton.Config({"BY": 32, "BX": 16, "BR": 32, "BK": 32}, num_warps=4),
        triton.Config({"BY": 64, "BX": 16, "BR": 32, "BK": 32}, num_warps=4),
        triton.Config({"BY": 64, "BX": 16, "BR": 32, "BK": 32}, num_warps=8),
        triton.Config({"BY": 32, "BX": 16, "BR": 32, "BK": 32}, num_warps=8),
        triton.Config({"BY": 32, "BX": 32, "BR": 32, "BK": 32}, num_warps=4),
    ]


@triton.jit
def _split_fp16(w):
    hi = w.to(tl.float16)
    lo = (w - hi.to(tl.float32)).to(tl.float16)
    return hi, lo


@triton.jit
def _round_u8(x):
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), 0.0), 255.0)


@triton.jit
def _bf16_rne(x):
    # fp32 -> bf16 precision, round to nearest even, in integer ops (finite x). The GPU's fp32 -> bf16
    # cast rounds to nearest already, but Triton's interpreter (3.8, create_fp_trunc) truncates: up to
    # one bf16 ulp, 0.9 of a uint8 level at |x| >= 2, so CPU tests saw other bf16 bits than the GPU
    # writes. Rounded here, the cast after it is exact on both.
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _store_out(ptr, y, mask):
    if ptr.dtype.element_ty == tl.bfloat16:  # resolved at compile time
        y = _bf16_rne(y)
    tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(iparams, fparams, CROP: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """One program's image and crop tile, shared by both implementations: the image's table row, PIL's
    filter geometry for the tile's BY crop rows and BX crop columns, and the source rows [r_lo, r_hi) and
    columns [c_lo, c_hi) that the tile's filter windows span (PIL's xmin/xmax of its first and last valid
    output pixel)."""
    tiles_x = tl.cdiv(CROP, BX)
    ty = tl.program_id(0) // tiles_x
    tx = tl.program_id(0) % tiles_x
    n = tl.program_id(1).to(tl.int64)

    ip = iparams + n * 10
    off = tl.load(ip + 0)
    h_in = tl.load(ip + 1).to(tl.int32)
    w_in = tl.load(ip + 2).to(tl.int32)
    # In-image offsets fit in int32 (the host checks H * W * 3 < 2**31); only the base is 64-bit.
    s_row = tl.load(ip + 3).to(tl.int32)
    s_col = tl.load(ip + 4).to(tl.int32)
    s_ch = tl.load(ip + 5).to(tl.int32)
    top = tl.load(ip + 6).to(tl.int32)
    left = tl.load(ip + 7).to(tl.int32)
    rh = tl.load(ip + 8).to(tl.int32)
    rw = tl.load(ip + 9).to(tl.int32)
    sy = tl.load(fparams + n * 2 + 0)
    sx = tl.load(fparams + n * 2 + 1)
    # PIL: support = filterscale = max(scale, 1); the triangle is evaluated at distance / filterscale.
    fsy = tl.maximum(sy, 1.0)
    fsx = tl.maximum(sx, 1.0)
    ssy = 1.0 / fsy
    ssx = 1.0 / fsx

    cy_idx = ty * BY + tl.arange(0, BY)  # crop row
    cx_idx = tx * BX + tl.arange(0, BX)
    oy = top + cy_idx  # row of the resized image (may be < 0 or >= rh when the crop pads)
    ox = left + cx_idx
    in_crop_y = cy_idx < CROP
    in_crop_x = cx_idx < CROP
    ok_y = in_crop_y & (oy >= 0) & (oy < rh)
    ok_x = in_crop_x & (ox >= 0) & (ox < rw)
    cen_x = (ox.to(tl.float32) + 0.5) * sx
    # Triangle weight of source index j for centre c: max(1 - |j * ss - (c - 0.5) * ss|, 0).
    vy = ((oy.to(tl.float32) + 0.5) * sy - 0.5) * ssy
    vx = (cen_x - 0.5) * ssx

    oy_lo = tl.maximum(top + ty * BY, 0)
    oy_hi = tl.minimum(tl.minimum(top + ty * BY + BY, top + CROP), rh) - 1
    ox_lo = tl.maximum(left + tx * BX, 0)
    ox_hi = tl.minimum(tl.minimum(left + tx * BX + BX, left + CROP), rw) - 1
    r_lo = tl.maximum(((oy_lo.to(tl.float32) + 0.5) * sy - fsy + 0.5).to(tl.int32), 0)
    r_hi = tl.minimum(((oy_hi.to(tl.float32) + 0.5) * sy + fsy + 0.5).to(tl.int32) + 1, h_in)
    c_lo = tl.maximum(((ox_lo.to(tl.float32) + 0.5) * sx - fsx + 0.5).to(tl.int32), 0)
    c_hi = tl.minimum(((ox_hi.to(tl.float32) + 0.5) * sx + fsx + 0.5).to(tl.int32) + 1, w_in)
    return (
        n, off, w_in, s_row, s_col, s_ch, fsx, ssx, ssy, cy_idx, cx_idx, in_crop_y, in_crop_x,
        ok_y, ok_x, cen_x, vy, vx, r_lo, r_hi, c_lo, c_hi,
    )  # fmt: skip


@triton.jit
def _vertical(rows, row_ok, ssy, vy, sum_x, h0, h1, h2, acc0, acc1, acc2, sum_y):
    """Vertical pass over one chunk of source rows: the tile's rows as tensor-core products
    Wy[BY, BR] @ H[BR, BX] with hi/lo fp16 weights, after PIL's rounding of the horizontal pass."""
    wy = tl.maximum(1.0 - tl.abs((rows.to(tl.float32) * ssy)[None, :] - vy[:, None]), 0.0)
    sum_y += tl.sum(tl.where(row_ok[None, :], wy, 0.0), axis=1)
    wy_hi, wy_lo = _split_fp16(wy)
    # PIL rounds the horizontal pass to uint8 before the vertical one; integers are exact in fp16.
    q = _round_u8(h0 / sum_x[None, :]).to(tl.float16)
    acc0 = tl.dot(wy_hi, q, acc0)
    acc0 = tl.dot(wy_lo, q, acc0)
    q = _round_u8(h1 / sum_x[None, :]).to(tl.float16)
    acc1 = tl.dot(wy_hi, q, acc1)
    acc1 = tl.dot(wy_lo, q, acc1)
    q = _round_u8(h2 / sum_x[None, :]).to(tl.float16)
    acc2 = tl.dot(wy_hi, q, acc2)
    acc2 = tl.dot(wy_lo, q, acc2)
    return acc0, acc1, acc2, sum_y


@triton.jit
def _write_tile(out, n, so_n, so_c, so_y, so_x, cy_idx, cx_idx, in_crop_y, in_crop_x, ok_y, ok_x,
                acc0, acc1, acc2, sum_y, m0, m1, m2, r0, r1, r2):  # fmt: skip
    """Normalize the tile's three channels and store them (CHW, any strides, the output dtype)."""
    sum_y = tl.where(sum_y > 0.0, sum_y, 1.0)
    ok = ok_y[:, None] & ok_x[None, :]
    store = in_crop_y[:, None] & in_crop_x[None, :]
    optr = out + n * so_n + cy_idx[:, None].to(tl.int64) * so_y + cx_idx[None, :].to(tl.int64) * so_x
    # Padding (crop larger than the resized image) is 0, as torchvision's CenterCrop pads.
    v = tl.where(ok, _round_u8(acc0 / sum_y[:, None]), 0.0)
    _store_out(optr, (v - m0) * r0, store)
    v = tl.where(ok, _round_u8(acc1 / sum_y[:, None]), 0.0)
    _store_out(optr + so_c, (v - m1) * r1, store)
    v = tl.where(ok, _round_u8(acc2 / sum_y[:, None]), 0.0)
    _store_out(optr + 2 * so_c, (v - m2) * r2, store)


# Keyed on the crop only, so tuning happens once (call warmup() at start-up), never mid-serving.
@triton.autotune(configs=_configs(), key=["CROP"])
@triton.jit
def _preprocess_kernel(
    src,  # uint8 packed images
    iparams,  # int64 [N, _NI]
    fparams,  # float32 [N, _NF]
    out,  # [N, 3, CROP, CROP] any strides
    so_n,
    so_c,
    so_y,
    so_x,
    m0,
    m1,
    m2,  # mean * 255
    r0,
    r1,
    r2,  # 1 / (std * 255)
    CROP: tl.constexpr,
    BY: tl.constexpr,
    BX: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    (n, off, w_in, s_row, s_col, s_ch, fsx, ssx, ssy, cy_idx, cx_idx, in_crop_y, in_crop_x,
     ok_y, ok_x, cen_x, vy, vx, r_lo, r_hi, c_lo, c_hi) = _tile(iparams, fparams, CROP, BY, BX)  # fmt: skip

    # Horizontal weight sums, needed before PIL's intermediate rounding.
    sum_x = tl.zeros([BX], dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BK):
        cols = c0 + tl.arange(0, BK)
        wx = tl.maximum(1.0 - tl.abs((cols.to(tl.float32) * ssx)[:, None] - vx[None, :]), 0.0)
        wx = tl.where((cols < c_hi)[:, None], wx, 0.0)
        sum_x += tl.sum(wx, axis=0)
    sum_x = tl.where(sum_x > 0.0, sum_x, 1.0)

    acc0 = tl.zeros([BY, BX], dtype=tl.float32)
    acc1 = tl.zeros([BY, BX], dtype=tl.float32)
    acc2 = tl.zeros([BY, BX], dtype=tl.float32)
    sum_y = tl.zeros([BY], dtype=tl.float32)
    base = src + off
    for rr in range(r_lo, r_hi, BR):
        rows = rr + tl.arange(0, BR)
        row_ok = rows < r_hi
        h0 = tl.zeros([BR, BX], dtype=tl.float32)
        h1 = tl.zeros([BR, BX], dtype=tl.float32)
        h2 = tl.zeros([BR, BX], dtype=tl.float32)
        row_off = rows[:, None] * s_row
        for c0 in range(c_lo, c_hi, BK):
            cols = c0 + tl.arange(0, BK)
            col_ok = cols < c_hi
            # No mask on the weights: pixels past the window load as 0, so their weight is moot.
            wx = tl.maximum(1.0 - tl.abs((cols.to(tl.float32) * ssx)[:, None] - vx[None, :]), 0.0)
            wx_hi, wx_lo = _split_fp16(wx)
            ptr = base + (row_off + cols[None, :] * s_col)
            m = row_ok[:, None] & col_ok[None, :]
            p = tl.load(ptr, mask=m, other=0).to(tl.float16)
            h0 = tl.dot(p, wx_hi, h0)
            h0 = tl.dot(p, wx_lo, h0)
            p = tl.load(ptr + s_ch, mask=m, other=0).to(tl.float16)
            h1 = tl.dot(p, wx_hi, h1)
            h1 = tl.dot(p, wx_lo, h1)
            p = tl.load(ptr + 2 * s_ch, mask=m, other=0).to(tl.float16)
            h2 = tl.dot(p, wx_hi, h2)
            h2 = tl.dot(p, wx_lo, h2)
        acc0, acc1, acc2, sum_y = _vertical(rows, row_ok, ssy, vy, sum_x, h0, h1, h2, acc0, acc1, acc2, sum_y)

    _write_tile(out, n, so_n, so_c, so_y, so_x, cy_idx, cx_idx, in_crop_y, in_crop_x, ok_y, ok_x,
                acc0, acc1, acc2, sum_y, m0, m1, m2, r0, r1, r2)  # fmt: skip


def _banded_configs():
    if _INTERPRET:
        # Big tiles: the interpreter's cost is per program and per op, not per element (the 224 crop of a
        # 480x640 image took 32 s here against 130 s with the GPU's 32x32x16 tiles; several tiles still).
        return [triton.Config({"BY": 64, "BX": 64, "BR": 32}, num_warps=4)]
    # BR x BX is the horizontal-pass tile: one lane per (source row, output column), each loading its
    # window's 16-byte blocks. BY sets how many crop rows share one pass over the window's source rows
    # (the filter margin, ~2 * scale rows, is redone per tile). BR >= 16: it is the K of the vertical
    # tl.dot. ptxas -v (triton 3.8, compiled on the CPU machine): these take 161 to 209 registers with
    # no spills on sm_80 and sm_90a for every output dtype; 32x32 with 4 warps spilled 64 bytes (bf16 out,
    # sm_80), BY=BX=64 with 8 warps 96, BR=32 76 (test_kernels_do_not_spill_registers). Untimed on a GPU:
    # the autotuner picks.
    return [
        triton.Config({"BY": 32, "BX": 32, "BR": 16}, num_warps=8),
        triton.Config({"BY": 64, "BX": 32, "BR": 16}, num_warps=8),
        triton.Config({"BY": 64, "BX": 16, "BR": 16}, num_warps=4),
        triton.Config({"BY": 32, "BX": 64, "BR": 16}, num_warps=8),
    ]


@triton.jit
def _block_words(base32, start, k, mask):
    """The k-th 16-byte block from the aligned one holding byte `start` ([BR, BX] int32, from base32),
    as int32 words [BR, BX, 4]: one ld.global.v4 per lane (start >> 4 << 2 is a multiple of 4 words
    and base32 is 16-byte aligned, which Triton sees, so it vectorizes)."""
    w = ((start >> 4) << 2) + k * 4
    return tl.load(base32 + (w[:, :, None] + tl.arange(0, 4)[None, None, :]), mask=mask[:, :, None], other=0)


@triton.jit
def _tap_weights(j, xmin, xmax, ssx, vx):
    """PIL's triangle weight of source column j ([BR, BX, 4]) for each lane's output column; 0 outside
    the column's window [xmin, xmax)."""
    ok = (j >= xmin[None, :, None]) & (j < xmax[None, :, None])
    return tl.where(ok, tl.maximum(1.0 - tl.abs(j.to(tl.float32) * ssx - vx[None, :, None]), 0.0), 0.0)


@triton.jit
def _taps_interleaved(
    base32, rb, row_ok, lane_ok, xmin, xmax, ntx, ssx, vx, BR: tl.constexpr, BX: tl.constexpr
):
    """Horizontal pass of HWC rows (pixel j, channel c at byte rb + 3 j + c), all three channels from
    one stream of 16-byte blocks: each lane reads its output column's window (xmax - xmin <= ntx
    pixels) block by block and splits every byte by channel in registers."""
    start = rb[:, None] + xmin[None, :] * 3  # [BR, BX] first byte of the lane's window
    d0 = start - (start & 15) - rb[:, None]  # from the row's first byte to the aligned block (>= -15)
    span = (start & 15) + (xmax - xmin)[None, :] * 3  # bytes from the aligned block to the window end
    ok = row_ok[:, None] & lane_ok[None, :]
    i4 = tl.arange(0, 4)
    h0 = tl.zeros([BR, BX], dtype=tl.float32)
    h1 = tl.zeros([BR, BX], dtype=tl.float32)
    h2 = tl.zeros([BR, BX], dtype=tl.float32)
    for k in range(0, (ntx * 3 + 30) // 16):
        words = _block_words(base32, start, k, ok & (k * 16 < span))
        for b in tl.static_range(4):
            d = d0[:, :, None] + (k * 16 + b) + i4[None, None, :] * 4  # byte b of each word, from the row
            j = (d + 48) // 3 - 16  # its pixel: floor division, biased since d may be negative
            p = ((words >> (8 * b)) & 255).to(tl.float32) * _tap_weights(j, xmin, xmax, ssx, vx)
            c = d - 3 * j
            h0 += tl.sum(tl.where(c == 0, p, 0.0), axis=2)
            h1 += tl.sum(tl.where(c == 1, p, 0.0), axis=2)
            h2 += tl.sum(tl.where(c == 2, p, 0.0), axis=2)
    return h0, h1, h2


@triton.jit
def _taps_planar(base32, rb, row_ok, lane_ok, xmin, xmax, ntx, ssx, vx, BR: tl.constexpr, BX: tl.constexpr):
    """Horizontal pass of one channel plane's rows (pixel j at byte rb + j), e.g. nvJPEG's CHW output."""
    start = rb[:, None] + xmin[None, :]
    d0 = start - (start & 15) - rb[:, None]
    span = (start & 15) + (xmax - xmin)[None, :]
    ok = row_ok[:, None] & lane_ok[None, :]
    i4 = tl.arange(0, 4)
    h = tl.zeros([BR, BX], dtype=tl.float32)
    for k in range(0, (ntx + 30) // 16):
        words = _block_words(base32, start, k, ok & (k * 16 < span))
        for b in tl.static_range(4):
            j = d0[:, :, None] + (k * 16 + b) + i4[None, None, :] * 4
            p = ((words >> (8 * b)) & 255).to(tl.float32) * _tap_weights(j, xmin, xmax, ssx, vx)
            h += tl.sum(p, axis=2)
    return h


@triton.autotune(configs=_banded_configs(), key=["CROP"])
@triton.jit
def _banded_kernel(
    src,  # uint8 packed images, 16-byte aligned and readable to a multiple of 16 bytes (launch_params)
    iparams,  # int64 [N, _NI]
    fparams,  # float32 [N, _NF]
    out,  # [N, 3, CROP, CROP] any strides
    so_n,
    so_c,
    so_y,
    so_x,
    m0,
    m1,
    m2,  # mean * 255
    r0,
    r1,
    r2,  # 1 / (std * 255)
    CROP: tl.constexpr,
    BY: tl.constexpr,
    BX: tl.constexpr,
    BR: tl.constexpr,
):
    (n, off, w_in, s_row, s_col, s_ch, fsx, ssx, ssy, cy_idx, cx_idx, in_crop_y, in_crop_x,
     ok_y, ok_x, cen_x, vy, vx, r_lo, r_hi, c_lo, c_hi) = _tile(iparams, fparams, CROP, BY, BX)  # fmt: skip

    # PIL's per-column window: xmin = (int)(center - support + 0.5) clipped to 0, xmax likewise clipped
    # to the width, at most ceil(support) * 2 + 1 taps. The tap count is per image (a runtime loop
    # bound), so a 0.3 MP image next to a 10 MP one in the batch runs 5 taps, not 23.
    xmin = tl.maximum((cen_x - fsx + 0.5).to(tl.int32), 0)
    xmax = tl.minimum((cen_x + fsx + 0.5).to(tl.int32), w_in)
    ntx = tl.ceil(fsx).to(tl.int32) * 2 + 1
    kk = tl.arange(0, 8)
    sum_x = tl.zeros([BX], dtype=tl.float32)
    for k0 in range(0, ntx, 8):
        j = xmin[:, None] + (k0 + kk)[None, :]  # [BX, 8] source columns
        wk = tl.maximum(1.0 - tl.abs(j.to(tl.float32) * ssx - vx[:, None]), 0.0)
        sum_x += tl.sum(tl.where(j < xmax[:, None], wk, 0.0), axis=1)
    sum_x = tl.where(sum_x > 0.0, sum_x, 1.0)

    # The image's bytes as int32 words from the 16-byte boundary at or below its offset: every load
    # below is a whole aligned 16-byte block (ld.global.v4.b32), where the byte-per-lane gathers of the
    # previous version issued one 1-byte load per tap and channel (5.1 to 9.4% of the copy bandwidth on
    # an H200, benchmarks/RESULTS.md run 3).
    base32 = src.to(tl.pointer_type(tl.int32)) + ((off >> 4) << 2)
    off_lo = (off & 15).to(tl.int32)
    acc0 = tl.zeros([BY, BX], dtype=tl.float32)
    acc1 = tl.zeros([BY, BX], dtype=tl.float32)
    acc2 = tl.zeros([BY, BX], dtype=tl.float32)
    sum_y = tl.zeros([BY], dtype=tl.float32)
    for rr in range(r_lo, r_hi, BR):
        rows = rr + tl.arange(0, BR)
        row_ok = rows < r_hi
        rb = off_lo + rows * s_row  # [BR] byte of each row's first pixel, from base32
        # The two layouts the host packs (make_params checks): HWC, and planes (CHW, e.g. nvJPEG's).
        if s_col == 1:
            h0 = _taps_planar(base32, rb, row_ok, ok_x, xmin, xmax, ntx, ssx, vx, BR, BX)
            h1 = _taps_planar(base32, rb + s_ch, row_ok, ok_x, xmin, xmax, ntx, ssx, vx, BR, BX)
            h2 = _taps_planar(base32, rb + 2 * s_ch, row_ok, ok_x, xmin, xmax, ntx, ssx, vx, BR, BX)
        else:
            h0, h1, h2 = _taps_interleaved(base32, rb, row_ok, ok_x, xmin, xmax, ntx, ssx, vx, BR, BX)
        acc0, acc1, acc2, sum_y = _vertical(rows, row_ok, ssy, vy, sum_x, h0, h1, h2, acc0, acc1, acc2, sum_y)

    _write_tile(out, n, so_n, so_c, so_y, so_x, cy_idx, cx_idx, in_crop_y, in_crop_x, ok_y, ok_x,
                acc0, acc1, acc2, sum_y, m0, m1, m2, r0, r1, r2)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Host side: geometry, packing, launch.


def resized_size(h: int, w: int, resize: int) -> tuple[int, int]:
    """torchvision's Resize(int) output size for an (h, w) image: shorter side -> resize, longer truncated."""
    if w <= h:
        return int(resize * h / w), resize
    return resize, int(resize * w / h)


def crop_origin(rh: int, rw: int, crop: int) -> tuple[int, int]:
    """torchvision's CenterCrop origin in the resized image; negative when the crop pads."""

    def one(size: int) -> int:
        if size >= crop:
            return int(round((size - crop) / 2.0))
        return -((crop - size) // 2)

    return one(rh), one(rw)


def _check_spec(spec):
    for name in ("resize", "crop", "mean", "std", "dtype"):
        if not hasattr(spec, name):
            raise TypeError(f"preprocess_batch_triton: expected a PreprocessSpec, got {type(spec).__name__}")
    if spec.dtype not in _OUT_DTYPES:
        raise ValueError(
            f"preprocess_batch_triton: spec.dtype must be float32, float16 or bfloat16, got {spec.dtype}"
        )
    if int(spec.crop) < 1 or int(spec.resize) < 1:
        raise ValueError(
            f"preprocess_batch_triton: resize and crop must be >= 1, got {spec.resize}, {spec.crop}"
        )


def _shape_of(img) -> tuple[int, int]:
    if isinstance(img, np.ndarray):
        dtype_ok = img.dtype == np.uint8
    elif isinstance(img, torch.Tensor):
        dtype_ok = img.dtype == torch.uint8
    else:
        raise TypeError(
            f"preprocess_batch_triton: expected uint8 [H, W, 3] numpy arrays or tensors, got {type(img).__name__}"
        )
    shape = tuple(img.shape)
    if not dtype_ok or len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"preprocess_batch_triton: expected a uint8 array [H, W, 3], got {img.dtype} {list(shape)}. "
            "Decode with aurora_core.decode() first."
        )
    return shape[0], shape[1]


def _geometry(shapes, spec, orig_sizes, scales):
    """Per image: (top, left, rh, rw, sy, sx) of the resampling, from the full-resolution size."""
    n = len(shapes)
    if orig_sizes is not None and len(orig_sizes) != n:
        raise ValueError(f"preprocess_batch_triton: {n} images but {len(orig_sizes)} orig_sizes")
    if scales is not None and len(scales) != n:
        raise ValueError(f"preprocess_batch_triton: {n} images but {len(scales)} scales")
    geo = []
    for i, (h, w) in enumerate(shapes):
        s = 1 if scales is None else scales[i]
        h0, w0 = (h, w) if orig_sizes is None else (int(orig_sizes[i][0]), int(orig_sizes[i][1]))
        if s < 1 or h0 < 1 or w0 < 1:
            raise ValueError(f"preprocess_batch_triton: bad orig_size {(h0, w0)} or scale {s} for image {i}")
        if (h, w) != (math.ceil(h0 / s), math.ceil(w0 / s)):
            raise ValueError(
                f"preprocess_batch_triton: image {i} is {h}x{w}, expected ceil({h0}/{s}) x ceil({w0}/{s}) "
                "for its orig_size and scale"
            )
        if h * w * 3 >= 2**31:
            raise ValueError(f"preprocess_batch_triton: image {i} is {h}x{w}: over 2**31 bytes")
        rh, rw = resized_size(h0, w0, int(spec.resize))
        top, left = crop_origin(rh, rw, int(spec.crop))
        # The scaled image stands for the extent (h0/s, w0/s): that fraction sets the filter scale.
        geo.append((top, left, rh, rw, (h0 / s) / rh, (w0 / s) / rw))
    return geo


def _pick_device(imgs, out, device):
    if device is not None:
        return torch.device(device)
    if out is not None:
        return out.device
    for img in imgs:
        if isinstance(img, torch.Tensor) and img.is_cuda:
            return img.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _layout(t: torch.Tensor):
    """(flat storage-order view, strides row/col/ch) without copying HWC or CHW-permuted tensors."""
    h, w, _ = t.shape
    if t.is_contiguous():
        return t.reshape(-1), (3 * w, 3, 1)
    chw = t.permute(2, 0, 1)
    if chw.is_contiguous():  # e.g. torchvision's decode_jpeg output viewed as HWC
        return chw.reshape(-1), (w, 1, h * w)
    return t.contiguous().reshape(-1), (3 * w, 3, 1)


class _Staging:
    """A grow-only pinned host buffer for the packed bytes; reused once its last H2D copy finished."""

    def __init__(self):
        self.lock = threading.Lock()
        self.buf: torch.Tensor | None = None
        self.done: torch.cuda.Event | None = None

    def get(self, nbytes: int) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()  # the previous copy may still be reading the buffer
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = torch.empty(max(nbytes, 1 << 20) * 5 // 4, dtype=torch.uint8, pin_memory=True)
        return self.buf[:nbytes]


_staging = _Staging()


def pack_images(imgs, device) -> tuple[torch.Tensor, list[int], list[tuple[int, int, int]]]:
    """Pack images into one uint8 buffer on `device`. Returns (buffer, offsets, strides per image).

    CPU inputs go through a pinned staging buffer and ONE host-to-device copy; CUDA inputs are
    concatenated on the device (HWC or CHW kept as they are).
    """
    device = torch.device(device)
    flats, strides, offsets = [], [], []
    total = 0
    for img in imgs:
        h, w = img.shape[0], img.shape[1]
        if isinstance(img, torch.Tensor) and img.device.type == device.type and device.type == "cuda":
            flat, st = _layout(img)
        else:
            flat, st = None, (3 * w, 3, 1)
        flats.append(flat)
        strides.append(st)
        offsets.append(total)
        total += h * w * 3

    if device.type != "cuda":
        buf = torch.empty(_padded(total), dtype=torch.uint8)[:total]
        host = buf.numpy()
        for img, off in zip(imgs, offsets, strict=True):
            a = img.numpy() if isinstance(img, torch.Tensor) else img
            host[off : off + a.size].reshape(a.shape)[...] = a
        return buf, offsets, strides

    if all(f is not None for f in flats):
        if len(flats) == 1:
            return flats[0], offsets, strides  # the kernel only reads it
        buf = torch.empty(_padded(total), dtype=torch.uint8, device=device)[:total]
        torch.cat(flats, out=buf)
        return buf, offsets, strides

    buf = torch.empty(_padded(total), dtype=torch.uint8, device=device)[:total]
    cpu_idx = [i for i, f in enumerate(flats) if f is None]
    with _staging.lock:
        # CPU images are laid out contiguously in the staging buffer in their final offsets' order.
        lo = offsets[cpu_idx[0]]
        hi = offsets[cpu_idx[-1]] + imgs[cpu_idx[-1]].shape[0] * imgs[cpu_idx[-1]].shape[1] * 3
        stage = _staging.get(hi - lo)
        host = stage.numpy()
        for i in cpu_idx:
            img = imgs[i]
            a = img.cpu().numpy() if isinstance(img, torch.Tensor) else img
            host[offsets[i] - lo : offsets[i] - lo + a.size].reshape(a.shape)[...] = a
        buf[lo:hi].copy_(stage, non_blocking=True)
        _staging.done = torch.cuda.Event()
        _staging.done.record()
    for i, f in enumerate(flats):
        if f is not None:  # between CPU images: a device copy into its own range
            buf[offsets[i] : offsets[i] + f.numel()].copy_(f)
    return buf, offsets, strides


def make_params(offsets, strides, shapes, geo, device):
    """Per-image tables on `device`: (iparams int64 [N, 10], fparams float32 [N, 2])."""
    n = len(shapes)
    for i, (srow, scol, sch) in enumerate(strides):
        if (scol, sch) != (3, 1) and scol != 1:  # the two layouts the banded kernel reads
            raise ValueError(
                f"preprocess_batch_triton: image {i} has byte strides (row, col, channel) {(srow, scol, sch)}; "
                "expected interleaved HWC (row, 3, 1) or channel planes (row, 1, plane). Pass a contiguous copy."
            )
    rows = [
        (off, h, w, srow, scol, sch, top, left, rh, rw)
        for (h, w), off, (srow, scol, sch), (top, left, rh, rw, _, _) in zip(
            shapes, offsets, strides, geo, strict=True
        )
    ]
    iparams = torch.from_numpy(np.array(rows, dtype=np.int64).reshape(n, _NI))
    fparams = torch.from_numpy(np.array([(g[4], g[5]) for g in geo], dtype=np.float32).reshape(n, _NF))
    if torch.device(device).type == "cuda":
        iparams, fparams = iparams.pin_memory(), fparams.pin_memory()
    return iparams.to(device, non_blocking=True), fparams.to(device, non_blocking=True)


_tune_lock = threading.Lock()
_tuned: set = set()

IMPLS = ("banded", "dense")


def impl_name(impl: str | None = None) -> str:
    """The implementation to run: `impl`, else env AURORA_TRITON_IMPL, else "banded"."""
    name = impl or os.environ.get("AURORA_TRITON_IMPL") or "banded"
    if name not in IMPLS:
        raise ValueError(f"preprocess_batch_triton: impl must be one of {IMPLS}, got {name!r}")
    return name


def _padded(nbytes: int) -> int:
    return max(16, -(-nbytes // 16) * 16)


def wide_readable(packed: torch.Tensor) -> torch.Tensor:
    """`packed` (uint8, 1-D, contiguous), or a copy of it, that the banded kernel may read in whole
    aligned 16-byte blocks: its first byte on a 16-byte boundary and its storage readable up to the next
    multiple of 16 bytes past its end. pack_images' buffers already are; a benchmark that packs its own
    calls this once, outside the timed launch."""
    storage = packed.untyped_storage()
    room = storage.nbytes() - (packed.data_ptr() - storage.data_ptr())
    if packed.data_ptr() % 16 == 0 and room >= _padded(packed.numel()):
        return packed
    buf = torch.zeros(_padded(packed.numel()), dtype=torch.uint8, device=packed.device)
    buf[: packed.numel()].copy_(packed)
    return buf[: packed.numel()]


def launch_params(packed, iparams, fparams, spec, out, impl=None):
    """The launch alone, on packed bytes and prebuilt tables (what the kernel benchmarks time).

    impl: "banded" or "dense" (default: env AURORA_TRITON_IMPL, else "banded"). The banded kernel
    reads `packed` through wide_readable (a copy only when it is misaligned or unpadded)."""
    n, crop, impl = iparams.shape[0], int(spec.crop), impl_name(impl)
    if impl == "banded":
        packed = wide_readable(packed)
    key = (impl, crop, out.dtype, packed.device)  # what the autotuner keys on (its key, plus arg dtypes)
    if key not in _tuned:
        # Triton's autotuner is not thread-safe: the first launch per key tunes alone.
        with _tune_lock:
            _launch(packed, iparams, fparams, spec, out, n, crop, impl)
            _tuned.add(key)
        return out
    return _launch(packed, iparams, fparams, spec, out, n, crop, impl)


def _launch(packed, iparams, fparams, spec, out, n, crop, impl):
    mean = [float(m) * 255.0 for m in spec.mean]
    rstd = [1.0 / (float(s) * 255.0) for s in spec.std]
    grid = lambda meta: (triton.cdiv(crop, meta["BY"]) * triton.cdiv(crop, meta["BX"]), n)  # noqa: E731
    kernel = _banded_kernel if impl == "banded" else _preprocess_kernel
    kernel[grid](
        packed,
        iparams,
        fparams,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        out.stride(3),
        *mean,
        *rstd,
        CROP=crop,
    )
    return out


def launch(packed, offsets, strides, shapes, geo, spec, out, impl=None):
    """Run the kernel on an already packed buffer."""
    iparams, fparams = make_params(offsets, strides, shapes, geo, packed.device)
    return launch_params(packed, iparams, fparams, spec, out, impl)


def prepare(imgs, spec, *, orig_sizes=None, scales=None, device=None):
    """Validate and pack a batch: (packed, offsets, strides, shapes, geometry, device)."""
    _check_spec(spec)
    if isinstance(imgs, (np.ndarray, torch.Tensor)) and imgs.ndim == 3:
        imgs = [imgs]
    imgs = list(imgs)
    if not imgs:
        raise ValueError("preprocess_batch_triton: expected at least one image, got an empty list")
    shapes = [_shape_of(img) for img in imgs]
    geo = _geometry(shapes, spec, orig_sizes, scales)
    dev = torch.device(device) if device is not None else _pick_device(imgs, None, None)
    packed, offsets, strides = pack_images(imgs, dev)
    return packed, offsets, strides, shapes, geo, dev


def preprocess_batch_triton(
    imgs, spec, out=None, *, orig_sizes=None, scales=None, device=None, impl=None
) -> torch.Tensor:
    """Resize, center-crop, normalize and lay out a batch in one Triton launch.

    imgs (list of uint8 [H_i, W_i, 3], numpy or torch, CPU or CUDA; CHW-contiguous tensors viewed as
    HWC are read without a copy), spec (PreprocessSpec), out (optional Tensor[N, 3, crop, crop] of
    spec.dtype on the target device; may be a view), orig_sizes/scales (full-resolution (H0, W0) and
    DCT scale of each image; the image then stands for the extent (H0/s, W0/s)), impl ("banded" or
    "dense"; default env AURORA_TRITON_IMPL, else "banded": both give the same result within one level).
    Returns Tensor[N, 3, crop, crop] of spec.dtype: `out` when given.
    Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
    """
    if isinstance(imgs, (np.ndarray, torch.Tensor)) and imgs.ndim == 3:
        imgs = [imgs]
    imgs = list(imgs)
    impl = impl_name(impl)  # a bad name fails before any packing
    dev = _pick_device(imgs, out, device)
    if dev.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"preprocess_batch_triton: needs a CUDA device, got {dev}. "
            "Use backend='cpp' on the CPU (or set TRITON_INTERPRET=1 for tests)."
        )
    packed, offsets, strides, shapes, geo, dev = prepare(
        imgs, spec, orig_sizes=orig_sizes, scales=scales, device=dev
    )
    n, crop = len(shapes), int(spec.crop)
    if out is None:
        out = torch.empty((n, 3, crop, crop), dtype=spec.dtype, device=dev)
    else:
        if tuple(out.shape) != (n, 3, crop, crop) or out.dtype != spec.dtype:
            raise ValueError(
                f"preprocess_batch_triton: out must be {spec.dtype} [{n}, 3, {crop}, {crop}], "
                f"got {out.dtype} {list(out.shape)}"
            )
        if out.device != packed.device and not (out.device.type == packed.device.type == "cuda"):
            raise ValueError(f"preprocess_batch_triton: out is on {out.device}, images go to {packed.device}")
    return launch(packed, offsets, strides, shapes, geo, spec, out, impl)


def warmup(spec, device="cuda", impl=None) -> None:
    """Compile and autotune for `spec` on a photo-like batch (a 0.3 MP and a 10 MP image), once.

    The first launch for a crop size compiles each candidate config and times them (seconds); a
    server calls this at start-up so that no request pays for it.
    """
    rng = np.random.default_rng(0)
    imgs = [
        rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        rng.integers(0, 256, (2592, 3872, 3), dtype=np.uint8),
    ]
    preprocess_batch_triton(imgs * 4, spec, device=device, impl=impl)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
