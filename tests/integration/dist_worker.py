"""Run under torchrun by test_distributed.py: train, then dump this rank's trainable weights."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from flowgrpo.config import load_config
from flowgrpo.recipe import GRPORecipe

if __name__ == "__main__":
    config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    recipe = GRPORecipe(cfg, resume="never")
    recipe.setup()
    try:
        recipe.train()
        state = recipe.adapter.trainable_state_dict()
        save_file(state, str(Path(cfg.output_dir) / f"rank-{recipe.rank}.safetensors"))
        print(f"rank {recipe.rank}/{recipe.world} distributed_type={recipe.accelerator.distributed_type.value}")
    finally:
        recipe.cleanup()
