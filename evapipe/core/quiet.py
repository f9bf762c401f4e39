"""Quiet dependencies: a command prints only evapipe's own lines, using each dependency's own switch.

What the dependencies print on their own, and the switch that turns it off (each must be set before the import
that reads it, hence environment variables and logger levels, set once when a command starts):

* transformers' "Loading weights" progress bar and load report (missing / unexpected keys of a new head):
  HF_HUB_DISABLE_PROGRESS_BARS (transformers reads huggingface_hub's setting when imported) and
  TRANSFORMERS_VERBOSITY=error.
* datasets' "Generating train split" progress bar and its info lines: HF_DATASETS_DISABLE_PROGRESS_BARS and
  DATASETS_VERBOSITY=error.
* bitsandbytes, imported by every `import peft` where it is installed: on a CPU with AVX512-bf16 it tries to fetch
  an optional gemm_4bit kernel from the Hub through `kernels` at import, and both log a warning when that fails
  offline ("Skipping publisher trust check ...", "Failed to load CPU gemm_4bit_forward ..."); bitsandbytes then
  uses its own kernel. Their loggers are set to ERROR.
* matplotlib (`evapipe show --plot`): "Matplotlib is building the font cache" on a first run, from its
  font_manager logger, also set to ERROR.

Only defaults are set: a variable the user has set, or a logger level they chose, is kept.
"""

from __future__ import annotations

import logging
import os

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
}
# loggers whose warnings are about the dependency's own housekeeping (see the module docstring)
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub", "matplotlib.font_manager")


def quiet_dependencies() -> None:
    """Switch off the dependencies' own progress bars and warnings (see the module docstring); call it before they
    are imported. The CLI calls it for every command; library users who want the same call it themselves."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
