"""moekit.interop (see ../shared/DESIGN.md)."""
