"""Configuration of an exported Hatchling-trainer model (either arch: "transformer" or
"hatchling"). `model_config` is the preset's `model` section as trained."""
from transformers import PretrainedConfig


class HatchlingConfig(PretrainedConfig):
    model_type = "hatchling_lm"

    def __init__(self, model_config=None, vocab_size=8192, max_length_hint=None, **kwargs):
        self.model_config = dict(model_config or {})
        self.vocab_size = vocab_size
        self.max_length_hint = max_length_hint  # the training sequence length (for reference)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
