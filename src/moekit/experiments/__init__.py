"""`moekit experiment NAME`: the papers' claims, each checked by training its arms side by side.

`arms` defines the experiments (cheap to import: the CLI lists them); `runner` trains and reports.
"""
