"""trainer: robust fine-tuning of open_clip models (StarFT and baselines) on accelerate.

    trainer run --config configs/tiny.yaml --bank banks/v2.yaml --method starft

Importing trainer is light; torch, open_clip and accelerate load when a command needs them.
"""

__version__ = "0.1.0"
