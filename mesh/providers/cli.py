"""`aimesh backend openai` and `aimesh backend anthropic`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..control.client import add_registration_flags
from ..security.cli import add_mtls_flags, mtls_from_args
from ..units import parse_duration

KINDS = ("openai", "anthropic")
DEFAULT_BASE = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
EXIT_USAGE = 2


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks one)")
    p.add_argument(
        "--base-url",
        default=DEFAULT_BASE[kind],
        help=f"the provider API's base URL (default {DEFAULT_BASE[kind]})",
    )
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key here")
    key.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help=f"read the API key from this environment variable (default {DEFAULT_KEY_ENV[kind]}, "
        "when set)",
    )
    p.add_argument(
        "--model-map",
        action="append",
        default=[],
        metavar="MESH_MODEL=PROVIDER_MODEL",
        help="serve MESH_MODEL with the provider's PROVIDER_MODEL (repeat); "
        "models not mapped are sent as named",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        metavar="NAME",
        help="also advertise NAME (sent as named) in ListModels and the registration",
    )
    p.add_argument(
        "--instance-id", default="", help="name in the aimesh-instance trailer (default HOST:PORT)"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=100,
        help="HTTP connections to the provider at most (default 100)",
    )
    p.add_argument(
        "--connect-timeout",
        type=_duration,
        default=5.0,
        help="to connect to the provider (default 5s; never past the call's deadline)",
    )
    p.add_argument(
        "--read-timeout",
        type=_duration,
        default=60.0,
        help="longest silence from the provider within a response (default 60s)",
    )
    p.add_argument(
        "--list-provider-models",
        action="store_true",
        help="ListModels also lists the provider's own models (GET models) when reachable",
    )
    p.add_argument("--owned-by", default="", help=f"owned_by in ListModels (default {kind})")
    p.add_argument(
        "--context-window", type=int, default=0, help="context_window in ListModels (default 0)"
    )
    p.add_argument(
        "--grace",
        type=_duration,
        default=10.0,
        help="on SIGTERM, time for in-flight calls to finish (default 10s)",
    )
    add_registration_flags(p, _duration)
    # The same mesh identity flags as `aimesh backend sim`: STRICT mTLS serving, and
    # registration over the control plane's mTLS port with --secure-control-plane.
    add_mtls_flags(p, proxy=False)


def add_parsers(backend_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    o = backend_sub.add_parser(
        "openai",
        help="the OpenAI Chat Completions API (or vLLM, Ollama, llama.cpp, TGI) as a backend",
        description="Serve the Inference API in front of an OpenAI-compatible HTTP API "
        "(chat/completions, embeddings, models). See docs/providers.md.",
    )
    _add_common(o, "openai")
    o.add_argument(
        "--max-tokens-field",
        choices=["max_tokens", "max_completion_tokens"],
        default="max_tokens",
        help="the request field for max_tokens (OpenAI's newer models want "
        "max_completion_tokens; default max_tokens)",
    )
    o.add_argument(
        "--continue-final-message",
        action="store_true",
        help="with a continuation, also send continue_final_message=true and "
        "add_generation_prompt=false (vLLM), so the server continues the prefix",
    )
    o.add_argument(
        "--no-stream-usage",
        action="store_true",
        help="do not send stream_options.include_usage (for servers that refuse it)",
    )
    a = backend_sub.add_parser(
        "anthropic",
        help="the Anthropic Messages API as a backend",
        description="Serve the Inference API in front of the Anthropic Messages API. "
        "See docs/providers.md.",
    )
    _add_common(a, "anthropic")
    a.add_argument(
        "--anthropic-version",
        default="2023-06-01",
        help="the anthropic-version header (default 2023-06-01)",
    )
    a.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        help="max_tokens sent when a request leaves it 0 (the API requires one; default 1024)",
    )


def _fail(kind: str, message: str) -> int:
    print(f"aimesh backend {kind}: {message}", file=sys.stderr)
    return EXIT_USAGE


def _api_key(args: argparse.Namespace, kind: str) -> str:
    """The key, or ValueError saying why it cannot be read (never the key itself)."""
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {path}: {exc.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {path} is empty")
        if len(key.splitlines()) > 1:
            raise ValueError(f"--api-key-file {path} has more than one line")
        return key
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "").strip()
        if not key:
            raise ValueError(f"--api-key-env {args.api_key_env}: the variable is not set or empty")
        return key
    return os.environ.get(DEFAULT_KEY_ENV[kind], "").strip()


def run(args: argparse.Namespace) -> int:
    from .. import runtime
    from ..sim.server import Registration
    from .base import ApiKey, BackendConfig, Provider, Timeouts, parse_model_map, serve

    kind: str = args.backend
    try:
        key = ApiKey(_api_key(args, kind))
        model_map = parse_model_map(args.model_map)
    except ValueError as exc:
        return _fail(kind, str(exc))
    if not args.base_url.startswith(("http://", "https://")):
        return _fail(kind, f"--base-url {args.base_url!r} is not an http:// or https:// URL")
    if args.max_connections < 1:
        return _fail(kind, "--max-connections must be at least 1")
    provider: Provider
    if kind == "openai":
        from .openai import OpenAIOptions, OpenAIProvider

        provider = OpenAIProvider(
            key,
            OpenAIOptions(
                max_tokens_field=args.max_tokens_field,
                continue_final_message=args.continue_final_message,
                stream_usage=not args.no_stream_usage,
            ),
        )
    else:
        from .anthropic import AnthropicOptions, AnthropicProvider

        if args.default_max_tokens < 1:
            return _fail(kind, "--default-max-tokens must be at least 1")
        if not key:
            print(
                f"aimesh backend anthropic: no API key (--api-key-file, --api-key-env or "
                f"${DEFAULT_KEY_ENV[kind]}); sending requests without x-api-key",
                file=sys.stderr,
            )
        provider = AnthropicProvider(
            key,
            AnthropicOptions(
                version=args.anthropic_version, default_max_tokens=args.default_max_tokens
            ),
        )
    config = BackendConfig(
        instance_id=args.instance_id,
        model_map=model_map,
        models=tuple(args.models),
        list_provider_models=args.list_provider_models,
        owned_by=args.owned_by,
        context_window=args.context_window,
    )
    try:
        mtls = mtls_from_args(args, args.control_plane)
    except ValueError as exc:
        return _fail(kind, str(exc))
    registration = None
    if args.control_plane:
        served = config.served()
        if not args.service and not served:
            return _fail(kind, "--control-plane needs --service NAME (or a --model-map/--model)")
        first = (args.model_map[0].partition("=")[0] if args.model_map else served[0]).strip()
        try:
            registration = Registration.from_args(args, first)
        except ValueError as exc:
            return _fail(kind, str(exc))
    runtime.run(
        serve(
            provider,
            args.base_url,
            config,
            args.listen,
            timeouts=Timeouts(connect=args.connect_timeout, read=args.read_timeout),
            max_connections=args.max_connections,
            grace=args.grace,
            registration=registration,
            mtls=mtls,
        )
    )
    return 0
