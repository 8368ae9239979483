"""A CPU platform with a second generator standing for a device's own (CUDA's), for resume tests."""

import torch

from trainer.platform import CpuPlatform


class DeviceGeneratorPlatform(CpuPlatform):
    def __init__(self):
        self.generator = torch.Generator().manual_seed(7)

    def rng_state(self) -> dict[str, torch.Tensor]:
        return super().rng_state() | {"device": self.generator.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        super().set_rng_state(state)
        self.generator.set_state(state["device"])
