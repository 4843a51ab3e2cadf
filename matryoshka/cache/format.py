"""The cache format: array layout, storage dtypes, codecs, manifest and fingerprint.

A cache is a zarr v3 group::

    zarr.json            group attributes: {"manifest": ..., "progress": ..., "stats": ...}
    acts/<layer>.<site>  [n_tokens, d_model], chunked by whole sequences, compressed, crc32c-checked
    tokens               [n_tokens] int32, the token ids, aligned row by row with every acts array
    .writer.lock         held (flock) while a writer is running

Rows are token-major: row ``s * context_size + p`` is position ``p`` of sequence ``s``. Every array
shares one chunking along rows, so chunk ``i`` of each array holds the same tokens.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from crc32c import crc32c  # releases the GIL on large buffers; google_crc32c (zarr's) holds it, which

# serialized every decode thread's checksum behind one lock

FORMAT_VERSION = 1

STORAGE = {
    # name: (numpy dtype on disk, torch dtype, bytes per element)
    "float32": (np.dtype("float32"), torch.float32, 4),
    "float16": (np.dtype("float16"), torch.float16, 2),
    # numpy has no bfloat16: the cache stores its bits as uint16 and records the dtype.
    "bfloat16": (np.dtype("uint16"), torch.bfloat16, 2),
    # float8 e4m3 scaled per row: each row is stored as uint8 bits of x / scale, followed by the 4 bytes
    # of its float32 scale (the row's largest |x| / 448, so nothing overflows). Half of bf16's bytes.
    "float8": (np.dtype("uint8"), torch.float8_e4m3fn, 1),
}
SCALE_BYTES = 4
"""Bytes a float8 row carries after its values: its float32 scale."""
FP8_MAX = 448.0


def row_width(width: int, dtype: str) -> int:
    """Stored columns per row of an array of ``width`` values."""
    return width + SCALE_BYTES if dtype == "float8" else width


def row_bytes(width: int, dtype: str) -> int:
    """Stored bytes per row of an array of ``width`` values (before compression)."""
    return row_width(width, dtype) * STORAGE[dtype][2]


def to_storage(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Cast to the storage dtype and view as the on-disk element type (bf16 bits as int16; float8 rows
    as uint8 values then scale bytes)."""
    if dtype != "float8":
        t = x.to(STORAGE[dtype][1])
        return t.view(torch.int16) if dtype == "bfloat16" else t
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale works
    q = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([q, scale.contiguous().view(torch.uint8)], dim=-1)


def from_storage(t: torch.Tensor, storage: str, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows (as :func:`to_storage` made them, any device) as values of ``dtype``."""
    if storage != "float8":
        return t if t.dtype == dtype else t.to(dtype)  # even a no-op .to() costs a GIL hand-off
    values = t[..., :-SCALE_BYTES].view(torch.float8_e4m3fn).float()
    return (values * t[..., -SCALE_BYTES:].contiguous().view(torch.float32)).to(dtype)


def host_view(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor from ``to_storage`` as the numpy array zarr writes."""
    a = t.numpy()
    return a.view(np.uint16) if dtype == "bfloat16" else a


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as numpy, bf16 as its uint16 bits (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()  # bits -> value


def decode(a: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as float32 numpy (bf16 bits shifted into the high half of a float32; float8 bits
    looked up and multiplied by the row's scale), written into ``out`` when given (float32 storage
    needs no conversion and is returned as it is)."""
    if dtype == "bfloat16":
        bits = np.empty(a.shape, np.uint32) if out is None else out.view(np.uint32)
        np.left_shift(a.view(np.uint16), 16, out=bits, dtype=np.uint32)  # one pass, not astype then a shift
        return bits.view(np.float32)
    if dtype == "float8":
        scale = np.ascontiguousarray(a[..., -SCALE_BYTES:]).view(np.float32)
        with np.errstate(invalid="ignore"):  # a non-finite row decodes to nan; the writer reports it
            return np.multiply(_FP8_VALUES[a[..., :-SCALE_BYTES]], scale, out=out)
    if out is None:
        return a.astype(np.float32, copy=False)
    np.copyto(out, a)
    return out


def bos_rows(bos: dict[str, Any], positions, tokens=None):
    """Which rows are BOS rows, the attention-sink outliers that statistics, the reader and the LM splice
    all leave out: under the ``context`` policy the BOS that opens each context (position 0), under
    ``document`` every token with the BOS id (each opens a document), with no BOS id none. GPT-2's BOS
    id is also the separator between documents inside a context; under ``context`` those separators
    are ordinary tokens, as in the model's pre-training. ``positions`` (in the context) and ``tokens``
    (needed for ``document`` only) are numpy arrays or torch tensors of one shape; so is the result."""
    if bos["token_id"] is None:
        return positions < 0
    if bos["policy"] == "context":
        return positions == 0
    return tokens == bos["token_id"]


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values as a torch tensor of the storage dtype, without a copy (float8: its uint8 rows)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def compressors(codec: str, itemsize: int) -> list:
    """Codec chain for activation arrays; crc32c last, so every chunk carries a checksum.

    The default, blosc lz4 with bitshuffle, compresses activations about as well as zstd and decodes
    faster (docs/benchmarks.md, "Codecs"): the reader's speed matters more than a few percent of disk.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    chain: list = []
    if codec in BLOSC:
        cname, level = BLOSC[codec]
        chain.append(BloscCodec(cname=cname.decode(), clevel=level, shuffle="bitshuffle", typesize=itemsize))
    return chain + [Crc32cCodec()]


def token_codec(codec: str) -> str:
    """The tokens array's codec: zstd compresses token ids far better than the activations' lz4."""
    return "zstd" if codec != "none" else "none"


BLOSC = {"lz4": (b"lz4", 5), "zstd": (b"zstd", 1)}
"""Blosc compressor and level of each codec, with bitshuffle: the settings of :func:`compressors`."""


def encode_chunk(a: np.ndarray, codec: str) -> bytes:
    """The bytes zarr stores for one chunk (``a`` of the chunk's full shape): blosc, then crc32c.

    Encoded on the calling thread: zarr's own writes run every chunk's compression through one
    event-loop thread, which caps a harvest on a fast GPU at one core's compression speed.
    """
    from numcodecs import blosc

    a = np.ascontiguousarray(a)
    if codec == "none":
        body = a.tobytes()
    else:
        cname, level = BLOSC[codec]
        body = blosc.compress(a, cname, level, blosc.BITSHUFFLE, 0, a.itemsize)
    return bytes(body) + crc32c(body).to_bytes(4, "little")


def crc_ok(raw: bytes, body: np.ndarray | None = None) -> bool:
    """Whether a stored chunk's last 4 bytes are the crc32c of the rest (zarr's crc32c codec)."""
    body = np.frombuffer(raw, dtype=np.uint8)[:-4] if body is None else body
    return len(raw) >= 4 and int.from_bytes(raw[-4:], "little") == crc32c(body)


def decode_chunk(raw: bytes, codec: str, out: np.ndarray) -> np.ndarray:
    """Decode one stored chunk straight into ``out`` (a C-contiguous array of the chunk's full shape).

    The same bytes zarr reads, without zarr's per-read event-loop round trip, which caps a
    multi-threaded reader far below the codec's speed. Raises ValueError on a checksum mismatch.
    """
    from numcodecs import blosc

    body = np.frombuffer(raw, dtype=np.uint8)[:-4]
    if not crc_ok(raw, body):
        raise ValueError("stored and computed crc32c checksums differ")
    # blosc decodes a shorter chunk into a larger buffer without a word, leaving the rest as it was: a chunk
    # of another chunking (a copy gone wrong) must fail here, not serve stale rows. Bytes 4-7 of a blosc
    # header are the decoded size.
    size = len(body) if codec == "none" else int.from_bytes(body[4:8].tobytes(), "little") if len(body) >= 16 else -1
    if size != out.nbytes:
        raise ValueError(f"the chunk decodes to {size} bytes, not the {out.nbytes} of a chunk of this array")
    if codec == "none":
        out.reshape(-1).view(np.uint8)[:] = body
    else:
        blosc.decompress(body, out)
    return out


def fingerprint(identity: dict[str, Any]) -> str:
    """Short hash of everything that determines the activation rows (not how many there are)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


MIN_CHUNKS = 4


def seqs_per_chunk(context_size: int, widest_row_bytes: int, chunk_mb: float, n_seqs: int) -> int:
    """Whole sequences per chunk so the widest array's chunk is about ``chunk_mb`` MiB, but a small cache
    still gets ``MIN_CHUNKS`` chunks (one held out, the rest for a shuffled chunk order)."""
    per_seq = context_size * widest_row_bytes
    return max(1, min(round(chunk_mb * 2**20 / per_seq), n_seqs // MIN_CHUNKS))


def chunk_key(array: str, chunk: int) -> str:
    """Store key of one chunk, as named in errors and by `pipeline cache verify`."""
    return f"acts/{array}/c/{chunk}/0" if array != "tokens" else f"tokens/c/{chunk}"
