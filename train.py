"""Preference-tune Whisper with ORPO.

    python train.py --config recipes/demo.yaml [--key value ...]
    accelerate launch [--config_file accelerate_configs/X.yaml] train.py --config recipes/X.yaml [--key value ...]
"""

import sys

from orpo.config import ConfigError, parse_args
from orpo.data import ManifestError
from orpo.trainer import NonFiniteLossError, train


def main() -> int:
    try:
        cfg = parse_args()
        train(cfg)
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
