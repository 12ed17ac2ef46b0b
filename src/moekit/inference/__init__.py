"""moekit.inference (see ../shared/DESIGN.md)."""
