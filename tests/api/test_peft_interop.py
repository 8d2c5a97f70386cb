"""PEFT interoperability: a version we export loads in `peft` with the same numbers, and an adapter `peft`
made serves here."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from app.ml import inference
from app.ml.layout import build_batch, context_ids, target_ids
from app.ml.soft_prompt import prompt_to_bytes
from app.ml.text import render
from tests.helpers import TEMPLATE, stored_prompt, tune_here

SENTENCE = "a gorgeous, witty, seductive movie."


def unzip(data: bytes, into) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(into)


def zipped(folder) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"adapter/{path.name}")  # as a zipped folder usually comes
    return buffer.getvalue()


def our_logits(backbone, prompt: torch.Tensor, text: str) -> torch.Tensor:
    """Our forward pass: the prompt's vectors before the input's embeddings. [n, V] for the input's tokens."""
    ids = context_ids(backbone, text)
    batch = build_batch(backbone, [prompt], [ids], left_pad=False)
    with torch.inference_mode():
        hidden = backbone.model.get_decoder()(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        return backbone.logits(hidden[0, len(prompt) :])


def test_an_exported_version_loads_in_peft_with_identical_logits(
    client, settings, tiny_backbone, tiny_backbone_dir, tmp_path
):
    tune_here(client, settings, tiny_backbone, task="sst2", method="prompt")
    response = client.get("/v1/prompts/sst2/versions/1/peft")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert 'filename="sst2-v1-peft.zip"' in response.headers["content-disposition"]
    unzip(response.content, tmp_path / "adapter")
    about = json.loads((tmp_path / "adapter/softprompt.json").read_text())
    assert about["template"] == TEMPLATE and about["labels"] == ["negative", "positive"]

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_backbone_dir), tmp_path / "adapter"
    )
    model.eval()
    theirs = model.get_prompt_embedding_to_save("default")  # [k, d]
    ours = stored_prompt(client.app.state.settings)
    assert torch.equal(theirs.float(), ours)

    text = render(TEMPLATE, SENTENCE)
    ids = torch.tensor([context_ids(tiny_backbone, text)])
    with torch.inference_mode():
        peft_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(ours) :]
    assert torch.allclose(peft_logits.float(), our_logits(tiny_backbone, ours, text), atol=1e-5)


@pytest.mark.servers
def test_an_adapter_made_by_peft_is_imported_and_served(client, tiny_backbone, tiny_backbone_dir, tmp_path):
    torch.manual_seed(0)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_backbone_dir), config)
    with (
        torch.no_grad()
    ):  # PEFT starts from random vectors; make them the backbone's scale, as training would
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "made", safe_serialization=True)
    prompt = model.get_prompt_embedding_to_save("default").float()

    imported = client.post(
        "/v1/prompts/from-peft/versions",
        files={"file": ("adapter.zip", zipped(tmp_path / "made"))},
        data={"template": "Q: {input}\nA:"},
    )
    assert imported.status_code == 201, imported.text
    assert imported.json()["version"] == 1 and imported.json()["num_virtual_tokens"] == 5

    served = client.post("/v1/generate", json={"task": "from-peft", "input": "hello", "max_new_tokens": 6})
    assert served.status_code == 200, served.text
    expected = inference.generate_reference(
        tiny_backbone, prompt=prompt, text=render("Q: {input}\nA:", "hello"), max_new_tokens=6
    )
    assert served.json()["outputs"][0]["tokens"] == len(expected)
    assert served.json()["outputs"][0]["text"] == tiny_backbone.tokenizer.decode(expected)


def test_an_adapter_longer_than_a_job_may_train_is_refused(client, settings):
    too_long = settings.max_virtual_tokens + 1
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"peft_type": "PROMPT_TUNING"}))
        archive.writestr("adapter_model.safetensors", prompt_to_bytes(torch.zeros(too_long, 64)))
    refused = client.post(
        "/v1/prompts/x/versions", files={"file": ("a.zip", buffer.getvalue())}, data={"template": "{input}"}
    )
    assert refused.status_code == 422 and f"{too_long} virtual tokens" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("files", "fault"),
    [
        ({"adapter_config.json": "{}"}, "peft_type is None"),
        ({"adapter_config.json": json.dumps({"peft_type": "LORA"})}, "peft_type is 'LORA'"),
        (
            {"adapter_config.json": json.dumps({"peft_type": "PROMPT_TUNING"}), "adapter_model.bin": "x"},
            "pickled",
        ),
        (
            {
                "adapter_config.json": json.dumps({"peft_type": "PROMPT_TUNING"}),
                "adapter_model.safetensors": "x",
            },
            "not a readable safetensors",
        ),
        ({"readme.txt": "hi"}, "no adapter_config.json"),
        ({"adapter_config.json": "[" * 100_000 + "]" * 100_000}, "nested deeper than 32 levels"),
        (
            {
                "adapter_config.json": '{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": '
                + "9" * 5000
                + "}"
            },  # noqa: E501
            "Exceeds the limit (4300 digits)",
        ),
    ],
)
def test_a_broken_adapter_is_refused_with_the_reason(client, files, fault):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    refused = client.post(
        "/v1/prompts/x/versions", files={"file": ("a.zip", buffer.getvalue())}, data={"template": "{input}"}
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_adapter"
    assert fault in refused.json()["error"]["message"]
    assert client.get("/v1/prompts/x").status_code == 404  # nothing stored
    not_zip = client.post("/v1/prompts/x/versions", files={"file": ("a.zip", b"PK not really")})
    assert not_zip.status_code == 422 and "not a zip" in not_zip.json()["error"]["message"]


def test_an_exported_prefix_loads_in_peft_with_the_same_label_log_probabilities(
    client, settings, tiny_backbone, tiny_backbone_dir, tmp_path
):
    tune_here(client, settings, tiny_backbone, task="deep", method="prefix")
    response = client.get("/v1/prompts/deep/versions/1/peft")
    assert response.status_code == 200, response.text
    unzip(response.content, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    backbone = AutoModelForCausalLM.from_pretrained(tiny_backbone_dir)
    model = PeftModel.from_pretrained(backbone, tmp_path / "adapter")
    model.eval()

    labels = ["negative", "positive"]
    text = render(TEMPLATE, SENTENCE)
    ours = inference.label_log_likelihoods(
        tiny_backbone, prompts=[stored_prompt(settings)], texts=[text], labels=labels
    )[0]
    context = context_ids(tiny_backbone, text)
    for label, our_score in zip(labels, ours.tolist(), strict=True):
        label_ids = target_ids(tiny_backbone, text, label, with_eos=False)
        ids = torch.tensor([context + label_ids])
        with torch.inference_mode():
            log_probs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
        theirs = sum(log_probs[len(context) - 1 + j, t].item() for j, t in enumerate(label_ids))
        assert theirs == pytest.approx(our_score, abs=1e-4), label


def test_a_prefix_adapter_made_by_peft_is_imported_and_served(
    client, tiny_backbone, tiny_backbone_dir, tmp_path
):
    torch.manual_seed(0)
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_backbone_dir), config)
    with torch.no_grad():  # PEFT starts from N(0, 1); make it the scale of real keys and values
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "made", safe_serialization=True)
    model.eval()

    imported = client.post(
        "/v1/prompts/peft-prefix/versions",
        files={"file": ("adapter.zip", zipped(tmp_path / "made"))},
        data={"template": "Q: {input}\nA:"},
    )
    assert imported.status_code == 201, imported.text
    assert imported.json()["method"] == "prefix" and imported.json()["num_virtual_tokens"] == 3

    served = client.post("/v1/generate", json={"task": "peft-prefix", "input": "hello", "max_new_tokens": 6})
    assert served.status_code == 200, served.text
    ids = context_ids(tiny_backbone, render("Q: {input}\nA:", "hello"))
    produced: list[int] = []
    with torch.inference_mode():  # PEFT's own greedy decoding, recomputed from scratch at every step
        for _ in range(6):
            step = torch.tensor([ids + produced])
            token = int(model(input_ids=step, attention_mask=torch.ones_like(step)).logits[0, -1].argmax())
            if token == tiny_backbone.eos_token_id:
                break
            produced.append(token)
    assert served.json()["outputs"][0]["text"] == tiny_backbone.tokenizer.decode(produced)


def test_the_labels_field_of_an_import_is_read_with_the_same_limits_as_every_json(client):
    adapter = io.BytesIO()
    with zipfile.ZipFile(adapter, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"peft_type": "PROMPT_TUNING"}))
        archive.writestr("adapter_model.safetensors", prompt_to_bytes(torch.zeros(4, 64)))
    for labels, fault in (("[" * 100_000, "nested deeper than 32 levels"), ("[" + "1" * 5000 + "]", "4300")):
        refused = client.post(
            "/v1/prompts/x/versions",
            files={"file": ("a.zip", adapter.getvalue())},
            data={"template": "{input}", "labels": labels},
        )
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_json" and error["param"] == "labels" and fault in error["message"]
    assert client.get("/v1/prompts/x").status_code == 404  # nothing stored
    # The connection is still good for the next request.
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("method", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_an_adapter_of_extreme_finite_values_is_refused_naming_its_tensor(client, tiny_backbone, method):
    """3e38 passes a NaN check, then overflows the backbone beside every other tenant's rows."""
    kv = tiny_backbone.kv
    prefix_width = 2 * kv.layers * kv.heads * kv.head_dim
    width = tiny_backbone.embedding_dim if method == "PROMPT_TUNING" else prefix_width
    adapter = io.BytesIO()
    with zipfile.ZipFile(adapter, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"peft_type": method, "num_virtual_tokens": 4}))
        archive.writestr("adapter_model.safetensors", prompt_to_bytes(torch.full((4, width), 3e38)))
    refused = client.post(
        "/v1/prompts/x/versions", files={"file": ("a.zip", adapter.getvalue())}, data={"template": "{input}"}
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_adapter"
    assert "prompt_embeddings reaches 3e+38" in refused.json()["error"]["message"]
    assert client.get("/v1/prompts/x").status_code == 404  # nothing stored
