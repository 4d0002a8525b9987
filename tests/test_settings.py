"""Settings from the environment: production refuses to start without a secret key of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def check(**env: str) -> subprocess.CompletedProcess:
    """``manage.py check`` in a fresh process with ``env`` on top of a clean environment."""
    base = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "SECRET_KEY", "DATABASE_URL", "REDIS_URL"}}
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO_ROOT, env=base | env, capture_output=True, text=True
    )


def test_production_settings_refuse_to_start_without_a_secret_key():
    result = check(DEBUG="0")
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def test_production_settings_start_with_a_secret_key_and_development_needs_none():
    assert check(DEBUG="0", SECRET_KEY="a-production-secret-of-enough-length").returncode == 0
    assert check().returncode == 0
