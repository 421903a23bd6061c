"""python -m distbp."""
import sys

from .cli import main

sys.exit(main())
