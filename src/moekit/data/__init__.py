"""moekit.data (see ../shared/DESIGN.md)."""
