"""moekit.analysis (see ../shared/DESIGN.md)."""
