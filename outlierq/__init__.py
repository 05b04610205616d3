"""outlierq: find and tame activation outliers so LLMs survive W8A8 int8 quantization.

    model, tok = outlierq.load_model("smollm2-135m")
    stats = outlierq.calibrate(model, windows, keep_rows=256)           # ActivationStats
    stats = outlierq.mitigate(model, stats, [outlierq.SmoothQuant(None)])  # folded into weights
    outlierq.quantize_(model, outlierq.W8A8(act="token"), stats)       # int8 everywhere but lm_head
    outlierq.export(model, "ckpt/", tok)                                 # compressed-tensors
"""
from .calibrate import ActivationStats, calibrate
from .detect import Criteria, detect
from .errors import OutlierqError
from .evaluate import perplexity
from .export import export, load
from .mitigate.recipe import mitigate, parse_recipe
from .mitigate.smoothquant import SmoothQuant
from .mitigate.split import ChannelSplit
from .models import load_model
from .quantize import LLMInt8, W8A8, Int8Linear, quantize_

__all__ = ["ActivationStats", "ChannelSplit", "Criteria", "Int8Linear", "LLMInt8", "OutlierqError",
           "SmoothQuant", "W8A8", "calibrate", "detect", "export", "load", "load_model", "mitigate",
           "parse_recipe", "perplexity", "quantize_"]
