"""Alignment: a reward model, PPO against it with a KL penalty to the SFT reference (InstructGPT),
DPO, and Constitutional AI (critique -> revision SFT, then RL from AI feedback)."""
