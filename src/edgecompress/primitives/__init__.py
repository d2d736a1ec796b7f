"""Pure tensor math: no module edits, no global state. Tested bit for bit."""
