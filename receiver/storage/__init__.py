"""Storage: the disk-writer thread, WAV files and sidecars, header checks and crash recovery."""
