"""The chat session: one conversation with one engine, its parameters and its file, driven by a terminal, a
pipe or --prompt (chat.app). It asks the engine for replies and shows them on the screen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chat import conversation as storage
from chat.artifact import model_label
from chat.chatfile import ChatFile
from chat.conversation import Conversation
from chat.engine import Engine, Reply, ReplyRequest, ReplyStats
from chat.errors import ChatError
from chat.options import Options
from chat.params import CHOSEN, FLAG, LOADED, GenerationParams
from chat.screen import Screen
from chat.signals import Signals


class Session:
    def __init__(
        self,
        engine: Engine,
        options: Options,
        conversation: Conversation,
        params: GenerationParams,
        screen: Screen | None = None,
        *,
        chat_file: ChatFile | None = None,
        param_sources: dict[str, str] | None = None,
    ):
        self.engine = engine
        self.options = options
        self.conversation = conversation
        self.params = params
        # Where each parameter that is not chat's default came from ("command line", "!set", ...), for !status.
        self.param_sources = dict(param_sources or {})
        self.screen = screen or Screen(wrap=options.wrap)
        self.label = model_label(engine.model)
        self.last_stats: ReplyStats | None = None
        self.running = True
        self.conversational = False  # a person at a terminal: label replies, remark on cut-off ones
        self.signals = Signals()
        self.engine.reseed(params.seed)
        self.chat_file = chat_file or ChatFile(None)  # autosave: off unless the caller hands a file
        self.chat_file.begin(self.record())

    # --- output -------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.screen.say(text)

    def notice(self, text: str) -> None:
        self.screen.notice(text)

    def error(self, text: str) -> None:
        self.screen.error(text)

    # --- state --------------------------------------------------------------------------------

    def set_params(self, params: GenerationParams, reseed: bool = False) -> None:
        """Use new parameters; a new (or re-given) seed restarts the random sequence."""
        reseed = reseed or params.seed != self.params.seed
        self.params = params
        if reseed:
            self.engine.reseed(params.seed)

    def context_tokens(self) -> int | None:
        return self.engine.context_tokens(self.conversation)

    def record(self) -> dict[str, Any]:
        return storage.record(self.conversation, self.params, self.engine.origin())

    def save(self, path: Path, replace_any: bool = False) -> None:
        record = self.record()
        storage.write(path, record, replace_any=replace_any or path.expanduser() == self.chat_file.path)
        self.chat_file.saved_to(path, record)

    def keep(self) -> None:
        """Write the chat to its file if it changed since (see ChatFile). A failure is said once; each later
        change tries again, and a write that works again says so."""
        file = self.chat_file
        record = self.record()
        if not file.changed(record):
            return
        failed_before = file.failure is not None
        try:
            note = file.keep(record, empty=not self.conversation.messages)
        except ChatError as why:
            if file.failure is None:
                self.error(f"{why}; this chat is not on disk: chat tries again after the next change (!save PATH)")
            file.failure = str(why)
            return
        if note:
            self.notice(note)
        elif failed_before and file.written:
            self.notice(f"(kept in {file.path} again)")

    def unsaved(self) -> str | None:
        """Why the chat's latest changes are on no disk, if they are not (see ChatFile.unsaved)."""
        return self.chat_file.unsaved(self.record())

    def load(self, path: Path) -> None:
        """Go on with a saved chat; its parameters apply, but those given on the command line still win."""
        conversation, params = storage.load(path, self.params)
        given = {key: getattr(self.params, key) for key, source in self.param_sources.items() if source == FLAG}
        params = params.replace(**given)
        for key, value in params.as_dict().items():
            if value != getattr(self.params, key):
                self.param_sources[key] = LOADED
        self.conversation = conversation
        self.set_params(params)

    # --- replies ------------------------------------------------------------------------------

    def ask(self, text: str) -> bool:
        """Send a user message and stream the reply; False when no reply could be made (the message is taken
        back, so a refused message does not haunt the next turn)."""
        self.conversation.add("user", text)
        self.keep()  # the question is on disk before its reply starts
        if self.respond():
            return True
        self.conversation.messages.pop()
        return False

    def respond(self) -> bool:
        """Answer the last user message; False (and the history unchanged) when no reply could be made."""
        chosen = frozenset(key for key, source in self.param_sources.items() if source in CHOSEN)
        request = ReplyRequest(self.conversation, self.params, chosen, self.options.context_policy, self.signals)
        reply = self.engine.reply(request)
        with self.signals.reply():  # from here to the reply's place in the history, a signal only stops it
            return self.reply_to(reply)

    def reply_to(self, reply: Reply) -> bool:
        """Show the reply and add it to the history; False (nothing added) when it failed."""
        started = False
        try:
            reply.start()
            started = True
        except ChatError as why:  # said in words the user can act on, e.g. a conversation over the context
            self.error(str(why))
            return False
        except KeyboardInterrupt:  # while a server had not answered yet
            reply.finish = "interrupted"
        self.tell_fit(reply)

        interactive = self.conversational and self.screen.at_terminal()
        shown = self.screen.reply(self.label if interactive else None, self.options.stream, self.options.reasoning)
        try:
            for piece in reply if started else ():
                shown.write(piece)
        except KeyboardInterrupt:  # a second Ctrl+C in a slow step, or one during the prompt's prefill
            reply.finish = "interrupted"
        except ChatError as why:  # e.g. NaN scores
            shown.cut()
            self.error(str(why))
            return False
        except Exception as why:  # a failing model must not end the session
            if "KeyboardInterrupt" not in str(why):  # Ctrl+C inside a Python op, as TorchScript passes it on
                shown.cut()
                self.error(f"the model failed: {why}" + ("" if self.options.verbose else " (--verbose shows more)"))
                if self.options.verbose:
                    import traceback

                    traceback.print_exc(file=self.screen.err)
                return False
            reply.finish = "interrupted"
        shown.end(reply.text)
        if reply.error is not None and not reply.text:
            self.error(reply.error)
            return False

        cut = reply.finish == "interrupted" or reply.error is not None
        self.conversation.add("assistant", reply.text, **({"interrupted": True} if cut else {}))
        self.last_stats = reply.stats
        if reply.error is not None:
            self.error(f"{reply.error} (the partial reply is kept)")
        elif reply.finish == "interrupted" and self.signals.closing is None:
            self.notice("(interrupted; the partial reply is kept)")
        elif reply.finish == "length" and interactive:
            self.notice(f"(stopped at {reply.stats.new_tokens} tokens; !set max_new_tokens=N allows more)")
        if self.options.verbose:
            print(reply.stats.line(), file=self.screen.err, flush=True)
        return True

    def tell_fit(self, reply: Reply) -> None:
        """What fitting the conversation into the context did: exchanges left out, a reply capped."""
        if reply.dropped:
            self.notice(f"(dropped the {reply.dropped} oldest exchange(s) to fit the model's context)")
        if reply.room is not None:
            self.notice(
                f"(this reply can be at most {reply.room} tokens: the prompt fills the rest of the model's "
                f"{self.engine.context_length}-token context)"
            )
        for line in reply.notices:
            self.notice(line)
