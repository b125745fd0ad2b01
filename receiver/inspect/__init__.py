"""Inspection: the recordings catalog, analysis, the HTTP API and page, the ls/inspect/repair
commands.
"""
