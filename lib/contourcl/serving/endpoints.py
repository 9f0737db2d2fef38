"""ContourCL's own handlers for the endpoints that take uploads (placeholder)."""


def install(server, app) -> None:
    """Put ContourCL's upload endpoints in front of MONAI Label's."""
