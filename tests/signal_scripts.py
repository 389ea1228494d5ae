"""Pieces of the scripts that tests run in a subprocess of their own to see where a signal lands."""

# a SIGTERM handler of the script's own, which raises Mine: the test sees whose handler took it
# (the script imports os, signal, sys, threading and time first, and anything else it needs)
MINE_ON_SIGTERM = """
import os, signal, sys, threading, time

class Mine(Exception):
    pass

def mine(signum, frame):
    raise Mine()

signal.signal(signal.SIGTERM, mine)
"""
