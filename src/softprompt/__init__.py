"""softprompt: train a small soft prompt in front of a frozen pretrained model, save it, compare it, serve it."""

__version__ = "0.1.0"

from .backbones import Backbone, CausalLMBackbone, ModuleBackbone, load_backbone  # noqa: E402
from .errors import SoftPromptError  # noqa: E402
from .files import PromptFile, export_peft, import_peft, load_prompt, save_prompt  # noqa: E402
from .generation import GenerationOutput, generate, prompt_kv  # noqa: E402
from .methods import METHODS, PromptTuning, PromptTuningConfig  # noqa: E402
from .model import PromptedModel  # noqa: E402
from .tasks.spec import TaskSpec, load_task  # noqa: E402
from .train.config import RunConfig, load_config  # noqa: E402
from .train.loop import fit  # noqa: E402

__all__ = [
    "Backbone", "CausalLMBackbone", "GenerationOutput", "METHODS", "ModuleBackbone", "PromptFile", "PromptTuning",
    "PromptTuningConfig", "PromptedModel", "RunConfig", "SoftPromptError", "TaskSpec", "__version__", "export_peft",
    "fit", "generate", "import_peft", "load_backbone", "load_config", "load_prompt", "load_task", "prompt_kv",
    "save_prompt",
]
