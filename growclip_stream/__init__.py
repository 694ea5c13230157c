"""growclip-stream: online, self-growing CLIP training from a stream (library; no process concerns)."""
