"""Damage done to a RELEX row directory (the disk store's ``relex-store`` or an in-memory run's ``relex-rows``): both
hold ``base-…safetensors`` (θ_0) and ``deltas-…bin`` (the rows) of one process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DELTAS, BASE = "deltas-rank00000-of-00001.bin", "base-rank00000-of-00001.safetensors"


def damage_rows(directory: Path, how: str) -> tuple[str, Path]:
    """Damage ``directory`` in one way; returns the refusal's expected words and the path it must name.

    ``deleted``: the whole directory; ``truncated``: the last row half written; ``flipped``: one data byte of the
    last row; ``base``: the last bytes of θ_0."""
    deltas, base = directory / DELTAS, directory / BASE
    if how == "deleted":
        shutil.rmtree(directory)
        return "which does not exist", directory
    if how == "truncated":
        os.truncate(deltas, os.path.getsize(deltas) - 100)
        return "only half written", deltas
    if how == "flipped":
        with open(deltas, "r+b") as handle:
            handle.seek(os.path.getsize(deltas) - 5000)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x40]))
        return "CRC-32", deltas
    if how == "base":
        with open(base, "r+b") as handle:
            handle.seek(-8, os.SEEK_END)
            handle.write(b"\x00" * 8)
        return "SHA-256", base
    raise ValueError(f"unknown damage {how!r}")
