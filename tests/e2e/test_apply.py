"""`evapipe apply` / apply_eva_state: states onto LoRA models (full precision, bitsandbytes 4/8-bit), PEFT parity,
reload and training, and clear errors that write nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import MINILM_TARGETS, job_state, text_batches
from evapipe import load_state
from evapipe.adapters.apply import apply_eva_state, check_output, lora_config_for, state_from_peft, to_peft_state_dict
from evapipe.cli import main
from evapipe.core.config import ModelConfig
from evapipe.core.errors import ConfigError, StateError
from evapipe.model.loading import load_model, model_fingerprint
from evapipe.states.state import EvaState

CPU = torch.device("cpu")
RANK0 = "encoder.layer.5.output.dense"


@pytest.fixture(scope="module")
def minilm_state(tmp_path_factory):
    """MiniLM state with one layer forced to rank 0 and uneven ranks from redistribution (rho = 2)."""
    path = job_state(tmp_path_factory.mktemp("minilm"), "eva.rank_pattern={'layer\\.5\\.output\\.dense': 0}")
    state = load_state(path)
    assert state.ranks[RANK0] == 0 and len(set(state.ranks.values())) > 2
    return path


@pytest.fixture(scope="module")
def llama_state(tmp_path_factory, tiny_llama_dir):
    return job_state(tmp_path_factory.mktemp("llama"), f"model.name_or_path={tiny_llama_dir}",
                     "eva.target_modules=all-linear")


def load(name_or_path: str, quantization: str | None = None):
    return load_model(ModelConfig(name_or_path=name_or_path, quantization=quantization), CPU)[0]


def inputs_for(model, tokenizer_dir: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["My card was charged twice for one order.", "How do I reset my password?"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    if type(model).__name__.endswith("ForCausalLM"):
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def output_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def loss_of(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.pow(2).mean()


def lora_layers(peft_model, adapter: str = "default") -> dict:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def assert_matches_state(peft_model, state: EvaState, adapter: str = "default") -> None:
    """A = the state's components, B = 0, rank-0 layers plain, scaling = alpha / rank as the metadata says."""
    layers = lora_layers(peft_model, adapter)
    assert set(layers) == {n for n, k in state.ranks.items() if k > 0}
    alphas = state.meta["alpha_pattern"]
    for name, layer in layers.items():
        rank = state.ranks[name]
        assert layer.r[adapter] == rank
        assert torch.equal(layer.lora_A[adapter].weight.detach().float(), state.tensors[name])
        assert not layer.lora_B[adapter].weight.any()
        assert layer.scaling[adapter] == pytest.approx(alphas.get(name, state.meta["lora_alpha"]) / rank)


def train_steps(peft_model, batch, steps: int = 3) -> list[float]:
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = loss_of(peft_model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("which", ["minilm", "llama"])
@pytest.mark.parametrize("quantization", [None, "4bit", "8bit"])
def test_cli_apply_reload_and_train(which, quantization, minilm_state, llama_state, minilm_path, tiny_llama_dir, tmp_path):
    """The CLI writes a standard adapter; reloaded with PEFT on a (quantized) base it equals the base and trains."""
    from peft import PeftModel

    state_path, model_dir = (minilm_state, minilm_path) if which == "minilm" else (llama_state, tiny_llama_dir)
    out = tmp_path / "adapter"
    flags = {"4bit": ["--load-in-4bit"], "8bit": ["--load-in-8bit"], None: []}[quantization]
    result = CliRunner().invoke(main, ["apply", "--state", str(state_path), "--model", model_dir, "--output", str(out),
                                       "--device", "cpu", *flags])
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter_model.safetensors", "evapipe.json"} <= {p.name for p in out.iterdir()}
    state = load_state(state_path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == ("FEATURE_EXTRACTION" if which == "minilm" else "CAUSAL_LM")
    assert json.loads((out / "evapipe.json").read_text())["ranks"] == state.ranks

    # Three separate loads: on CPU, bitsandbytes 0.50 repacks 4-bit weights at the first eval forward, and a packed
    # layer then breaks later state_dict() reads and training forwards (see test_cpu_packed_4bit_model_is_refused).
    reference = load(model_dir, quantization)
    batch = inputs_for(reference, model_dir)
    before = output_of(reference, batch)
    model = PeftModel.from_pretrained(load(model_dir, quantization), str(out))
    assert_matches_state(model, state)
    assert torch.equal(output_of(model.eval(), batch), before)  # B = 0: exactly the base model
    model = PeftModel.from_pretrained(load(model_dir, quantization), str(out), is_trainable=True)
    losses = train_steps(model, batch)
    assert losses[-1] < losses[0], losses
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_auto_peft_model_loads_the_directory(llama_state, minilm_state, tmp_path):
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction

    runner = CliRunner()
    for state_path, auto in ((llama_state, AutoPeftModelForCausalLM), (minilm_state, AutoPeftModelForFeatureExtraction)):
        out = tmp_path / auto.__name__
        result = runner.invoke(main, ["apply", "--state", str(state_path), "--output", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output  # --model defaults to the model the state was computed on
        assert_matches_state(auto.from_pretrained(str(out)), load_state(state_path))


def test_python_api_on_plain_and_kbit_prepared_models(minilm_state, minilm_path, llama_state, tiny_llama_dir):
    from peft import PeftModel, prepare_model_for_kbit_training

    state = load_state(minilm_state)
    base = load(minilm_path)
    batch = inputs_for(base, minilm_path)
    before = output_of(base, batch)
    model = apply_eva_state(base, minilm_state)  # a path works as well as an EvaState
    assert isinstance(model, PeftModel)
    assert_matches_state(model, state)
    assert type(model.get_base_model().encoder.layer[5].output.dense) is torch.nn.Linear  # rank 0: no adapter
    model.eval()
    assert torch.equal(output_of(model, batch), before)

    base = prepare_model_for_kbit_training(load(tiny_llama_dir, "4bit"))
    batch = inputs_for(base, tiny_llama_dir)
    model = apply_eva_state(base, load_state(llama_state))
    assert_matches_state(model, load_state(llama_state))
    losses = train_steps(model, batch)
    assert losses[-1] < losses[0]
    with pytest.raises(TypeError, match="not a PeftModel"):
        apply_eva_state(model, llama_state)


def test_backbone_state_applies_to_a_task_model_around_it(minilm_state, minilm_path):
    """A state computed on the bare MiniLM (BertModel) fits a BertForSequenceClassification of the same weights
    (layers under `bert.`, a new 6-label head): same fingerprint check, A = state, the head trains, outputs = base."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    state = load_state(minilm_state)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=6)
    batch = inputs_for(base, minilm_path)
    before = output_of(base.eval(), batch)
    model = apply_eva_state(base, state, lora_config=LoraConfig(modules_to_save=["classifier"]))
    assert_matches_state(model, state.under("bert."))
    assert any("classifier.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    assert torch.equal(output_of(model, batch), before)
    batch["labels"] = torch.tensor([1, 4])
    losses = train_steps(model, batch)
    assert losses[-1] < losses[0]
    other = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=6, num_hidden_layers=5)
    with pytest.raises(StateError, match="not in the model"):  # a layer the state names is missing: never renamed
        apply_eva_state(other, state)


def test_quantized_classifier_head_is_refused_clearly(minilm_state, minilm_path, tmp_path):
    """A user's own 8-bit load of a classifier checkpoint that quantizes its head (here by skipping nothing;
    transformers' default does it for heads such as RoBERTa's classifier.out_proj): PEFT would fail deep inside.
    The error says how to load it instead, and that load works."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).save_pretrained(tmp_path)

    def load_8bit(skip: list[str]):
        return AutoModelForSequenceClassification.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip),
            device_map={"": "cpu"})

    with pytest.raises(ConfigError, match="llm_int8_skip_modules"):
        apply_eva_state(load_8bit([]), minilm_state)
    model = apply_eva_state(load_8bit(["classifier"]), minilm_state)
    assert any("classifier.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_fingerprint_equal_across_quantized_loads(tiny_llama_dir):
    """(For MiniLM, the CLI test applies full-precision states to 4-bit and 8-bit loads without --force.)"""
    assert len({model_fingerprint(load(tiny_llama_dir, q)) for q in (None, "4bit", "8bit")}) == 1


def test_same_result_as_peft_initialize_lora_eva_weights(minilm_state, minilm_path):
    """Our state through apply_eva_state == PEFT's initialize_lora_eva_weights fed to_peft_state_dict(state)."""
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import initialize_lora_eva_weights

    state = load_state(minilm_state)
    ours = apply_eva_state(load(minilm_path), state)
    cfg = LoraConfig(r=state.meta["r"], lora_alpha=state.meta["lora_alpha"], target_modules=MINILM_TARGETS,
                     init_lora_weights="eva", eva_config=EvaConfig(rho=state.meta["rho"]))
    theirs = get_peft_model(load(minilm_path), cfg)
    initialize_lora_eva_weights(theirs, eva_state_dict=to_peft_state_dict(state))
    assert_same_adapters(ours, theirs)
    patterns = theirs.peft_config["default"]
    assert patterns.rank_pattern == {n: k for n, k in state.ranks.items() if k not in (0, state.meta["r"])}
    assert patterns.alpha_pattern == pytest.approx(
        {n: a for n, a in state.meta["alpha_pattern"].items() if state.ranks[n] > 0})


def assert_same_adapters(a, b) -> None:
    la, lb = lora_layers(a), lora_layers(b)
    assert set(la) == set(lb)
    for name in la:
        x, y = la[name], lb[name]
        assert x.r["default"] == y.r["default"] and x.scaling["default"] == pytest.approx(y.scaling["default"])
        assert torch.equal(x.lora_A["default"].weight, y.lora_A["default"].weight)
        assert not x.lora_B["default"].weight.any()


def test_peft_get_eva_state_dict_is_accepted(tiny_llama_dir, support_texts):
    """A dict from PEFT's get_eva_state_dict (prefixed or not) applies as PEFT itself would apply it."""
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import get_eva_state_dict, initialize_lora_eva_weights
    from transformers import AutoTokenizer

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig())
    base = load(tiny_llama_dir)
    batches = text_batches(AutoTokenizer.from_pretrained(tiny_llama_dir), support_texts, 8, 4)
    torch.manual_seed(0)
    sd = {k.removeprefix("base_model.model."): v for k, v in get_eva_state_dict(copy.deepcopy(base), batches, cfg,
                                                                               show_progress_bar=False).items()}
    prefixed = {"base_model.model." + k: v for k, v in sd.items()}
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    initialize_lora_eva_weights(theirs, eva_state_dict=dict(prefixed))
    for keys in (sd, prefixed):
        ours = apply_eva_state(copy.deepcopy(base), keys, lora_config=cfg)
        assert_same_adapters(ours, theirs)
    # and the other way: evapipe's own state hands to PEFT without renaming keys
    assert set(to_peft_state_dict(sd)) == set(to_peft_state_dict(prefixed)) == set(prefixed)


def test_pattern_keys_are_escaped_and_exact(minilm_path):
    """`layer.1.` never matches `layer.11.`; a name that ends in another target's full name keeps its own rank."""
    from peft.utils.other import get_pattern_key
    from torch import nn

    linear = lambda: nn.ModuleDict({"fc": nn.Linear(4, 4)})  # noqa: E731
    model = nn.ModuleDict({"h": nn.ModuleList([linear() for _ in range(12)]),
                           "x": nn.ModuleDict({"h": nn.ModuleList([linear(), linear(), linear()])})})
    # x.h.1.fc ends in h.1.fc (and stays at the default rank); x.h.2.fc is no target but ends in h.2.fc
    ranks = {f"h.{i}.fc": 2 for i in range(12)} | {"h.1.fc": 3, "x.h.1.fc": 2}
    state = EvaState({n: torch.randn(k, 4) for n, k in ranks.items()},
                     {"r": 2, "lora_alpha": 2, "ranks": ranks, "alpha_pattern": {"h.1.fc": 3.0},
                      "in_features": {n: 4 for n in ranks}})
    cfg = lora_config_for(state, model)
    for name, rank in ranks.items():
        key = get_pattern_key(cfg.rank_pattern.keys(), name)
        assert cfg.rank_pattern.get(key, cfg.r) == rank, name
    peft_model = apply_eva_state(model, state)
    assert {n: m.r["default"] for n, m in lora_layers(peft_model).items()} == ranks


def _edited(path, tensors=None, **meta) -> EvaState:
    state = load_state(path)
    state.meta = copy.deepcopy(state.meta) | meta
    state.tensors = dict(state.tensors) | (tensors or {})
    return state


def test_mismatches_fail_clearly(minilm_state, minilm_path, tiny_llama_dir):
    state = load_state(minilm_state)
    with pytest.raises(StateError, match=r"encoder\.layer\.0\.attention\.self\.query \(not in the model\)"):
        apply_eva_state(load(tiny_llama_dir), state)  # another model
    missing = "encoder.layer.9.attention.self.query"
    bad = _edited(minilm_state, ranks=state.ranks | {missing: 1}, in_features=state.meta["in_features"] | {missing: 384},
                  tensors={missing: torch.zeros(1, 384)})
    with pytest.raises(StateError, match=r"1 of 37 layers mismatch: encoder\.layer\.9\.attention\.self\.query"):
        apply_eva_state(load(minilm_path), bad)
    name = "encoder.layer.2.intermediate.dense"
    bad = _edited(minilm_state, tensors={name: torch.zeros(state.ranks[name], 100)},
                  in_features=state.meta["in_features"] | {name: 100})
    for force in (False, True):  # --force never skips a shape check
        with pytest.raises(StateError, match=rf"{name} \(in_features 384 in the model, 100 in the state\)"):
            apply_eva_state(load(minilm_path), bad, force=force)
    other = _edited(minilm_state, model=state.meta["model"] | {"fingerprint": "0123456789abcdef"})
    with pytest.raises(StateError, match="fingerprint mismatch.*0123456789abcdef.*--force"):
        apply_eva_state(load(minilm_path), other)
    assert_matches_state(apply_eva_state(load(minilm_path), other, force=True), other)


def test_cli_errors_write_nothing(minilm_state, tiny_llama_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "adapter"
    args = ["apply", "--state", str(minilm_state), "--output", str(out), "--device", "cpu"]
    result = runner.invoke(main, args + ["--model", tiny_llama_dir])
    assert result.exit_code == 2 and "does not fit this LlamaForCausalLM" in result.output  # --model: its own class
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    result = runner.invoke(main, args + ["--load-in-4bit", "--load-in-8bit"])
    assert result.exit_code == 2 and "exclude each other" in result.output
    result = runner.invoke(main, ["apply", "--state", str(tmp_path / "nope.safetensors"), "--output", str(out)])
    assert result.exit_code == 2 and "state file not found" in result.output and not out.exists()

    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["adapter_config.json"]
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0
    assert (out / "adapter_model.safetensors").is_file()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an adapter directory"):
        check_output(notes, overwrite=True)
    result = runner.invoke(main, ["apply", "--state", str(minilm_state), "--output", str(notes), "--overwrite"])
    assert result.exit_code == 2 and (notes / "todo.txt").read_text() == "keep me"


def test_all_rank_zero_state_is_refused(minilm_state, minilm_path):
    state = load_state(minilm_state)
    empty = EvaState({}, state.meta | {"ranks": {n: 0 for n in state.ranks}})
    with pytest.raises(StateError, match="rank 0"):
        apply_eva_state(load(minilm_path), empty)


def test_state_from_peft_alphas_follow_peft(minilm_state):
    """A PEFT dict gets the alpha PEFT's loader gives it: alpha * new_rank / r with adjust_scaling_factors."""
    from peft import EvaConfig, LoraConfig

    state = load_state(minilm_state)
    sd = to_peft_state_dict(state)
    cfg = LoraConfig(r=state.meta["r"], lora_alpha=state.meta["lora_alpha"], eva_config=EvaConfig())
    again = state_from_peft(sd, cfg)
    assert again.ranks == state.ranks
    assert {n: a for n, a in again.alpha_pattern.items() if state.ranks[n] > 0} == \
        {n: a for n, a in state.alpha_pattern.items() if state.ranks[n] > 0}
    assert all(torch.equal(again.tensors[n], t) for n, t in state.tensors.items())


def test_cpu_packed_4bit_model_is_refused(tiny_llama_dir, llama_state):
    """bitsandbytes repacks 4-bit weights at an eval forward on AVX512-bf16 CPUs and corrupts them at the next
    state_dict(); apply refuses such a model instead of producing an adapter trained on garbage."""
    base = load(tiny_llama_dir, "4bit")
    output_of(base, inputs_for(base, tiny_llama_dir))
    layer = base.model.layers[0].self_attn.q_proj
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU / bitsandbytes does not repack 4-bit weights for inference")
    with pytest.raises(StateError, match="repacked by bitsandbytes for CPU inference"):
        apply_eva_state(base, llama_state)
