"""softprompt: train a small soft prompt in front of a frozen pretrained model, save it, compare it, serve it."""

from ._version import __version__
from .backbones import (
    Backbone,
    CausalLMBackbone,
    EncoderBackbone,
    ImageBackbone,
    ModuleBackbone,
    ViTBackbone,
    load_backbone,
)
from .errors import SoftPromptError
from .fastpath import FastPathConfig
from .files import PromptFile, export_peft, import_peft, load_prompt, save_prompt
from .generation import GenerationOutput, generate
from .joins import get_join
from .methods import (
    METHODS,
    VPT,
    DeepPrompt,
    Headed,
    Method,
    MethodConfig,
    PixelPromptConfig,
    PixelPrompting,
    PrefixTuning,
    PrefixTuningConfig,
    PromptTuning,
    PromptTuningConfig,
    PTuning,
    PTuningConfig,
    ResidualConfig,
    ResidualPromptTuning,
    VPTConfig,
    from_file,
    get_method,
    load_method,
)
from .model import MixedPromptedModel, PromptedModel
from .prompts import EmbeddingPrompt, Head, KVPrompt, PatchPrompt, PixelPrompt
from .runtime import Runtime, runtime
from .tasks.images import ImageTaskSpec
from .tasks.spec import TaskSpec, load_task
from .train.config import RunConfig, load_config
from .train.loop import fit

__all__ = [
    "METHODS", "Backbone", "CausalLMBackbone", "DeepPrompt", "EmbeddingPrompt", "FastPathConfig", "GenerationOutput",
    "KVPrompt", "Method", "MethodConfig", "MixedPromptedModel", "ModuleBackbone", "PTuning", "PTuningConfig",
    "PrefixTuning", "PrefixTuningConfig", "PromptFile", "PromptTuning", "PromptTuningConfig", "PromptedModel",
    "ResidualConfig", "ResidualPromptTuning", "RunConfig", "Runtime", "SoftPromptError", "TaskSpec", "__version__",
    "export_peft", "fit", "from_file", "generate", "get_join", "get_method", "import_peft", "load_backbone",
    "load_config", "load_method", "load_prompt", "load_task", "runtime", "save_prompt",
    "Head", "ImageBackbone", "ImageTaskSpec", "PatchPrompt", "PixelPrompt", "PixelPromptConfig", "PixelPrompting", "VPT",
    "VPTConfig", "ViTBackbone", "EncoderBackbone", "Headed",
]
