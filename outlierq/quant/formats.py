"""The 8-bit number formats a scheme can store: int8 and FP8 (E4M3, the format of W8A8-FP8).

Both are symmetric and scaled the same way, value = code * scale with scale = range / qmax; they
differ in how a scaled value becomes a code: int8 rounds to the nearest integer in [-127, 127]
(uniform steps), FP8 E4M3 to the nearest of its 253 finite values in [-448, 448] (steps that grow
with the magnitude: 3 mantissa bits, so about 6% relative error at most, also near zero).
Everything that quantizes (weights, activations, the fake-quant oracle, SmoothQuant's search)
asks the format, so a format is one value of the scheme."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OutlierqError


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype   # how codes are stored
    qmax: float          # the largest code: scale = range / qmax
    ct_type: str         # compressed-tensors' QuantizationArgs.type
    ct_format: str       # compressed-tensors' checkpoint format

    # one object per format (code compares with `is`): copies and pickles give the registered one
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return get_format, (self.name,)

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled values to the nearest code, in x's float dtype (round half to even, saturating)."""
        if self.dtype == torch.int8:
            return x.round().clamp(-self.qmax, self.qmax)
        return x.clamp(-self.qmax, self.qmax).to(self.dtype).to(x.dtype)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled values to stored codes (`snap`, in the storage dtype)."""
        return self.snap(x).to(self.dtype)


INT8 = Format("int8", torch.int8, 127.0, "int", "int-quantized")
FP8 = Format("fp8", torch.float8_e4m3fn, 448.0, "float", "float-quantized")
FORMATS = {f.name: f for f in (INT8, FP8)}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise OutlierqError(f"unknown number format {name!r}: choose {' or '.join(FORMATS)}")
    return FORMATS[name]


def format_of(dtype: torch.dtype) -> Format:
    """The format whose codes are stored as `dtype`."""
    for f in FORMATS.values():
        if f.dtype == dtype:
            return f
    raise OutlierqError(f"no 8-bit format stores codes as {dtype}")
