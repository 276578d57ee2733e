"""Preference-tune Whisper with ORPO (the same as ``whisper-orpo train``).

python train.py --config recipes/demo.yaml [--key value ...]
accelerate launch [--config_file accelerate_configs/X.yaml] train.py --config recipes/X.yaml [--key value ...]
"""

import sys

from orpo.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python train.py"))
