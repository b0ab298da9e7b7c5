"""A task: the data, a template with input fields, and the target (a verbalizer or a target field)."""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SoftPromptError, check_keys

MASK_FIELD = "mask"  # "{mask}" in a template: the tokenizer's mask token, where a masked LM scores the label words


@dataclass
class TaskSpec:
    """What to learn. Classification: `verbalizer` maps each label to one or more words (multi-token allowed);
    generation: `target_field` names the answer column."""

    name: str = "task"
    data: Any = "rotten_tomatoes"  # built-in name, a file, or {"train": ..., "validation": ..., "test": ...}
    template: str = "Review: {text}\nSentiment:"  # input fields in braces; the answer follows it ({mask}: a
    # masked-LM encoder scores the label words at that token instead)
    verbalizer: dict[str, list[str]] = field(default_factory=dict)  # label -> words; empty for generation
    label_field: str = "label"
    target_field: str | None = None  # for generation tasks
    truncate_field: str | None = None  # cut this field to fit (default: the first field of the template)
    max_length: int = 256  # tokens of template + answer (the prompt comes on top)

    def __post_init__(self) -> None:
        self.verbalizer = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in (self.verbalizer or {}).items()}
        if not self.fields:
            raise SoftPromptError(f"template {self.template!r} has no input field; write e.g. 'Review: {{text}}'")
        if bool(self.verbalizer) == bool(self.target_field):
            raise SoftPromptError(f"task {self.name!r}: give either a verbalizer (classification) or a target_field "
                                  "(generation), not both or neither")
        for label, words in self.verbalizer.items():
            if not words or not all(isinstance(w, str) and w for w in words):
                raise SoftPromptError(f"task {self.name!r}: label {label!r} needs at least one non-empty word")
        if self.truncate_field is not None and self.truncate_field not in self.fields:
            raise SoftPromptError(f"truncate_field {self.truncate_field!r} is not in the template's fields {self.fields}")

    @property
    def kind(self) -> str:
        return "classification" if self.verbalizer else "generation"

    @property
    def fields(self) -> list[str]:
        """The row fields the template reads ({mask} is not one: it is the masked-LM answer slot)."""
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f and f != MASK_FIELD]

    @property
    def masked(self) -> bool:
        """Whether the template has a {mask} slot (scored through a masked-LM head)."""
        return any(f == MASK_FIELD for _, f, _, _ in string.Formatter().parse(self.template))

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec(
        name="rotten_tomatoes", data="rotten_tomatoes", template="Review: {text}\nSentiment:",
        verbalizer={"positive": [" positive"], "negative": [" negative"]}, max_length=96),
    "reuters_r8": TaskSpec(
        name="reuters_r8", data="reuters_r8", template="Article: {text}\nTopic:",
        verbalizer={"earn": [" earnings"], "acq": [" acquisition"], "crude": [" oil"], "trade": [" trade"],
                    "money-fx": [" currency"], "interest": [" interest"], "ship": [" shipping"], "grain": [" grain"]},
        max_length=160),
    "fine_food": TaskSpec(
        name="fine_food", data="fine_food", template="Review: {text}\nIs this product great?",
        verbalizer={"great": [" yes"], "other": [" no"]}, max_length=128),
}


def load_task(task: Any) -> Any:
    """A built-in task name, a YAML/JSON file, a dict, a TaskSpec or an ImageTaskSpec (``softprompt.tasks.images``;
    a dict with ``modality: image``, or a built-in image task)."""
    from .detection import DetectionTaskSpec
    from .images import BUILTIN_IMAGE_TASKS, ImageTaskSpec

    builtins = {**BUILTIN_TASKS, **BUILTIN_IMAGE_TASKS, "shapes_detection": DetectionTaskSpec()}
    if isinstance(task, (TaskSpec, ImageTaskSpec, DetectionTaskSpec)):
        return task
    if isinstance(task, str) and task in builtins:
        return type(builtins[task])(**builtins[task].to_dict())
    if isinstance(task, str):
        path = Path(task)
        if not path.exists():
            raise SoftPromptError(f"unknown task {task!r}: not a built-in task ({', '.join(builtins)}) or a file")
        import yaml

        task = yaml.safe_load(path.read_text()) or {}
    if isinstance(task, dict):
        base = {}
        if "builtin" in task:  # a built-in task with some fields changed
            if task["builtin"] not in builtins:
                raise SoftPromptError(f"unknown built-in task {task['builtin']!r}; known: {', '.join(builtins)}")
            base = builtins[task["builtin"]].to_dict()
            task = {k: v for k, v in task.items() if k != "builtin"}
        spec = {"image": ImageTaskSpec, "detection": DetectionTaskSpec}.get({**base, **task}.get("modality"), TaskSpec)
        check_keys(task, spec, "task")
        return spec(**{**base, **task})
    raise SoftPromptError(f"a task is a name, a file or a mapping, not {type(task).__name__}")


def load_task_splits(task: Any, seed: int = 0) -> dict[str, list[dict]]:
    """The task's data: train / validation / test rows (image tasks: with their few-shot selection and labels)."""
    if getattr(task, "modality", "text") == "image":
        from .images import load_image_splits

        return load_image_splits(task, seed)
    if getattr(task, "modality", "text") == "detection":
        from .detection import load_detection_splits

        return load_detection_splits(task, seed)
    from .datasets import load_splits

    return load_splits(task.data, seed=seed)


def task_encoder(task: Any, backbone: Any, num_virtual_tokens: int = 0) -> Any:
    """The encoder that turns the task's rows into batches for this backbone (tokens, or pixels)."""
    if getattr(task, "modality", "text") == "detection":
        from .detection import DetectionEncoder

        if backbone.kind != "detector":
            raise SoftPromptError(f"detection task {task.name!r} needs a detector (YOLOS); backbone "
                                  f"{backbone.name!r} is a {backbone.kind!r} model")
        return DetectionEncoder(task, backbone.preprocessing)
    if getattr(task, "modality", "text") == "image":
        from .images import ImageEncoder

        if not hasattr(backbone, "preprocessing"):
            raise SoftPromptError(f"image task {task.name!r} needs an image model; backbone {backbone.name!r} is a "
                                  f"{backbone.kind!r} model")
        return ImageEncoder(task, backbone.preprocessing)
    if backbone.tokenizer is None and backbone.kind != "causal_lm":
        raise SoftPromptError(f"text task {task.name!r} needs a language model; backbone {backbone.name!r} is a "
                              f"{backbone.kind!r} model")
    from .encode import EncoderTaskEncoder, TaskEncoder

    if backbone.kind == "encoder":
        return EncoderTaskEncoder(task, backbone, num_virtual_tokens)

    return TaskEncoder(task, backbone.tokenizer, num_virtual_tokens, backbone.max_positions, backbone.pad_token_id)
