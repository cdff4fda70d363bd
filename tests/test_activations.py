"""The planner's activation term against the bytes autograd really saves in one LoRA training step.

Tiny FLUX and InternVL models from the catalogue's own architecture description (pipelines/planner/catalogue.py);
saved tensors counted with torch.autograd.graph.saved_tensors_hooks (benchmarks/activations.py), so the
check does not depend on any allocator. The planner fails this test when a formula in emloc/memory.py or
a per-block constant in the catalogue drifts from what the models save by more than 10%.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.activations import compare
from benchmarks.memory import BenchModel, flux_bundle, vlm_bundle

TOLERANCE = 0.10  # |predicted / measured - 1|

FLUX = BenchModel("flux-tiny", flux_bundle(1, 1, text_tokens=8, num_attention_heads=2, attention_head_dim=32,
                                           joint_attention_dim=32, pooled_projection_dim=32, in_channels=16,
                                           axes_dims_rope=[8, 12, 12]), resolution=128)
VLM = BenchModel("vlm-tiny", vlm_bundle(2, 1, text={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                                    "num_key_value_heads": 2, "vocab_size": 300},
                                        vision={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                                "image_size": [56, 56], "patch_size": [14, 14]},
                                        image_token_id=299, image_seq_length=4), seq_len=64, image_tiles=1)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("spec", [FLUX, VLM], ids=["flux", "internvl"])
def test_planned_activations_are_within_10_percent_of_saved_tensors(spec, dtype):
    rows = compare(spec, dtype, rank=16)
    assert [r["checkpointing"] for r in rows] == [False, True]
    for row in rows:
        assert row["measured"] > 0
        assert abs(row["error"]) <= TOLERANCE, (
            f"{spec.key} {row['dtype']} checkpointing {row['checkpointing']}: planner {row['predicted']} B, "
            f"autograd saved {row['measured']} B ({100 * row['error']:+.1f}%)")
    without, with_checkpoints = rows
    assert with_checkpoints["measured"] < without["measured"]  # checkpointing keeps less, and the planner agrees
    assert with_checkpoints["predicted"] < without["predicted"]
