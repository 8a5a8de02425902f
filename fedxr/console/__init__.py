"""`fedxr console`: the web application hospitals and the coordinator sign in to (see app.py)."""
