"""Joint: trains on every task seen so far, so its last task is one task holding all the data. The upper bound."""

from __future__ import annotations

from cli.errors import ConfigError
from lightning_modules.classification.finetune import Finetune


class Joint(Finetune):
    """Finetune's loss on the union of tasks 0..t; needs `data.train_on: seen`."""

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if stage == "fit" and getattr(dm, "train_on", "seen") != "seen":
            raise ConfigError("Joint trains on all data seen so far: set data.init_args.train_on: seen")
