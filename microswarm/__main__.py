"""`python -m microswarm`: the same as the `microswarm` command."""
import sys

from microswarm.cli import main

sys.exit(main())
