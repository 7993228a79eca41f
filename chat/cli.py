"""The command line: parse and check every option, then load the model and run the session.

Nothing heavy is imported here at module level, so `chat --help` and `chat --version` are instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from chat import __version__
from chat import conversation as storage
from chat.errors import ChatError, UsageError, file_error
from chat.options import Options
from chat.params import GenerationParams, parse_value
from chat.text import readable

DEFAULTS = GenerationParams()
DEMO_NAME = "smollm2-135m-instruct"

USAGE = f"""chat {__version__}: talk to a Hugging Face causal language model in your terminal.

Usage:
  chat [MODEL] [options]
  chat -h | --help
  chat --version

MODEL is a local model directory, a GGUF file, a TorchScript artifact directory or a Hugging Face Hub id
such as gpt2; with --base-url, the id of a model the server serves. Without one, chat opens the demo model
(`make demo` fetches it), or the server's only model. A model of a family chat's
native core runs (llama, mistral, qwen2, phi3, gpt2) is exported for it once, on first use, and cached.

Options:
  --model=MODEL                The model (instead of MODEL).
  --model_name_or_path=MODEL   Same as --model.
  --backend=NAME               auto, torchscript or transformers [default: auto].
  --device=DEVICE              auto, cpu, cuda or cuda:N [default: auto].
  --dtype=DTYPE                auto, float32, bfloat16 or float16 [default: auto].
  --quantize=KIND              Weights of a model exported on first use: auto, int8, int4 or none
                               [default: auto] (auto: int8 with --dtype auto on a CPU that runs
                               chat's native kernels; int4: smaller and faster, bfloat16, rounder).
  --base-url=URL               Chat with a model an OpenAI-compatible server runs (vLLM, SGLang, llama-server,
                               ollama, transformers serve), e.g. http://127.0.0.1:8000/v1 (default:
                               $CHAT_BASE_URL, else $OPENAI_BASE_URL).
  --api-key-file=FILE          The server's API key, read from FILE (default: $CHAT_API_KEY; $OPENAI_API_KEY
                               only for the server of $OPENAI_BASE_URL).
  --hide-reasoning             Leave out what a server sends as the model's reasoning (shown dimmed).
  --no-export                  Neither export on first use nor take chat's cached artifacts: run
                               transformers where no artifact of your own is at hand.
  --cache                      List the artifacts exported on first use, with their sizes, and exit.
  --cache-remove=NAME          Remove one of them (as --cache names it), or all, and exit.
  --threads=N                  CPU threads (default: $OMP_NUM_THREADS, else one per CPU less those
                               other programs keep busy, followed as replies decode).
  --max-new-tokens=N           Most tokens in one reply (default {DEFAULTS.max_new_tokens}).
  --min-new-tokens=N           Fewest tokens before a reply may end (default {DEFAULTS.min_new_tokens}).
  --temperature=T              Randomness; 0 is greedy (default {DEFAULTS.temperature}*).
  --top-k=K                    Sample from the K likeliest tokens; 0 is all (default {DEFAULTS.top_k}*).
  --top-p=P                    Nucleus sampling mass; 1 is off (default {DEFAULTS.top_p}*).
  --repetition-penalty=R       Penalise repeats; 1 is off (default {DEFAULTS.repetition_penalty}*).
  --seed=S                     Random seed, for replies you can reproduce.
  --system=TEXT                The system prompt.
  --user=NAME                  Your label at the prompt [default: User].
  --prompt=TEXT                One-shot: print the reply to TEXT and exit.
  --no-stream                  Print each reply whole instead of token by token.
  --no-wrap                    Let the terminal break long lines anywhere, not between words.
  --context-policy=POLICY      When the history outgrows the context: drop-oldest or error [default: drop-oldest].
  --save-dir=DIR               Where each chat at a terminal is kept as it goes, and where !save writes
                               without a path (default $XDG_DATA_HOME/chat/sessions, that is
                               ~/.local/share/chat/sessions).
  --continue                   Resume the chat kept last in --save-dir, and go on keeping it there.
  --chats                      List the chats kept in --save-dir, the last first, and exit
                               (chat --load FILE goes on with one).
  --load=FILE                  Resume a session saved with !save (kept on in a new file).
  --no-autosave                Keep nothing of this chat on disk but what you !save.
  --trust-remote-code          Allow a model's own Python code to run (off by default).
  --offline                    Never touch the network (also HF_HUB_OFFLINE=1, but for a server elsewhere).
  --verbose                    Print speed after each reply, and tracebacks with errors.
  -h --help                    Show this help.
  --version                    Show the version.

* unless the model's generation_config.json recommends other sampling values.

In the chat, type !help for commands, \"\"\" to start and end a multi-line message, Ctrl+C to stop a reply
and Ctrl+D (or !exit) to leave.
"""

PARAM_OPTIONS = {
    "--max-new-tokens": "max_new_tokens",
    "--min-new-tokens": "min_new_tokens",
    "--temperature": "temperature",
    "--top-k": "top_k",
    "--top-p": "top_p",
    "--repetition-penalty": "repetition_penalty",
    "--seed": "seed",
}
CHOICES = {
    "--backend": ("auto", "torchscript", "transformers"),
    "--context-policy": ("drop-oldest", "error"),
    "--dtype": ("auto", "float32", "bfloat16", "float16"),
    "--quantize": ("auto", "int8", "int4", "none"),
}


def demo_model_dirs() -> list[Path]:
    """Where the demo model may be: $CHAT_DEMO_MODEL, the source tree's models/, ./models/."""
    dirs = [Path(p) for p in [os.environ.get("CHAT_DEMO_MODEL")] if p]
    dirs.append(Path(__file__).resolve().parent.parent / "models" / DEMO_NAME)
    dirs.append(Path.cwd() / "models" / DEMO_NAME)
    return dirs


def default_save_dir() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "chat" / "sessions"


def find_demo_model() -> Path | None:
    return next((d for d in demo_model_dirs() if (d / "config.json").is_file()), None)


def parse_args(argv: list[str]) -> Options:
    from docopt import DocoptExit, docopt

    try:
        args = docopt(USAGE, argv=argv, version=f"chat {__version__}", default_help=True)
    except DocoptExit as why:
        raise UsageError(_docopt_problem(argv, str(why))) from None

    for option, allowed in CHOICES.items():
        if args[option] not in allowed:
            raise UsageError(f"{option} must be one of {', '.join(allowed)}, not '{args[option]}'")
    device = args["--device"]
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not '{device}'")

    if args["--quantize"] in ("int8", "int4") and device.startswith("cuda"):
        raise UsageError(
            f"--quantize {args['--quantize']} is for the CPU (a GPU step is bound by kernel launches, not bytes)"
        )
    if args["--quantize"] == "int4" and args["--dtype"] not in ("auto", "bfloat16"):
        raise UsageError("--quantize int4 runs bfloat16 activations: leave --dtype at auto or set bfloat16")

    threads = None
    if args["--threads"] is not None:
        threads = int(args["--threads"]) if args["--threads"].isdigit() else 0
        if not 1 <= threads <= 4096:
            raise UsageError(f"--threads must be a whole number from 1 to 4096, not '{args['--threads']}'")

    values = {}
    for option, name in PARAM_OPTIONS.items():
        if args[option] is not None:
            try:
                values[name] = parse_value(name, args[option])
            except UsageError as why:
                raise UsageError(str(why).replace(name, option, 1)) from None
    try:
        GenerationParams(**values).check()
    except UsageError as why:
        raise UsageError(f"--min-new-tokens/--max-new-tokens: {why}") from None

    user = args["--user"].strip()
    if not user or len(user) > 40 or any(ch in user for ch in "\n\r:"):
        raise UsageError("--user must be a short label without ':' or line breaks, like --user Ana")
    for option, fix in (
        ("--prompt", "give it some text"),
        ("--system", "give it some text"),
        ("MODEL", "name a model directory or Hub id"),
        ("--model", "name a model directory or Hub id"),
        ("--model_name_or_path", "name a model directory or Hub id"),
        ("--save-dir", "name a directory"),
        ("--load", "name a file written by !save"),
        ("--cache-remove", "give a name as chat --cache lists it, or all"),
        ("--base-url", "give the server's URL, like http://127.0.0.1:8000/v1"),
        ("--api-key-file", "name a file holding the key"),
    ):
        if args[option] is not None and not args[option].strip():
            raise UsageError(f"{option} is empty; {fix}")
    load = Path(args["--load"]).expanduser() if args["--load"] is not None else None
    if load is not None and not load.is_file():
        raise UsageError(f"--load: no file {load}; name a file written by !save")
    save_dir = Path(args["--save-dir"]).expanduser() if args["--save-dir"] else default_save_dir()
    if args["--continue"]:
        if load is not None:
            raise UsageError("--continue and --load both name a chat to resume; give one")
        load = storage.newest_session_file(save_dir)
        if load is None:
            raise UsageError(f"--continue: no chat kept in {save_dir} yet; start one, or --load a saved file")
    # A resumed chat is kept on in its own file; a new one (or one --load copied) in a file of its own.
    keep_in = None if args["--no-autosave"] else load if args["--continue"] else storage.new_session_file(save_dir)

    names = [v for v in (args["MODEL"], args["--model"], args["--model_name_or_path"]) if v is not None]
    if len(set(names)) > 1:
        raise UsageError(f"two different models named ({' and '.join(names)}); name one")
    base_url, url_from = remote_url(args)
    if base_url is None and not names and load is not None:  # a resumed chat with a server goes back to it
        origin = storage.origin(load)
        if isinstance(origin.get("base_url"), str) and isinstance(origin.get("model"), str):
            base_url, url_from, names = check_url(origin["base_url"], f"{load}'s base_url"), "file", [origin["model"]]
    if names:
        model, model_given = names[0], True
    elif base_url is not None:
        model, model_given = "", False  # the one model the server serves
    elif args["--chats"] or args["--cache"] or args["--cache-remove"] is not None:
        model, model_given = "", False  # no model needed to list the chats or the cache
    else:
        demo = find_demo_model()
        if demo is None:
            raise UsageError(
                "no model named and the demo model is not fetched: run `make demo`, or name one: chat gpt2"
            )
        model, model_given = str(demo), False

    offline = args["--offline"] or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return Options(
        model=model,
        model_given=model_given,
        backend=args["--backend"],
        device=device,
        dtype=args["--dtype"],
        quantize=args["--quantize"],
        export=args["--backend"] == "auto" and not args["--no-export"],
        threads=threads,
        param_changes=values,
        system=None if args["--system"] is None else readable(args["--system"]),
        user=user,
        prompt=None if args["--prompt"] is None else readable(args["--prompt"]),
        stream=not args["--no-stream"],
        wrap=not args["--no-wrap"],
        context_policy=args["--context-policy"],
        save_dir=save_dir,
        load=load,
        keep_in=keep_in,
        list_chats=args["--chats"],
        cache="list" if args["--cache"] else args["--cache-remove"],
        trust_remote_code=args["--trust-remote-code"],
        offline=offline,
        verbose=args["--verbose"],
        base_url=base_url,
        api_key=api_key(args["--api-key-file"], url_from) if base_url is not None else None,
        local_only=args["--offline"],
        reasoning=not args["--hide-reasoning"],
    )


URL_VARIABLES = ("CHAT_BASE_URL", "OPENAI_BASE_URL")


def remote_url(args: dict[str, Any]) -> tuple[str | None, str | None]:
    """The server's base URL and where it came from (the option or an environment variable), or None.
    A URL from the environment gives way to a --backend that names a local one."""
    if args["--base-url"] is not None:
        if args["--backend"] != "auto":
            raise UsageError(f"--base-url chats with a server's model; --backend {args['--backend']} is for one here")
        return check_url(args["--base-url"], "--base-url"), "--base-url"
    if args["--backend"] != "auto":
        return None, None
    for variable in URL_VARIABLES:
        if os.environ.get(variable, "").strip():
            return check_url(os.environ[variable].strip(), f"${variable}"), variable
    return None, None


def check_url(url: str, given_by: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{given_by} must be an http:// or https:// URL like http://127.0.0.1:8000/v1, not '{url}'")
    return url.strip().rstrip("/")


def api_key(key_file: str | None, url_from: str | None) -> str | None:
    """The server's key: --api-key-file, else $CHAT_API_KEY, else $OPENAI_API_KEY for $OPENAI_BASE_URL's server
    (a user's OpenAI key never goes to another host)."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as why:
            reason = why.strerror if isinstance(why, OSError) and why.strerror else "not text"
            raise UsageError(f"--api-key-file: cannot read {path} ({reason}); name a file holding the key") from None
        if not key or "\n" in key:
            raise UsageError(f"--api-key-file: {path} must hold the key alone, on one line")
        return key
    if os.environ.get("CHAT_API_KEY", "").strip():
        return os.environ["CHAT_API_KEY"].strip()
    if url_from == "OPENAI_BASE_URL" and os.environ.get("OPENAI_API_KEY", "").strip():
        return os.environ["OPENAI_API_KEY"].strip()
    return None


def _docopt_problem(argv: list[str], message: str) -> str:
    """docopt prints the whole usage on any mistake; name the one problem instead."""
    options = [line.split()[0] for line in USAGE.splitlines() if line.strip().startswith("-")]
    known = {option.split("=")[0] for option in options} | {"-h", "--help"}
    takes_value = {option.split("=")[0] for option in options if "=" in option}
    seen, positional = set(), []
    args = iter(argv)
    for arg in args:
        name = arg.split("=", 1)[0]
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            return f"unknown option {name}{hint} (see chat --help)"
        if name in seen:
            return f"{name} is given twice; give it once"
        seen.add(name)
        if name in takes_value and "=" not in arg:
            next(args, None)  # its value
    if len(positional) > 1:
        return f"one MODEL at most, got {' '.join(positional)} (quote a --prompt or --system that has spaces)"
    first = message.strip().splitlines()[0] if message.strip() else "bad arguments"
    if first.lower().startswith("usage:"):
        first = "these arguments do not fit the usage"
    return f"{first} (see chat --help)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    try:
        options = parse_args(argv)
        if options.list_chats:
            return list_chats(options.save_dir)
        if options.cache is not None:
            from chat import artifact_cache

            lines = artifact_cache.describe() if options.cache == "list" else artifact_cache.remove(options.cache)
            print("\n".join(lines))
            return 0
        if options.offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        from chat.app import run

        return run(options)
    except ChatError as why:
        _report(why, verbose)
        return why.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `chat --help | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as why:  # a path given that the file system refuses (too long, say) where no check caught it
        _report(why, verbose, f"{file_error(why)}; check the paths given")
        return 2


def list_chats(save_dir: Path) -> int:
    files = storage.session_files(save_dir)
    if not files:
        print(f"no chats kept in {save_dir} yet")
        return 0
    print(f"{len(files)} chat(s) kept in {save_dir}, the last first (chat --load FILE goes on with one):")
    for path in files:
        print(storage.describe_session_file(path))
    return 0


def _report(why: BaseException, verbose: bool, message: str | None = None) -> None:
    """One line, `message` or the error's own words; with --verbose its traceback first."""
    if verbose:
        import traceback

        traceback.print_exception(why)
    print(f"chat: error: {message or why}", file=sys.stderr)
