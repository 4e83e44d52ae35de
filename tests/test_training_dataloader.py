"""training/dataloader.py: which blocks each process of a `python -m moe_mtp.train` run reads (the run itself:
test_train.py)."""

from moe_mtp.training.dataloader import BlockSampler


def test_block_sampler_splits_one_global_batch_over_processes():
    one = BlockSampler(num_blocks=50, batch_size=4, grad_accum=2, world_size=1, seed=3)
    two = BlockSampler(num_blocks=50, batch_size=2, grad_accum=2, world_size=2, seed=3)
    for step in range(10):  # crosses epochs
        for micro in range(2):
            assert one.micro_batch(step, micro, 0) == two.micro_batch(step, micro, 0) + two.micro_batch(step, micro, 1)
