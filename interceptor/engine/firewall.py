"""Transitional re-export: profiles are compiled in ``interceptor.profiles`` and enforced by
kernel chains (``interceptor.firewall``); the engine has no firewall stage."""

from interceptor.profiles import ACTIONS, ALLOW, DROP, REJECT, CompiledProfile, CompiledRule  # noqa: F401
