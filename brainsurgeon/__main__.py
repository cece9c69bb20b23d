"""python -m brainsurgeon: the command line (also under torchrun -m brainsurgeon)."""
import sys

from .cli import main

sys.exit(main())
