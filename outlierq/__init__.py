"""outlierq: find and tame activation outliers so LLMs survive W8A8 int8 quantization.

    model, tok = outlierq.load_model("smollm2-135m")
    result = outlierq.compress(model, tok)            # calibrate, default recipe, per-token W8A8
    outlierq.export(result.model, "ckpt/", tok, recipe=result.recipe, stats=result.stats)

The steps one by one: calibrate -> mitigate -> quantize_ -> export (see README).
"""
from .calibration import ActivationStats, calibrate
from .checkpoint import export, load
from .detection import Criteria, detect
from .errors import OutlierqError, OutlierqNotice
from .evaluate import perplexity
from .mitigate.recipe import mitigate, parse_recipe
from .mitigate.smoothquant import SmoothQuant
from .mitigate.split import ChannelSplit
from .models import load_model
from .pipeline import DEFAULT_RECIPE, Calibration, CompressResult, compress
from .quantize import LLMInt8, W8A8, Int8Experts, Int8Linear, quantize_

__all__ = ["ActivationStats", "Calibration", "ChannelSplit", "CompressResult", "Criteria",
           "DEFAULT_RECIPE", "Int8Experts", "Int8Linear", "LLMInt8", "OutlierqError", "OutlierqNotice",
           "SmoothQuant", "W8A8", "calibrate", "compress", "detect", "export", "load", "load_model",
           "mitigate", "parse_recipe", "perplexity", "quantize_"]
