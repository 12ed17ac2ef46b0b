"""`python -m moekit.cli`: the `moekit` command, as `python -m moekit`."""

import sys

from moekit.cli import main

sys.exit(main())
