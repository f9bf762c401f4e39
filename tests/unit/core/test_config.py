"""Config validation happens before any model loads, and every error names the key."""

from __future__ import annotations

import pytest

from evapipe.core.config import config_from_dict, load_config, reference_markdown
from evapipe.core.errors import ConfigError


def test_defaults_and_default_yaml_are_valid():
    cfg = config_from_dict({})
    assert cfg.eva.r == 8 and cfg.eva.rho == 2.0 and cfg.eva.tau == 0.99
    default = load_config("configs/default.yaml")
    assert default.model.name_or_path == "builtin:minilm" and default.data.path == "builtin:support_intents"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"eva": {"rhoo": 2}}, "unknown config key `eva.rhoo` (did you mean `eva.rho`?)"),
        ({"modle": {}}, "unknown config key `modle` (did you mean `model`?)"),
        ({"data": {"batchsize": 4}}, "did you mean `data.batch_size`?"),
        ({"eva": {"r": "eight"}}, "`eva.r` must be int"),
        ({"eva": {"r": 0}}, "`eva.r` must be >= 1"),
        ({"eva": {"rho": 0.5}}, "`eva.rho` must be >= 1"),
        ({"eva": {"tau": 0}}, "`eva.tau` must be in (0, 1]"),
        ({"eva": {"tau": 1.5}}, "`eva.tau` must be in (0, 1]"),
        ({"eva": {"whiten": "yes"}}, "`eva.whiten` must be bool"),
        ({"model": {"dtype": "float8"}}, "`model.dtype`: 'float8' is not allowed"),
        ({"model": {"quantization": "3bit"}}, "`model.quantization`"),
        ({"data": {"batch_size": 0}}, "`data.batch_size` must be >= 1"),
        ({"data": {"prompt_field": "q"}}, "prompt_field and completion_field go together"),
        ({"eva": {"target_modules": []}}, "`eva.target_modules` is an empty list"),
        ({"eva": {"rank_pattern": {"q": -1}}}, "`eva.rank_pattern` ranks must be >= 0"),
        ({"eva": {"alpha_pattern": {"q": -1}}}, "`eva.alpha_pattern` alphas must be > 0"),
        ({"output": {"path": None}}, "set output.path or output.store"),
        ({"eva": "r=8"}, "`eva` must be a mapping"),
        ({"eva": {"target_modules": "layers.[0"}}, "`eva.target_modules` 'layers.[0' is not a valid regex"),
        ({"eva": {"exclude_modules": "(q"}}, "`eva.exclude_modules` '(q' is not a valid regex"),
        ({"eva": {"rank_pattern": {"q(": 4}}}, "`eva.rank_pattern` 'q(' is not a valid regex"),
        ({"eva": {"alpha_pattern": {"*q": 4}}}, "`eva.alpha_pattern` '*q' is not a valid regex"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)


def test_overrides_parse_yaml_values():
    cfg = config_from_dict({}, ["eva.r=16", "eva.target_modules=[q_proj, v_proj]", "eva.whiten=true", "eva.rho=1"])
    assert cfg.eva.r == 16 and cfg.eva.target_modules == ["q_proj", "v_proj"] and cfg.eva.whiten is True
    assert cfg.eva.rho == 1.0 and isinstance(cfg.eva.rho, float)
    with pytest.raises(ConfigError, match="did you mean `eva.tau`"):
        config_from_dict({}, ["eva.taux=0.9"])
    with pytest.raises(ConfigError, match="key.path=value"):
        config_from_dict({}, ["eva.r"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eva: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_reference_lists_every_key():
    ref = reference_markdown()
    for key in ("`eva.rho`", "`eva.tau`", "`data.prompt_field`", "`model.quantization`", "`output.path`", "`task`"):
        assert key in ref
