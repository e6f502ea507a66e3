"""The DDPO trainer: rollouts with exact DDIM log-probs, rewards, advantages, LoRA updates."""
