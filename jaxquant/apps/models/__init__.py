"""Reference models: the MiniLM sentence encoder and a small byte-level decoder."""
