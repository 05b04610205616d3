"""Kept so that `from outlierq.quantize import ...` keeps working: quantization lives in
outlierq/quant/ (one module per part)."""
from .quant import *  # noqa: F401,F403
from .quant import __all__  # noqa: F401
