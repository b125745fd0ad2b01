"""The taps being recorded: a tap's state and pending audio, the registry of active taps, who may
start one and what it is called.
"""
