"""gpt2mm: a small multimodal GPT-2 (frozen CLIP ViT + GPT-2 with additive image-token fusion).

    import gpt2mm
    config = gpt2mm.MultimodalGPT2Config.from_preset("tiny")
    model = gpt2mm.MultimodalGPT2ForConditionalGeneration(config)

Importing the package registers the model with `transformers.AutoConfig` / `AutoModel` /
`AutoModelForImageTextToText` / `AutoProcessor`. The registration lives here, not in config.py, modeling.py
or processing.py, because those modules are also shipped inside every saved checkpoint as its remote code
(`gpt2mm.hub`), where transformers registers the classes itself.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from gpt2mm.config import MultimodalGPT2Config
from gpt2mm.hub import save_model
from gpt2mm.loading import build_model, from_backbones, load_model
from gpt2mm.modeling import MultimodalGPT2ForConditionalGeneration, MultimodalGPT2Model
from gpt2mm.presets import PRESETS
from gpt2mm.processing import MultimodalGPT2Processor

AutoConfig.register("gpt2mm", MultimodalGPT2Config, exist_ok=True)
AutoModel.register(MultimodalGPT2Config, MultimodalGPT2Model, exist_ok=True)
AutoModelForImageTextToText.register(
    MultimodalGPT2Config, MultimodalGPT2ForConditionalGeneration, exist_ok=True
)
AutoProcessor.register(MultimodalGPT2Config, MultimodalGPT2Processor, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "MultimodalGPT2Config",
    "MultimodalGPT2ForConditionalGeneration",
    "MultimodalGPT2Model",
    "MultimodalGPT2Processor",
    "build_model",
    "from_backbones",
    "load_model",
    "save_model",
]
