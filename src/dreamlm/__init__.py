"""dreamlm: Dream-style masked-diffusion language models."""

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel

__version__ = "0.1.0"
__all__ = ["DreamConfig", "DreamError", "DreamModel", "__version__"]
