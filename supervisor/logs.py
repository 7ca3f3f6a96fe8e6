"""Structured logging: one event per line, JSON when not on a TTY, readable on a TTY.

Every line carries `stack`; container lines carry `instance` and `container` too.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "INFO", json: bool | None = None, stream=None) -> None:
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors.append(structlog.processors.JSONRenderer())
    else:
        # The console renderer reads a "stack" key as a stack trace; show it as stack_name.
        processors += [_rename_stack, structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _rename_stack(logger, method, event_dict):
    if "stack" in event_dict:
        event_dict["stack_name"] = event_dict.pop("stack")
    return event_dict


def get(stack: str):
    return structlog.get_logger().bind(stack=stack)
