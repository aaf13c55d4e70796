"""Command line and HTTP gateway: what users call. Imports control and storage."""
