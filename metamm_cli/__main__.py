"""``python -m metamm_cli``: the CLI (what torchrun starts: ``torchrun --nproc_per_node=N -m metamm_cli train ...``)."""
import sys

from metamm_cli.cli import main

sys.exit(main())
