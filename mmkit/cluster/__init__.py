"""CommonIT: group instruction data by Task / Embedding / Length; group-pure batches.

The Python API of cluster.md section 8. Importing it does not import torch.
"""

from mmkit.cluster.groups import GroupInfo
from mmkit.cluster.sampler import GroupedBatchSampler, RandomBatchSampler, load_groups, plan_epoch

__all__ = ["GroupInfo", "GroupedBatchSampler", "RandomBatchSampler", "load_groups", "plan_epoch"]
