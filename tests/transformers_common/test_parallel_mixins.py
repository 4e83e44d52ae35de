"""transformers' own tensor-, expert- and FSDP-parallel model tests, run on `MoeMtpForCausalLM`.

The mixins come from the sdist of the installed transformers (prepare.py), with our process launcher
(distributed_testing_utils.py) in place of the one transformers keeps out of the sdist. Each distributed test starts
gloo ranks on the CPU (2; six tests 4 or 8, sharing the cores), one thread each, and compares the sharded model with
one process on the same inputs.

transformers runs these tests only for the model types on its allowlists (a few representative models per engine,
to bound its CI); moe-mtp adds its own type, as an in-tree model would be listed. Every skip below says why.
"""

import unittest

from test_common import MoeMtpModelTester  # this folder's test_common.py (pytest puts the folder on the path)
from transformers_tests import test_expert_parallel_mixin, test_fsdp_mixin, test_tensor_parallel_mixin
from transformers_tests.distributed_testing_utils import _get_distributed_device_type
from transformers_tests.test_expert_parallel_mixin import ExpertParallelTesterMixin
from transformers_tests.test_fsdp_mixin import FSDPTesterMixin
from transformers_tests.test_tensor_parallel_mixin import TensorParallelTesterMixin

from moe_mtp import MoeMtpConfig, MoeMtpForCausalLM, MoeMtpModel

for allowlist in (
    test_tensor_parallel_mixin.TP_DISTRIBUTED_TEST_MODEL_TYPES,
    test_expert_parallel_mixin.EP_DISTRIBUTED_TEST_MODEL_TYPES,
    test_fsdp_mixin.FSDP_DISTRIBUTED_TEST_MODEL_TYPES,
):
    if allowlist is not None:  # None: the mixin runs every model type
        allowlist.add(MoeMtpConfig.model_type)

# The expert-parallel tests run once per `experts_implementation` (eager, grouped_mm, batched_mm; forward with untied
# and tied embeddings). moe-mtp's routed experts pick their own kernel (grouped GEMMs, one GEMM per expert where the
# device has no grouped kernel) and do not take transformers' switch: transformers reports the model as not supporting
# it (`experts_implementation` stays "eager", and `set_experts_implementation("grouped_mm")` raises). So the eager
# cases run (forward 0 and 3, backward 0), and the others, which would repeat them, are skipped.
REPEATED_EXPERT_CASES = {
    "test_ep_forward_1", "test_ep_forward_2", "test_ep_forward_4", "test_ep_forward_5",
    "test_ep_backward_1_grouped_mm", "test_ep_backward_2_batched_mm",
}  # fmt: skip


class MoeMtpParallelTest(TensorParallelTesterMixin, ExpertParallelTesterMixin, FSDPTesterMixin, unittest.TestCase):
    all_model_classes = (MoeMtpModel, MoeMtpForCausalLM)

    # The mixins are abstract over `model_tester`; unittest sets it in setUp.
    model_tester = None

    def setUp(self):
        self.model_tester = MoeMtpModelTester(self)
        name = self._testMethodName
        if name == "test_tp_unit_plan_forward_backward":  # transformers >= 5.25
            self.skipTest(
                "MLA has no per-head q_proj/k_proj/v_proj for the unit_colwise/unit_rowwise styles to shard: queries "
                "come from q_b_proj, keys and values from one latent through kv_b_proj (the mixin skips it as well)"
            )
        if name == "test_moe_parallel_plans_shard_experts" and name in vars(TensorParallelTesterMixin):
            self.skipTest(
                "transformers 5.24's version also requires the tensor-parallel plan to shard the routed experts; "
                "moe-mtp's keeps them whole and splits them by expert under ep_size (docs/distributed.md), as "
                "DeepseekV3's plan does from 5.25, whose version checks the expert-parallel plan only (as "
                "tests/test_modeling_experts.py does on every version)"
            )
        if name in REPEATED_EXPERT_CASES:
            self.skipTest(
                "moe-mtp's experts choose their own kernel and do not take transformers' `experts_implementation` "
                "(it stays 'eager'; setting 'grouped_mm' raises), so this case would repeat the eager one, which runs"
            )

    def _skip_if_insufficient_devices(self, world_size):
        # CPU ranks can share cores (slower, same results): the six 4- and 8-rank tests run on 2 cores in about 45 s.
        if _get_distributed_device_type() != "cpu":
            super()._skip_if_insufficient_devices(world_size)
