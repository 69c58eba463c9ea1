"""Token streams addressed by global sample index, and turning text into them."""
