"""Reference models and checkpoint readers used by the CLI, tests and experiments."""

from jaxquant.models.checkpoints import load_safetensors_params, torch_to_flax

__all__ = ["load_safetensors_params", "torch_to_flax"]
