"""moekit.distributed (see ../shared/DESIGN.md)."""
