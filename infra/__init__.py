"""What the factory runs on: settings, LLM engines, the code sandbox, the CLI, deployments."""
