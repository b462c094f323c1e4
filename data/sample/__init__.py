"""Shipped real DFT sample: rMD17 aspirin, split 01 (1000 train + 1000 test frames). See README.md."""
