"""RL prompts: batches of prompt texts (or chat message lists), one batch per PPO iteration.

The loader is shuffled with the run's seed and drops the last incomplete batch (trl's `prepare_dataloader`), so
every iteration has exactly `batch_size` episodes and the soft-risk schedule's counts hold. Under data
parallelism `batch_size` is the global batch: each rank's loader takes batch_size / world_size prompts of its
own shard (Lightning's distributed sampler).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader


class PromptDataModule(L.LightningDataModule):
    def __init__(self, prompts: Sequence, batch_size: int, seed: int = 0):
        super().__init__()
        prompts = list(prompts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.rl.batch_size={batch_size!r}: accepted are integers >= 1")
        if len(prompts) < batch_size:
            raise ValueError(f"data.rl.batch_size={batch_size} but the task has {len(prompts)} training prompts: "
                             f"accepted are batch sizes <= {len(prompts)}")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed

    def local_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(f"data.rl.batch_size={self.batch_size} does not split over {world} processes: accepted "
                             f"are multiples of {world}")
        return self.batch_size // world

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=self.local_batch_size(), shuffle=True, drop_last=True,
                          collate_fn=list, generator=torch.Generator().manual_seed(self.seed))

    def iterations_per_epoch(self) -> int:
        return len(self.prompts) // self.batch_size
