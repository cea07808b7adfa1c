"""OpenAI-compatible HTTP server: build_app(async_engine, served_model_name, ...) and run_server(args)."""
