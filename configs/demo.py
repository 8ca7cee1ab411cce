"""The demo config (Twitter-like generated graph); it lives in the package so
that `twhin demo` works from an installed wheel too."""

from twhin_jax.demo_config import get_config  # noqa: F401
