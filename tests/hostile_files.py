"""Hostile input files for tests: PNG decompression bombs and damaged TFRecord shards.

A bomb is a valid grayscale PNG whose pixels are all zero: deflate squeezes
them about a thousandfold, so 40,000 x 40,000 pixels (1.6 GB decoded, 4.8 GB
as RGB) fit in 1.6 MB. It is written without ever holding the pixels: zero
rows are compressed once as a block that ends with a full flush (which
resets the compressor, so the block's bytes repeat exactly), the block is
repeated, and the zlib checksum of n zero bytes has a closed form (Adler-32:
a = 1, b = n mod 65521).
"""

import struct
import zlib

_ROWS_PER_BLOCK = 100


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black grayscale PNG of width x height pixels, a few MB at most."""
    assert height % _ROWS_PER_BLOCK == 0, "height must be a multiple of 100"
    block = bytes((width + 1) * _ROWS_PER_BLOCK)  # Each row: filter byte 0, then pixels.
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    final_block = compressor.flush(zlib.Z_FINISH)[:-4]  # Without the checksum of 2 blocks.
    total = len(block) * (height // _ROWS_PER_BLOCK)
    adler = ((total % 65521) << 16) | 1
    stream = (first + repeated * (height // _ROWS_PER_BLOCK - 1) + final_block
              + struct.pack(">I", adler))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream)
            + _chunk(b"IEND", b""))


def flip_byte(path: str, offset_fraction: float = 0.5) -> int:
    """Inverts one byte inside a file (same size, a failing checksum); returns its offset."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        offset = int(len(data) * offset_fraction)
        data[offset] ^= 0xFF
        f.seek(0)
        f.write(data)
    return offset
