"""The OpenAI-compatible server: the engine side (server.py), the HTTP side (app.py), the command (cli.py)."""
