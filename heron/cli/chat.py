"""`heron chat`: a conversation in the terminal through the model's chat template."""

from __future__ import annotations

import argparse
import sys

from heron.cli.common import (
    HelpFormatter,
    chat_ids,
    common_parent,
    engine_parent,
    has_chat_template,
    kv_parent,
    load_llm,
    model_parent,
    sampling_params,
    sampling_parent,
    write,
)
from heron.errors import HeronError, InvalidRequestError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``chat`` and its flags."""
    chat = subparsers.add_parser(
        "chat",
        parents=[common_parent(), model_parent(), sampling_parent(), engine_parent(), kv_parent()],
        formatter_class=HelpFormatter,
        help="interactive chat in the terminal",
        description="Chat with a model: type a message and press Enter; the reply streams in.\n"
        "The conversation history is kept and sent through the model's chat template.\n\n"
        "commands: /reset clears the history, /exit (or Ctrl-D) quits.\n"
        "Ctrl-C stops the reply being generated; at the prompt it quits.",
    )
    chat.add_argument("--system", default=None, help="system message that starts the conversation")
    chat.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Reads messages from stdin until /exit or EOF, streaming each reply; Ctrl-C or an error
    drops only the current turn."""
    params = sampling_params(args)
    llm = load_llm(args)
    if not has_chat_template(llm):
        raise InvalidRequestError(
            f"model {args.model!r} has no chat template; use `heron generate --no-chat` instead"
        )
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = list(base)
    if interactive:
        print("Type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; commands: /reset, /exit", file=sys.stderr)
            continue

        history.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for piece in llm.stream(chat_ids(llm, history), params):
                reply.append(piece)
                write(piece)
        except KeyboardInterrupt:  # stop this reply, keep the session
            write("\n")
            print("(interrupted)", file=sys.stderr)
            history.pop()
            continue
        except HeronError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        answer = "".join(reply)
        write("\n" if not answer.endswith("\n") else "")
        history.append({"role": "assistant", "content": answer})
