"""moekit.train (see ../shared/DESIGN.md)."""
