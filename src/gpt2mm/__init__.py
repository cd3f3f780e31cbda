"""gpt2mm: a small multimodal GPT-2 (frozen CLIP ViT + GPT-2 with additive image-token fusion).

    import gpt2mm
    config = gpt2mm.MultimodalGPT2Config.from_preset("tiny")
    model = gpt2mm.MultimodalGPT2ForConditionalGeneration(config)

Importing the package registers the model with `transformers.AutoConfig` / `AutoModel` /
`AutoModelForImageTextToText` / `AutoProcessor`.
"""

from gpt2mm.config import MultimodalGPT2Config
from gpt2mm.loading import build_model, from_backbones, load_model
from gpt2mm.modeling import MultimodalGPT2ForConditionalGeneration
from gpt2mm.presets import PRESETS
from gpt2mm.processing import MultimodalGPT2Processor

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "MultimodalGPT2Config",
    "MultimodalGPT2ForConditionalGeneration",
    "MultimodalGPT2Processor",
    "build_model",
    "from_backbones",
    "load_model",
]
