"""A small GGUF reader: metadata, tensor directory and dequantization to float32 (numpy).

Layout (GGUF v2/v3, little endian): magic b"GGUF", version u32, tensor count u64, metadata count u64,
metadata key/value pairs, tensor infos (name, dims with the fastest-varying first, type, offset),
then the tensor data, aligned to `general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class GGUFError(ValueError):
    pass


# Metadata value types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# Tensor types: name -> (id, elements per block, bytes per block).
GGML_TYPES = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}
_TYPE_NAMES = {v[0]: k for k, v in GGML_TYPES.items()}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # row-major (PyTorch) order: the reverse of the GGUF dims
    type: str
    data: np.ndarray  # raw bytes (uint8), a view into the mapped file

    def dequantize(self) -> np.ndarray:
        return dequantize(self.data, self.type, self.shape)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: corrupt GGUF header (string runs past the end of the file)")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if n > len(self.buf):
                raise GGUFError(f"{self.path}: corrupt GGUF header (array of {n} items)")
            if etype in _SCALARS and etype != 7:
                dtype = np.dtype(_SCALARS[etype])
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
                self.pos += n * dtype.itemsize
                return arr
            return [self.value(etype) for _ in range(n)]
        raise GGUFError(f"{self.path}: corrupt GGUF header (unknown metadata type {vtype})")


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (dict) and `tensors` (name -> GGUFTensor, raw)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such file") from None
        except ValueError:  # empty file
            raise GGUFError(f"{self.path}: not a GGUF file (empty)") from None
        try:
            self._parse()
        except (struct.error, IndexError, ValueError) as e:
            if isinstance(e, GGUFError):
                raise
            raise GGUFError(f"{self.path}: corrupt GGUF header ({e})") from None

    def _parse(self) -> None:
        buf = self._mmap
        if buf[:4] != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        cur = _Cursor(buf, self.path)
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > len(buf) or n_kv > len(buf):
            raise GGUFError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            ttype, offset = cur.unpack("<I"), cur.unpack("<Q")
            if ttype not in _TYPE_NAMES:
                raise GGUFError(f"{self.path}: tensor {name!r} has unsupported GGML type {ttype}")
            infos.append((name, dims, _TYPE_NAMES[ttype], offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ttype, offset in infos:
            _, block, nbytes = GGML_TYPES[ttype]
            n = int(np.prod(dims)) if dims else 1
            if n % block:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n} elements, not a multiple of {block}")
            size = n // block * nbytes
            if start + offset + size > len(buf):
                raise GGUFError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
            data = np.frombuffer(buf, dtype=np.uint8, count=size, offset=start + offset)
            self.tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ttype, data)


def _f16(b: np.ndarray) -> np.ndarray:
    """(n_blocks, 2) uint8 -> (n_blocks, 1) float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K packs 8 6-bit scales and 8 6-bit mins in 12 bytes: (n, 12) -> two (n, 8) arrays."""
    s = scales.astype(np.uint8)
    sc = np.empty((len(s), 8), np.uint8)
    mn = np.empty((len(s), 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def dequantize(raw: np.ndarray, ttype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF tensor bytes -> float32 array of `shape`."""
    if ttype == "F32":
        out = raw.view(np.float32).copy()
    elif ttype == "F16":
        out = raw.view(np.float16).astype(np.float32)
    elif ttype == "BF16":
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        _, _, nbytes = GGML_TYPES[ttype]
        b = raw.reshape(-1, nbytes)
        if ttype == "Q8_0":  # d f16, 32 x int8
            out = _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)
        elif ttype == "Q4_0":  # d f16, 16 bytes of nibbles; x = (q - 8) * d
            out = _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)
        elif ttype == "Q4_1":  # d f16, m f16, 16 bytes of nibbles; x = q * d + m
            out = _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])
        elif ttype == "Q4_K":  # d, dmin f16, 12 bytes of scales/mins, 128 bytes of nibbles; 8 sub-blocks of 32
            d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
            sc, mn = _scale_min_k4(b[:, 4:16])
            qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: low nibbles then high nibbles
            q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
            out = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
        elif ttype == "Q6_K":  # ql 128, qh 64, 16 int8 scales, d f16; 16 sub-blocks of 16
            ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
            scales = b[:, 192:208].view(np.int8).astype(np.float32)
            d = _f16(b[:, 208:210])
            q = np.empty((len(b), 2, 4, 32), np.int8)  # (block, half, quarter, 32)
            q[:, :, 0] = (ql[:, :, :32] & 0x0F) | ((qh >> 0 & 3) << 4)
            q[:, :, 1] = (ql[:, :, 32:] & 0x0F) | ((qh >> 2 & 3) << 4)
            q[:, :, 2] = (ql[:, :, :32] >> 4) | ((qh >> 4 & 3) << 4)
            q[:, :, 3] = (ql[:, :, 32:] >> 4) | ((qh >> 6 & 3) << 4)
            q = (q.astype(np.float32) - 32).reshape(-1, 16, 16)
            out = d[:, :, None] * scales[:, :, None] * q
        else:
            raise GGUFError(f"GGML type {ttype} is not supported")
    return np.asarray(out, dtype=np.float32).reshape(shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) back to HF's rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
