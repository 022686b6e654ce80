"""Test package (lets test files import shared helpers such as tests.fake_moderation_server)."""
