"""outlierq: find and tame activation outliers so LLMs survive W8A8 int8 quantization.

    model, tok = outlierq.load_model("smollm2-135m")
    stats = outlierq.calibrate(model, windows)            # ActivationStats
    outlierq.mitigate(model, stats, [SmoothQuant(0.5)])   # folded into the weights
    outlierq.quantize_(model, W8A8(act="token"), stats)   # Int8Linear everywhere but lm_head
    outlierq.perplexity(model, ids)
"""
from .calibrate import ActivationStats, calibrate
from .errors import OutlierqError
from .evaluate import perplexity
from .models import load_model

__all__ = ["ActivationStats", "OutlierqError", "calibrate", "load_model", "perplexity"]
