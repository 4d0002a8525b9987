"""``make bench``: TurtleMQ measured beside the reference systems (see ``bench/run.py``)."""
