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
from .quant import LLMInt8, W8A8, Int8Experts, Int8Linear, quantize_

__all__ = ["ActivationStats", "Calibration", "ChannelSplit", "CompressResult", "Criteria",
           "DEFAULT_RECIPE", "Int8Experts", "Int8Linear", "LLMInt8", "OutlierqError", "OutlierqNotice",
           "SmoothQuant", "W8A8", "calibrate", "compress", "detect", "export", "load", "load_model",
           "mitigate", "parse_recipe", "perplexity", "quantize_"]


import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _register_source_kernels() -> None:
    """Make `outlierq.kernels` importable from a source checkout or an editable install.

    The Triton kernels live in the repository's top-level `kernels/`, which has no __init__.py on
    purpose: `python -m outlierq` and `torchrun -m` put the working directory first on sys.path, and
    a regular package there named `kernels` would shadow PyPI's `kernels`, which transformers
    imports. A folder without __init__.py is only a namespace portion, and a regular package later on
    sys.path wins over it. A wheel copies the folder to outlierq/kernels/, found the ordinary way; a
    checkout (and setuptools' editable finder, which needs an __init__.py) gets it registered here.
    """
    here = _Path(__file__).resolve().parent
    src = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (src / "int8_gemm.py").is_file() or __name__ + ".kernels" in _sys.modules:
        return
    spec = _machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [str(src)]
    _sys.modules[spec.name] = _util.module_from_spec(spec)


# (kernels are imported lazily, by ops, so registering them after the imports above is in time)
_register_source_kernels()
