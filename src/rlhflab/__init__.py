"""rlhflab: the InstructGPT pipeline (SFT -> reward model -> RL with a KL penalty) and its
variants, with instruments that tell a working run from reward hacking."""

__version__ = "0.1.0"
