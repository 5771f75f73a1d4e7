"""The built-in plugins. Each is an ordinary plugin module, registered through the
``kvaware_scorer`` entry-point group like any third-party plugin."""
