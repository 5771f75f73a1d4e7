"""The plugin manager: built-in and third-party plugins, one registration path.

Every plugin, built-in or not, is an entry point in the group ``kvaware_scorer`` (ours are
declared in this project's ``pyproject.toml``). Loading honours, in this order:

* the block list: ``plugins.block`` in the config plus ``KVAWARE_DISABLE_PLUGINS``
  (comma-separated entry-point names); blocked plugins never load;
* the allow list: ``plugins.allow`` in the config, or ``KVAWARE_PLUGINS`` (comma-separated;
  an empty value allows none). When set, only the named third-party plugins load; the
  built-ins always load unless blocked.

After loading, ``check_pending()`` rejects hook implementations with no matching spec
(a misspelt hook name fails at start-up, not silently).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from importlib.metadata import entry_points

import pluggy

from kvaware_scorer import hookspecs
from kvaware_scorer.errors import ConfigError

logger = logging.getLogger(__name__)

GROUP = hookspecs.PROJECT
# name -> module of the plugins this distribution ships (also its entry points).
BUILTIN_PLUGINS: dict[str, str] = {
    "kv-engine": "kvaware_scorer.plugins.kv_engine",
    "prefix-scorers": "kvaware_scorer.plugins.prefix_scorers",
    "load-scorers": "kvaware_scorer.plugins.load_scorers",
    "filters": "kvaware_scorer.plugins.filters",
    "pickers": "kvaware_scorer.plugins.pickers",
}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def get_plugin_manager(
    *,
    allow: Iterable[str] | None = None,
    block: Iterable[str] = (),
    load_entry_points: bool = True,
) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the built-ins and the installed plugins."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    blocked = set(block) | set(_env_list("KVAWARE_DISABLE_PLUGINS") or ())
    env_allow = _env_list("KVAWARE_PLUGINS")
    allowed = (
        set(allow) if allow is not None else (set(env_allow) if env_allow is not None else None)
    )
    for name in blocked:
        pm.set_blocked(name)
    found: dict[str, object] = {}
    if load_entry_points:
        for ep in entry_points(group=GROUP):
            if ep.name in found or pm.is_blocked(ep.name):
                continue
            if ep.name not in BUILTIN_PLUGINS and allowed is not None and ep.name not in allowed:
                logger.info("plugin %s not in the allow list; not loaded", ep.name)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise ConfigError(
                    f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}; fix or "
                    "uninstall it, or block it with KVAWARE_DISABLE_PLUGINS"
                ) from exc
            found[ep.name] = plugin
    for name, module in BUILTIN_PLUGINS.items():
        if name not in found and not pm.is_blocked(name):
            # Running from a source tree without installed metadata: same modules, same names.
            found[name] = importlib.import_module(module)
    for name, plugin in found.items():
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"plugin {name!r} is invalid: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    if allowed is not None:
        missing = allowed - set(found) - set(BUILTIN_PLUGINS) - blocked
        if missing:
            raise ConfigError(
                "plugins.allow names plugins that are not installed: "
                f"{', '.join(sorted(missing))}; installed: {', '.join(sorted(found))}"
            )
    return pm
