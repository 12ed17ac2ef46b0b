"""moekit.model (see ../shared/DESIGN.md)."""
