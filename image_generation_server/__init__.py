"""The HTTP side of the image service: the app factory, the guard, the doors, and one error and response mapping."""

import os

# Haystack decides when it is first imported whether to send usage telemetry; this package is imported before it
# (by `image-generation-server` and `uvicorn --factory`), so the service sends none unless
# the environment asks for it.
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
