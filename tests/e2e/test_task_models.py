"""Task models from the CLI: `evapipe apply --model <classifier>` / `--kind seq-cls --num-labels N` write an adapter
for the task model (PEFT task type, head trained in full), and `evapipe check` refuses a model on which an adapter's
keys would not load (PEFT itself only warns and trains its random init)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from conftest import job_state
from evapipe import load_state
from evapipe.adapters.apply import apply_to_directory, task_heads
from evapipe.adapters.check import check_adapter, check_adapter_dir
from evapipe.cli import main
from evapipe.core.errors import ConfigError, StateError

LABELS = 6


@pytest.fixture(scope="module")
def state_path(tmp_path_factory):
    """A state computed on the bare MiniLM (BertModel)."""
    return job_state(tmp_path_factory.mktemp("backbone"), "eva.max_batches=3")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, minilm_path):
    """MiniLM saved as a 6-label BertForSequenceClassification (its head as a user's earlier training left it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=LABELS).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return str(path)


def cli(*args: str):
    return CliRunner().invoke(main, [*args])


def classifier(path: str, **kw):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(123)  # a head init unlike apply's, so a head that equals the adapter's was loaded from it
    return AutoModelForSequenceClassification.from_pretrained(path, **kw)


def batch_for(minilm_path: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tok(["My card was charged twice.", "How do I reset my password?"], padding=True,
                     return_tensors="pt"))
    return batch


def load_adapter(model, adapter) -> tuple[object, list[str]]:
    """PeftModel.from_pretrained(model, adapter, is_trainable=True) and the warnings it gave."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return peft_model, [str(w.message) for w in caught]


def assert_trains_from_eva_init(peft_model, state, adapter, batch) -> None:
    """lora_A = the state under `bert.`, B = 0, outputs = base, the head trains in full, and a step moves it."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    base_model = peft_model.get_base_model()
    layers = {n: m for n, m in base_model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == {"bert." + n for n, k in state.ranks.items() if k > 0}
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight, state.tensors[name.removeprefix("bert.")])
        assert not layer.lora_B["default"].weight.any()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    head = base_model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight, saved["base_model.model.classifier.weight"])  # the adapter's head, loaded
    assert head.weight.requires_grad
    with torch.no_grad():
        with peft_model.disable_adapter():
            plain = peft_model(**batch).logits
    peft_model.train()
    before = head.weight.detach().clone()
    labels = torch.tensor([1, 4]) % head.weight.shape[0]
    loss = peft_model(**batch, labels=labels).loss
    loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5).step()
    assert torch.isfinite(loss) and not torch.equal(head.weight, before)
    assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in layers.values())
    assert plain.shape == (2, head.weight.shape[0])


def test_apply_onto_a_saved_classifier(state_path, classifier_dir, minilm_path, tmp_path):
    """`--model <saved classifier>`: loaded as its own class (not the state's BertModel), a SEQ_CLS adapter that
    PEFT loads onto that classifier without a missing key, starting equal to the classifier and training its head."""
    out = tmp_path / "adapter"
    result = cli("apply", "--state", str(state_path), "--model", classifier_dir, "--output", str(out),
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "for a BertForSequenceClassification (PEFT task SEQ_CLS)" in result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    built = json.loads((out / "evapipe.json").read_text())["adapter_for"]
    assert built["class"] == "BertForSequenceClassification" and built["kind"] == "seq-cls"

    state, batch = load_state(state_path), batch_for(minilm_path)
    base = classifier(classifier_dir).eval()
    with torch.no_grad():
        before = base(**batch).logits
    peft_model, messages = load_adapter(base, out)
    assert not [m for m in messages if "missing" in m.lower()], messages
    with torch.no_grad():
        assert torch.equal(peft_model.eval()(**batch).logits, before)  # B = 0 and the saved head: the classifier
    assert_trains_from_eva_init(peft_model, state, out, batch)
    assert cli("check", "--adapter", str(out), "--model", classifier_dir).exit_code == 0


def test_apply_kind_seq_cls_on_a_bare_checkpoint(state_path, minilm_path, tmp_path):
    """`--kind seq-cls --num-labels 3` on the bare MiniLM: a new 3-label head (seeded), saved in the adapter, which
    loads onto AutoModelForSequenceClassification(num_labels=3) whatever that model's own head init."""
    outs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        result = cli("apply", "--state", str(state_path), "--kind", "seq-cls", "--num-labels", "3", "--seed", seed,
                     "--output", str(out), "--device", "cpu")
        assert result.exit_code == 0, result.output
        outs.append(out)
    from safetensors.torch import load_file

    heads = [load_file(str(o / "adapter_model.safetensors"))["base_model.model.classifier.weight"] for o in outs]
    assert heads[0].shape == (3, 384) and torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    peft_model, messages = load_adapter(classifier(minilm_path, num_labels=3), outs[0])
    assert not [m for m in messages if "missing" in m.lower()], messages
    assert_trains_from_eva_init(peft_model, load_state(state_path), outs[0], batch_for(minilm_path))
    result = cli("check", "--adapter", str(outs[0]))  # the model, kind and labels evapipe.json records
    assert result.exit_code == 0 and "loads onto a BertForSequenceClassification" in result.output, result.output
    assert "trained in full: classifier" in result.output


def test_check_refuses_a_backbone_adapter_on_a_classifier(state_path, classifier_dir, tmp_path):
    """The trap: PEFT loads a BertModel adapter onto a classifier with only a warning and random lora_A; check
    refuses it and names the apply that fits."""
    out = tmp_path / "backbone-adapter"
    assert cli("apply", "--state", str(state_path), "--output", str(out), "--device", "cpu").exit_code == 0
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"

    peft_model, messages = load_adapter(classifier(classifier_dir), out)
    assert any("missing adapter keys" in m for m in messages), messages  # PEFT: a warning, nothing more
    query = peft_model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert not torch.equal(query.lora_A["default"].weight, load_state(state_path).tensors[
        "encoder.layer.0.attention.self.query"])

    result = cli("check", "--adapter", str(out), "--model", classifier_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "holds the adapter's layers under `bert.`" in result.output
    assert f"evapipe apply --state {state_path} --model {classifier_dir} --output" in result.output
    result = cli("check", "--adapter", str(out), "--kind", "seq-cls", "--num-labels", "2")
    assert result.exit_code == 2 and "--model builtin:minilm --kind seq-cls --num-labels 2" in result.output
    assert cli("check", "--adapter", str(out)).exit_code == 0  # on the BertModel it was written for


def test_check_refuses_classifier_adapters_on_the_wrong_model(state_path, classifier_dir, minilm_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    out = tmp_path / "cls-adapter"
    assert cli("apply", "--state", str(state_path), "--kind", "seq-cls", "--num-labels", "3", "--output", str(out),
               "--device", "cpu").exit_code == 0
    result = cli("check", "--adapter", str(out), "--model", "builtin:minilm")  # a bare BertModel
    assert result.exit_code == 2 and "holds its layers under `bert.`" in result.output
    result = cli("check", "--adapter", str(out), "--model", classifier_dir)  # 6 labels, the adapter's head has 3
    assert result.exit_code == 2 and "a head of 3 labels, load the model with --num-labels 3" in result.output

    # keys that load but no task: PEFT would leave the classifier frozen
    plain = tmp_path / "no-task"
    get_peft_model(classifier(classifier_dir), LoraConfig(target_modules=["query", "value"])).save_pretrained(plain)
    with pytest.raises(StateError, match="head would stay frozen"):
        check_adapter(plain, classifier(classifier_dir))
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        check_adapter_dir(tmp_path)


def test_apply_refuses_a_classifier_state_on_its_backbone(classifier_dir, tmp_path):
    """A state computed on the classifier (layers under `bert.`) meets the bare BertModel: say which class to load."""
    path = job_state(tmp_path, f"model.name_or_path={classifier_dir}", "eva.max_batches=1")
    assert load_state(path).meta["model"]["kind"] == "seq-cls"
    with pytest.raises(StateError, match=r"holds these layers under `bert.`.*--kind seq-cls"):
        apply_to_directory(path, tmp_path / "out", "builtin:minilm", device="cpu")
    assert not (tmp_path / "out").exists()


def test_num_labels_errors(state_path, classifier_dir, tmp_path):
    out = str(tmp_path / "out")
    result = cli("apply", "--state", str(state_path), "--num-labels", "3", "--output", out, "--device", "cpu")
    assert result.exit_code == 2 and "kind encoder has none" in result.output
    result = cli("apply", "--state", str(state_path), "--model", classifier_dir, "--num-labels", "3", "--output", out)
    assert result.exit_code == 2 and "with 6 labels, not 3" in result.output
    assert not (tmp_path / "out").exists()


def test_no_future_warning_from_apply(state_path, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_to_directory(state_path, tmp_path / "out", device="cpu")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_image_classifier_head_is_trained_in_full():
    """PEFT has no task type for image classifiers: their new head goes into modules_to_save explicitly."""
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    small = dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=16)
    assert task_heads(ViTForImageClassification(ViTConfig(**small, image_size=8, patch_size=4, num_labels=3))) == [
        "classifier"]
    assert task_heads(BertForSequenceClassification(BertConfig(**small))) == []  # PEFT's SEQ_CLS task does it
