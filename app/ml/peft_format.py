"""PEFT's prompt-tuning adapter format, as a zip: `adapter_config.json` and `adapter_model.safetensors`
holding `prompt_embeddings` [k, d]. PEFT prepends those vectors to the input embeddings exactly as we do,
so an adapter moves between the two with its numbers unchanged. Never pickle: `.bin` adapters are refused.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load

from app.errors import InvalidRequest
from app.ml.backbone import Backbone
from app.ml.soft_prompt import PROMPT_KEY, prompt_to_bytes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# What PEFT would not read but a person (or a later import) may want: template, labels, where it came from.
ABOUT_FILE = "softprompt.json"
# An adapter is a few hundred KB; anything that inflates far past that is not one.
MAX_UNZIPPED_BYTES = 64 * 1024 * 1024


def export_zip(
    *, prompt: torch.Tensor, base_model: str, backbone_config: Any | None, about: dict[str, Any]
) -> bytes:
    """The zip whose unpacked folder PEFT's `PeftModel.from_pretrained` reads. ``backbone_config`` (the
    Hugging Face config) gives the layers and heads PEFT records; without it PEFT fills them in itself."""
    k, d = prompt.shape
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": k,
        "token_dim": d,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(backbone_config, "num_attention_heads", None),
        "num_layers": getattr(backbone_config, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "inference_mode": True,
        "revision": None,
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CONFIG_FILE, json.dumps(config, indent=2))
        archive.writestr(WEIGHTS_FILE, prompt_to_bytes(prompt))
        archive.writestr(ABOUT_FILE, json.dumps(about, indent=2, ensure_ascii=False))
    return buffer.getvalue()


@dataclass(frozen=True)
class ImportedAdapter:
    prompt: torch.Tensor  # [k, d] float32
    config: dict[str, Any]
    about: dict[str, Any]  # our own export's softprompt.json (template, labels), or empty


def import_zip(data: bytes, *, backbone: Backbone) -> ImportedAdapter:
    """The prompt in a PEFT prompt-tuning adapter zip, checked against ``backbone``; InvalidRequest naming
    what is wrong otherwise."""
    files = _read_zip(data)
    if CONFIG_FILE not in files:
        raise _invalid(f"the zip has no {CONFIG_FILE}; found {sorted(files) or 'nothing'}")
    try:
        config = json.loads(files[CONFIG_FILE])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _invalid(f"{CONFIG_FILE} is not JSON: {error}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise _invalid(f"only PEFT prompt-tuning adapters can be imported; peft_type is {found!r}")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise _invalid(f"task_type must be CAUSAL_LM; got {config.get('task_type')!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise _invalid("num_transformer_submodules must be 1 (a decoder-only model)")
    if WEIGHTS_FILE not in files:
        hint = " (pickled .bin weights are never loaded; save with safe_serialization=True)"
        raise _invalid(f"the zip has no {WEIGHTS_FILE}" + (hint if "adapter_model.bin" in files else ""))
    try:
        tensors = st_load(files[WEIGHTS_FILE])
    except Exception as error:  # safetensors raises its own types on garbage
        raise _invalid(f"{WEIGHTS_FILE} is not a readable safetensors file: {error}") from None
    if PROMPT_KEY not in tensors:
        raise _invalid(f"{WEIGHTS_FILE} has no {PROMPT_KEY!r} tensor; found {sorted(tensors)}")
    prompt = tensors[PROMPT_KEY].to(torch.float32)  # [k, d]; PEFT may have saved half precision
    d = backbone.embedding_dim
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] != d:
        raise _invalid(f"{PROMPT_KEY} has shape {tuple(prompt.shape)}; this backbone needs [k, {d}]")
    declared = config.get("num_virtual_tokens")
    if declared is not None and declared != prompt.shape[0]:
        raise _invalid(f"num_virtual_tokens is {declared} but {PROMPT_KEY} holds {prompt.shape[0]}")
    if not torch.isfinite(prompt).all():
        raise _invalid(f"{PROMPT_KEY} contains NaN or infinite values")
    try:
        about = json.loads(files.get(ABOUT_FILE, b"{}"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        about = {}  # PEFT does not read it either; the caller's form fields decide
    return ImportedAdapter(
        prompt=prompt.contiguous(), config=config, about=about if isinstance(about, dict) else {}
    )


def _read_zip(data: bytes) -> dict[str, bytes]:
    """Top-level files by name; files in one folder (a zipped adapter directory) count as top-level."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise _invalid("the file is not a zip archive") from None
    with archive:
        entries = [e for e in archive.infolist() if not e.is_dir()]
        if sum(e.file_size for e in entries) > MAX_UNZIPPED_BYTES:
            raise _invalid(
                f"the zip unpacks to more than {MAX_UNZIPPED_BYTES} bytes; an adapter is far smaller"
            )
        files = {}
        for entry in entries:
            name = entry.filename.rsplit("/", 1)[-1]
            if name in (CONFIG_FILE, WEIGHTS_FILE, ABOUT_FILE, "adapter_model.bin"):
                try:
                    files[name] = archive.read(entry)
                # Encrypted entries raise RuntimeError, unknown compression NotImplementedError.
                except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as error:
                    raise _invalid(f"{entry.filename} cannot be read: {error}") from None
        return files


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"Not a usable PEFT adapter: {message}.", param="file", code="invalid_adapter")
