"""Edge-device tools for DeViT: board setup (setup.sh), batch-1 latency (latency.py), board power and energy per
inference (power.py) and the multi-board launcher of the collaborative runtime (run_collab.sh). See README.md."""
