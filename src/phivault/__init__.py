"""phivault: a service, CLI and library that keeps medical data safe."""

__version__ = "0.1.0"
