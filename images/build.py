"""Stand-in until build.py lands."""
def add_arguments(p): pass
