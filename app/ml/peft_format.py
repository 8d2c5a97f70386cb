"""PEFT's prompt-learning adapter format, as a zip: `adapter_config.json` and `adapter_model.safetensors`
holding `prompt_embeddings`. Never pickle: `.bin` adapters are refused.

- PROMPT_TUNING: `prompt_embeddings` is [k, d]. PEFT prepends those vectors to the input embeddings
  exactly as we do.
- PREFIX_TUNING (without `prefix_projection`): `prompt_embeddings` is [k, L * 2 * H_kv * Dh], each virtual
  token's keys and values for every layer, layer by layer, keys before values. PEFT hands them to the
  backbone as its past keys and values, as we do.

Either way an adapter moves between the two with its numbers unchanged."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load

from app.contract.kinds import Method
from app.errors import InvalidRequest
from app.input_text import JsonFault, parse_json
from app.ml.backbone import Backbone
from app.ml.soft_prompt import PROMPT_KEY, is_prefix, prompt_to_bytes, stored_shape, virtual_tokens

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# What PEFT would not read but a person (or a later import) may want: template, labels, where it came from.
ABOUT_FILE = "softprompt.json"
PEFT_TYPES = {"PROMPT_TUNING": Method.PROMPT, "PREFIX_TUNING": Method.PREFIX}
# How members are inflated: a chunk at a time, so that a member that claims 100 bytes and inflates to a
# gigabyte is stopped at the cap, not after. Only the methods PEFT's and every zip tool's output uses are
# read: bzip2 and LZMA decompressors hand back a whole block however small the read, and bzip2 packs 1 GiB
# of zeros into about 1 KB.
READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
INFLATE_CHUNK_BYTES = 1024 * 1024
WANTED_FILES = (CONFIG_FILE, WEIGHTS_FILE, ABOUT_FILE, "adapter_model.bin")


def export_zip(
    *, prompt: torch.Tensor, base_model: str, backbone_config: Any | None, about: dict[str, Any]
) -> bytes:
    """The zip whose unpacked folder PEFT's `PeftModel.from_pretrained` reads, for a soft prompt of either
    kind. ``backbone_config`` (the Hugging Face config) gives the layers and heads PEFT records for a prompt;
    without it PEFT fills them in itself."""
    if is_prefix(prompt):
        config, weights = _prefix_adapter(prompt, base_model)
    else:
        config, weights = _prompt_adapter(prompt, base_model, backbone_config), prompt
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CONFIG_FILE, json.dumps(config, indent=2))
        archive.writestr(WEIGHTS_FILE, prompt_to_bytes(weights))
        archive.writestr(ABOUT_FILE, json.dumps(about, indent=2, ensure_ascii=False))
    return buffer.getvalue()


def _prompt_adapter(prompt: torch.Tensor, base_model: str, backbone_config: Any | None) -> dict[str, Any]:
    k, d = prompt.shape
    return {
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


def _prefix_adapter(prefix: torch.Tensor, base_model: str) -> tuple[dict[str, Any], torch.Tensor]:
    """PEFT's config and [k, L * 2 * H_kv * Dh] table for a prefix [2, L, H_kv, k, Dh]."""
    _, layers, heads, k, head_dim = prefix.shape
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": k,
        # PEFT's names for a grouped-query backbone: the key/value heads, and their width together.
        "token_dim": heads * head_dim,
        "num_attention_heads": heads,
        "num_layers": layers,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": heads * head_dim,
        "prefix_projection": False,
        "inference_mode": True,
        "revision": None,
    }
    table = prefix.permute(3, 1, 0, 2, 4).reshape(k, layers * 2 * heads * head_dim)  # [k, L*2*H*Dh]
    return config, table


def _prefix_from_table(table: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """The prefix [2, L, H_kv, k, Dh] in PEFT's [k, L * 2 * H_kv * Dh] table, checked against ``backbone``."""
    _, layers, heads, _, head_dim = stored_shape(backbone, Method.PREFIX)
    width = layers * 2 * heads * head_dim
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] != width:
        raise _invalid(
            f"{PROMPT_KEY} has shape {tuple(table.shape)}; a prefix for this backbone is [k, {width}] "
            f"({layers} layers x keys and values x {heads} heads x {head_dim})"
        )
    k = table.shape[0]
    return table.view(k, layers, 2, heads, head_dim).permute(2, 1, 3, 0, 4).contiguous()


@dataclass(frozen=True)
class ImportedAdapter:
    prompt: torch.Tensor  # [k, d] or, for a prefix, [2, L, H_kv, k, Dh]; float32
    method: Method
    config: dict[str, Any]
    about: dict[str, Any]  # our own export's softprompt.json (template, labels), or empty


def import_zip(data: bytes, *, backbone: Backbone, max_unzipped_bytes: int) -> ImportedAdapter:
    """The soft prompt in a PEFT prompt-tuning or prefix-tuning adapter zip, checked against ``backbone``;
    InvalidRequest naming what is wrong otherwise. The members read inflate to at most
    ``max_unzipped_bytes`` together."""
    files = _read_zip(data, max_unzipped_bytes)
    if CONFIG_FILE not in files:
        raise _invalid(f"the zip has no {CONFIG_FILE}; found {sorted(files) or 'nothing'}")
    try:
        config = parse_json(files[CONFIG_FILE])
    except JsonFault as fault:
        raise _invalid(f"{CONFIG_FILE} is not valid JSON: {fault}") from None
    found = config.get("peft_type") if isinstance(config, dict) else None
    if found not in PEFT_TYPES:
        raise _invalid(
            f"only PEFT prompt-tuning and prefix-tuning adapters can be imported; peft_type is {found!r}"
        )
    method = PEFT_TYPES[found]
    if method == Method.PREFIX and config.get("prefix_projection"):
        raise _invalid("prefix_projection adapters hold an encoder, not the prefix; save one without it")
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
    table = tensors[PROMPT_KEY].to(torch.float32)  # PEFT may have saved half precision
    if method == Method.PREFIX:
        prompt = _prefix_from_table(table, backbone)
    else:
        prompt, d = table, backbone.embedding_dim  # [k, d]
        if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] != d:
            raise _invalid(f"{PROMPT_KEY} has shape {tuple(prompt.shape)}; this backbone needs [k, {d}]")
    declared = config.get("num_virtual_tokens")
    if declared is not None and declared != virtual_tokens(prompt):
        raise _invalid(f"num_virtual_tokens is {declared} but {PROMPT_KEY} holds {virtual_tokens(prompt)}")
    try:
        about = parse_json(files.get(ABOUT_FILE, b"{}"))
    except JsonFault:
        about = {}  # PEFT does not read it either; the caller's form fields decide
    about = about if isinstance(about, dict) else {}
    return ImportedAdapter(prompt=prompt.contiguous(), method=method, config=config, about=about)


def _read_zip(data: bytes, max_unzipped_bytes: int) -> dict[str, bytes]:
    """The files an adapter needs, by name; files in one folder (a zipped adapter directory) count as
    top-level. Nothing else in the archive is inflated."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise _invalid("the file is not a zip archive") from None
    with archive:
        entries = [e for e in archive.infolist() if not e.is_dir()]
        if sum(e.file_size for e in entries) > max_unzipped_bytes:  # what the headers claim
            raise _too_large(max_unzipped_bytes)
        files, inflated = {}, 0
        for entry in entries:
            name = entry.filename.rsplit("/", 1)[-1]
            if name not in WANTED_FILES:
                continue
            if entry.compress_type not in READABLE_METHODS:
                raise _invalid(
                    f"{entry.filename} is compressed with method {entry.compress_type}; only "
                    f"{' and '.join(READABLE_METHODS.values())} members are read"
                )
            chunks = []
            try:
                with archive.open(entry) as member:
                    while chunk := member.read(INFLATE_CHUNK_BYTES):
                        inflated += len(chunk)
                        if inflated > max_unzipped_bytes:  # what is really inflated
                            raise _too_large(max_unzipped_bytes)
                        chunks.append(chunk)
            # Encrypted entries raise RuntimeError; a member longer or shorter than its header says fails
            # its CRC check (BadZipFile).
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as error:
                raise _invalid(f"{entry.filename} cannot be read: {error}") from None
            files[name] = b"".join(chunks)
        return files


def _too_large(cap: int) -> InvalidRequest:
    return _invalid(f"the zip inflates to more than {cap} bytes; an adapter is far smaller")


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"Not a usable PEFT adapter: {message}.", param="file", code="invalid_adapter")
