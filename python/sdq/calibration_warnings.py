"""CalibrationWarning, and the notes that turn one layer's calibration fallbacks into one warning.

Calibration data can be dead (an input never non-zero) or too little to pin a covariance down
(MoE experts that see few tokens, small calibration sets). The quantizers then damp harder or
fall back to uncalibrated codes for the blocks concerned instead of failing; they say so, once
per layer, naming the layer and summarising the blocks, so a user can tell which layers were
quantized without the benefit of their data.
"""
from __future__ import annotations

import warnings


class CalibrationWarning(UserWarning):
    """A layer's calibration data could not be used as given: extra damping or a fallback."""


def _block_ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for b in sorted(set(blocks)):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


class CalibrationNotes:
    """What one layer's calibration needed; `warn()` emits it as a single CalibrationWarning.

    Each note is a phrase ("H damped with percdamp=1"); notes about blocks are grouped by
    phrase, so a layer where 30 blocks fell back for the same reason gives one line.
    """

    def __init__(self, layer: str | None = None):
        self.layer = layer
        self._layer_notes: list[str] = []
        self._block_notes: dict[str, list[int]] = {}  # phrase -> blocks, in order of arrival

    def add(self, what: str, block: int | None = None) -> None:
        if block is None:
            if what not in self._layer_notes:
                self._layer_notes.append(what)
        else:
            self._block_notes.setdefault(what, []).append(block)

    def for_block(self, block: int):
        """A one-argument recorder `note(what)` for code that only knows its own block."""
        return lambda what: self.add(what, block)

    def __bool__(self) -> bool:
        return bool(self._layer_notes or self._block_notes)

    def message(self) -> str:
        parts = list(self._layer_notes)
        for what, blocks in self._block_notes.items():
            label = "block" if len(set(blocks)) == 1 else "blocks"
            parts.append(f"{what} ({label} {_block_ranges(blocks)})")
        who = self.layer if self.layer else "this layer"
        return f"calibration of {who}: " + "; ".join(parts)

    def warn(self, stacklevel: int = 2) -> None:
        """One CalibrationWarning with every note, if there is any; `stacklevel` as in warnings.warn
        counted from the caller of warn()."""
        if self:
            warnings.warn(self.message(), CalibrationWarning, stacklevel=stacklevel + 1)
