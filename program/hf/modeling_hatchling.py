"""Transformers wrapper of a model trained by the Hatchling trainer (arch "transformer" or
"hatchling"), loaded with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The network itself is the trainer's own `model/` package. In an exported folder this file
carries that package's source (a zip, base64, in `_PACKAGE` at the bottom, written by
program/export.py); on first import it is unpacked into the Hugging Face modules cache under
a name of its own, so the export needs nothing from the trainer's repository. Inside the
repository (`_PACKAGE` is None) the repository's `model` package is used.

Generation goes through transformers' `generate()` without a cache: each new token
re-reads the whole sequence (the logits are exactly the trained model's). The trainer's
own sampler (`python main.py` -> Talk to it) decodes in O(1) per token instead.
Padding (attention_mask with zeros) is not supported: pass unpadded batches."""
import base64
import hashlib
import importlib
import io
import os
import sys
import zipfile

import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hatchling import HatchlingConfig

_PACKAGE = None  # filled in by program/export.py


def _model_package():
    """The trainer's `model` package: unpacked from _PACKAGE, or the repository's own."""
    if _PACKAGE is None:
        return importlib.import_module("model")
    blob = base64.b64decode(_PACKAGE)
    digest = hashlib.sha256(blob).hexdigest()[:16]
    name = f"hatchling_lm_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        from transformers.utils import HF_MODULES_CACHE as base
    except ImportError:
        base = os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "modules")
    root = os.path.join(base, "hatchling_lm_packages")
    target = os.path.join(root, name)
    if not os.path.isdir(target):
        tmp = f"{target}.tmp{os.getpid()}"
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            z.extractall(os.path.join(tmp, name))
        try:
            os.replace(os.path.join(tmp, name), target)
        except OSError:
            pass  # another process unpacked it first
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(name)


class HatchlingForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HatchlingConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm.lm_head.weight": "lm.embed.weight"}
    _no_split_modules = []

    def __init__(self, config: HatchlingConfig):
        super().__init__(config)
        pkg = _model_package()
        known = set(pkg.ModelConfig.__dataclass_fields__)
        cfg = pkg.ModelConfig(**{k: v for k, v in config.model_config.items() if k in known})
        self.lm = pkg.build_model(cfg, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors (lm_head is the tied embedding)

    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value):
        self.lm.embed = value

    def get_output_embeddings(self):
        return self.lm.lm_head

    def set_output_embeddings(self, value):
        self.lm.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=None,
                return_dict=None, **kwargs):
        logits = self.lm(input_ids).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}  # no cache: the whole sequence every step

    def _supports_default_dynamic_cache(self=None):
        return False
