"""Server tests: the OpenAI-compatible HTTP server, as a `heron serve` subprocess or as the app
in this process over a real engine, including chaos runs."""
