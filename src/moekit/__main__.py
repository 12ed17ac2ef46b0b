"""`python -m moekit` (and `torchrun ... -m moekit train ...`): the `moekit` command."""

import sys

from moekit.cli import main

sys.exit(main())
