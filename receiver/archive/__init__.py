"""Past the local disk: finished recordings uploaded to an object store (`store.py`, through
`archiver.py`, in a process of its own: `process.py`), encrypted for age recipients on the way
(`encryption.py`), and local copies kept within limits (`retention.py`)."""
