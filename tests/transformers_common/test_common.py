"""transformers' own common model tests, run on moe-mtp's classes the way transformers runs them on DeepseekV3.

`make test-transformers` fetches the mixins from the sdist of the installed transformers (prepare.py) and runs this
file. Every skip below says why; everything else the mixins define runs.
"""

import unittest
from unittest import mock

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.testing_utils import torch_device
from transformers_tests.generation.test_utils import GenerationTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor
from transformers_tests.test_training_mixin import TrainingTesterMixin

from moe_mtp import MoeMtpConfig, MoeMtpForCausalLM, MoeMtpModel, MoeMtpPreTrainedModel
from moe_mtp.configuration import preset

# The mixins tell base models from heads (labels, which classes must return a loss, the base class for the RoPE
# tests) by these name tables, which list transformers' in-tree models only; an in-tree model would be in them.
MODEL_MAPPING_NAMES.setdefault(MoeMtpConfig.model_type, MoeMtpModel.__name__)
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MoeMtpConfig.model_type, MoeMtpForCausalLM.__name__)


class MoeMtpModelTester:
    causal_lm_class = MoeMtpForCausalLM
    base_model_class = MoeMtpModel

    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, use_input_mask=True, vocab_size=99,
                 hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, num_nextn_predict_layers=1):  # fmt: skip
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_nextn_predict_layers = num_nextn_predict_layers

    def get_config(self) -> MoeMtpConfig:
        # The tests' "tiny" preset (V3 routing over 4 groups) at the sizes the mixins ask for, with plain RoPE: the
        # mixins' RoPE tests compare their own scaling against an unscaled model.
        return preset(
            "tiny", vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok, num_nextn_predict_layers=self.num_nextn_predict_layers,
            max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            use_cache=True,
        )  # fmt: skip

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = torch.tril(torch.ones_like(input_ids)).to(torch_device) if self.use_input_mask else None
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask):
        model = MoeMtpModel(config).to(torch_device).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))


class MoeMtpModelTest(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin, unittest.TestCase):
    all_model_classes = (MoeMtpModel, MoeMtpForCausalLM)
    all_generative_model_classes = (MoeMtpForCausalLM,)
    # As for DeepseekV3: the 0.9 split hits edge cases in test_cpu_offload.
    model_split_percents = [0.5, 0.7, 0.8]
    _torch_compile_train_cls = MoeMtpForCausalLM

    # The mixin is abstract over `model_tester`; unittest sets it in setUp.
    model_tester = None

    def setUp(self):
        self.model_tester = MoeMtpModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MoeMtpConfig, hidden_size=32)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_model_weights_reload_no_missing_tied_weights(self):
        # The mixin empties the weights file on purpose. moe-mtp refuses a folder that lacks weights unless the
        # caller asks for them to be initialized (docs/conversion.md), so this run asks; the rest is the mixin's.
        load = MoeMtpPreTrainedModel.__dict__["from_pretrained"].__func__

        def from_pretrained(cls, *args, **kwargs):
            return load(cls, *args, allow_missing_weights=True, **kwargs)

        with mock.patch.object(MoeMtpPreTrainedModel, "from_pretrained", classmethod(from_pretrained)):
            super().test_model_weights_reload_no_missing_tied_weights()
