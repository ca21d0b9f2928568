"""Export a finished model as a Hugging Face folder:

    config.json               HatchlingConfig (the preset's model section) + auto_map
    configuration_hatchling.py, modeling_hatchling.py   the code auto_map names; the
                              modeling file carries the trainer's model/ package inside
    model.safetensors         the weights (the tied output embedding is stored once, as
                              the input embedding; transformers re-ties it on load)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    generation_config.json    the preset's generate section

so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it,
its logits equal the trainer's, and `.generate()` works. Auxiliary heads (training-only)
and lifelong memory contents are not exported."""
from __future__ import annotations

import base64
import io
import json
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

HF_DIR = Path(__file__).resolve().parent / "hf"
MODEL_DIR = Path(__file__).resolve().parents[1] / "model"
TIED = "lm_head.weight"  # == embed.weight in both archs


def package_source(folder: Path = MODEL_DIR) -> str:
    """The model/ package (Python files and kernel sources) as a base64 zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so", ".o"):
                z.write(path, path.relative_to(folder).as_posix())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def export_state(model: torch.nn.Module) -> dict:
    """Weights to save: contiguous CPU copies, aux heads dropped, the tied head stored once."""
    out = {}
    for k, v in model.state_dict().items():
        if k == TIED or k.startswith("aux_heads."):
            continue
        out[f"lm.{k}"] = v.detach().to("cpu").contiguous().clone()
    return out


def export(fin, out: Path) -> Path:
    """Write the Hugging Face folder for a loaded finished model (program.first_question.Finished)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from .hf.configuration_hatchling import HatchlingConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, g = fin.tokenizer, fin.preset.generate
    eot = tok.eot_id
    eot_text = tok.tok.id_to_token(eot)
    model_config = dict(fin.checkpoint.get("model_config") or asdict(fin.preset.model))
    config = HatchlingConfig(model_config=model_config, vocab_size=tok.vocab_size,
                             max_length_hint=fin.preset.train.seq_length, bos_token_id=eot, eos_token_id=eot,
                             pad_token_id=eot, tie_word_embeddings=True)
    config.architectures = ["HatchlingForCausalLM"]
    config.auto_map = {"AutoConfig": "configuration_hatchling.HatchlingConfig",
                       "AutoModelForCausalLM": "modeling_hatchling.HatchlingForCausalLM"}
    config.save_pretrained(out)

    save_file(export_state(fin.model), str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copymode(out / "config.json", out / "model.safetensors")  # safetensors writes 0600; the folder is shared as a whole

    shutil.copyfile(HF_DIR / "configuration_hatchling.py", out / "configuration_hatchling.py")
    code = (HF_DIR / "modeling_hatchling.py").read_text(encoding="utf-8")
    marker = "_PACKAGE = None  # filled in by program/export.py"
    assert marker in code
    code = code.replace(marker, "_PACKAGE = None  # the trainer's model/ package, set at the end of this file")
    code += f"\n\n# the trainer's model/ package (zip, base64), unpacked on first import\n_PACKAGE = {package_source()!r}\n"
    (out / "modeling_hatchling.py").write_text(code, encoding="utf-8")

    (out / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    special = {"bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text, "pad_token": eot_text}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False, **special}, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")

    sampling = dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=0) if g.temperature > 0 else \
        dict(do_sample=False)  # temperature 0: greedy
    GenerationConfig(**sampling, max_new_tokens=g.max_tokens, no_repeat_ngram_size=g.no_repeat_ngram,
                     bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, use_cache=False).save_pretrained(out)
    (out / "README.md").write_text(
        f"# {fin.preset.name}\n\nExported by the Hatchling trainer from `{fin.path.name}` "
        f"({fin.checkpoint.get('tokens', 0):,} training tokens, arch `{model_config.get('arch')}`).\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "ids = tok(\"Once upon a time\", return_tensors=\"pt\").input_ids\n"
        "print(tok.decode(model.generate(ids)[0]))\n```\n", encoding="utf-8")
    return out
