"""Authentication, roles and request limits of the server (placeholder: filled in by the security work)."""


def install(server, app) -> None:
    """Wrap the running FastAPI ``server`` with ContourCL's security gateway."""
