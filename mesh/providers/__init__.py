"""Provider adapters: hosted AI APIs (OpenAI Chat Completions and every server speaking
it, Anthropic Messages) served as Inference gRPC backends. See docs/providers.md."""
