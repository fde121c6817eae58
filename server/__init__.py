"""The HTTP side of the image service: the app factory, the guard, the doors, and one error and response mapping."""
