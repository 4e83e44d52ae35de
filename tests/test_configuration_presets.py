"""Named config presets (configuration/presets.py): each builds a model, the released ones match their config.json,
and the training script's smoke run and the Makefile's quickstart train exactly their preset."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import reference_config

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.configuration import MoeMtpConfig, preset, preset_kwargs, preset_names
from moe_mtp.configuration.presets import PRESETS, preset_doc, train_flags
from moe_mtp.conversion import moe_mtp_config_dict

REPO = Path(__file__).resolve().parents[1]
SMALL = ("tiny", "tiny-release", "smoke")  # built for real and run; the others on the meta device


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_a_model(name):
    assert len(preset_doc(name)) > 40, "every preset says what it is"
    config = preset(name)
    assert isinstance(config, MoeMtpConfig)
    with torch.device("meta"):
        model = MoeMtpForCausalLM(config)
    assert len(model.model.layers) == config.num_hidden_layers
    if name in SMALL:
        model = MoeMtpForCausalLM(preset(name))
        ids = torch.randint(3, config.vocab_size, (2, 12))
        out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss) and out.logits.shape == (2, 12, config.vocab_size)


def _architecture(config: MoeMtpConfig) -> dict:
    out = config.to_dict()
    for key in ("transformers_version", "dtype", "architectures", "use_cache"):
        out.pop(key, None)
    return out


@pytest.mark.parametrize(
    "name, file", [("deepseek-v3", "deepseek_v3_config.json"), ("deepseek-v2-lite", "deepseek_v2_lite_config.json")]
)
def test_released_presets_match_the_released_config_json(name, file):
    released = reference_config(file)
    # V2's `seq_aux`/`aux_loss_alpha` stay plain attributes of a loaded release; `seq_aux_loss_alpha` is what they mean
    ignored = ("model_type", "architectures", "seq_aux", "aux_loss_alpha")
    translated = {k: v for k, v in moe_mtp_config_dict(released).items() if k not in ignored}
    assert _architecture(preset(name)) == _architecture(MoeMtpConfig(**translated))
    # and field by field against the file itself, where moe_mtp uses the released name
    config = preset(name)
    for key, value in released.items():
        if key in MoeMtpConfig.__annotations__:
            assert getattr(config, key) == value, key
    assert config.rope_parameters["factor"] == released["rope_scaling"]["factor"]
    assert config.rope_parameters["mscale_all_dim"] == released["rope_scaling"]["mscale_all_dim"]


def test_unknown_preset_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown preset 'deepseek-v4'") as error:
        preset("deepseek-v4")
    for name in PRESETS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="tiny, "):
        preset_kwargs("TINY")


def test_overrides_apply_and_every_call_gets_its_own_copy():
    config = preset("tiny", num_hidden_layers=2, rope_parameters={"rope_type": "default"})
    assert config.num_hidden_layers == 2 and config.rope_parameters["rope_type"] == "default"
    kwargs = preset_kwargs("tiny")
    kwargs["rope_parameters"]["factor"] = 99.0
    assert preset_kwargs("tiny")["rope_parameters"]["factor"] == 4.0
    assert preset("tiny").rope_parameters["factor"] == 4.0


class _Tokenizer:
    """What `training.model.build_model` reads of the BPE it trains: its size and special token ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size


def _trained_config(flags: list[str]) -> tuple[dict, MoeMtpConfig]:
    from moe_mtp.train import parse_args
    from moe_mtp.training.model import build_model

    args = parse_args(flags)
    with torch.device("meta"):
        model = build_model(args, _Tokenizer(args.vocab_size))
    return vars(args), model.config


def _assert_trains_preset(name: str, flags: list[str]):
    args, config = _trained_config(flags)
    assert {key: args[key] for key in train_flags(name)} == train_flags(name)
    assert config.max_position_embeddings == args["seq_len"]
    assert _architecture(config) == _architecture(preset(name, use_cache=False))


def test_smoke_preset_is_the_training_scripts_smoke_run():
    _assert_trains_preset("smoke", ["--smoke"])


def test_quickstart_preset_is_what_the_makefile_trains():
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")
    flags = []
    for variable in ("QUICKSTART_MODEL", "QUICKSTART_ARGS"):
        flags += shlex.split(re.search(rf"^{variable} \?=(.*)$", makefile, re.M)[1])
    _assert_trains_preset("quickstart", flags)
