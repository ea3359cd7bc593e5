"""`python -m automl ...` is the `automl` command."""
import sys

from automl.ops.cli import main

sys.exit(main())
