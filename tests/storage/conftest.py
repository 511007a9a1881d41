"""The test S3 server's fixtures for the tests of a home on S3 (`tests/s3_server.py`)."""

from tests.s3_server import s3_home, s3_server  # noqa: F401
