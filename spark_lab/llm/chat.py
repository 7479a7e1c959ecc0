"""A chat session: history, system prompt, the model's template, oldest turns dropped to fit."""
from __future__ import annotations

from .engine import LLM, ContextOverflow


class ChatSession:
    def __init__(self, llm: LLM, system_prompt: str | None = None, reserve: int = 256,
                 template_options: dict | None = None, tools: list[dict] | None = None):
        self.llm = llm
        self.tools = list(tools or [])     # OpenAI-format tools the model may call (llm/tools.py)
        self.last_tool_calls: list[dict] = []   # the calls in the last answer (run them, add_tool_result)
        self.template_options = dict(template_options or {})   # e.g. {"enable_thinking": False} (Qwen3)
        self.system_prompt = system_prompt
        self.history: list[dict] = []      # user/assistant turns, oldest first
        self.reserve = reserve             # tokens kept free for the answer
        self.last = None                   # the last Generation (timings, token ids)

    def messages(self, user: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs += self.history
        if user is not None:
            msgs.append({"role": "user", "content": user})
        return msgs

    def _fit(self, user: str, max_new_tokens: int) -> list[int]:
        """Token ids of the conversation, dropping the oldest turns until it fits the context."""
        room = self.llm.n_ctx - min(max_new_tokens, self.reserve)
        while True:
            msgs, tool_options = self._with_tools(self.messages(user))
            ids = self.llm.encode_chat(msgs, **self.template_options, **tool_options)
            if len(ids) <= room:
                return ids
            if not self.history:
                alone = len(ids)
                raise ContextOverflow(
                    f"this message is {alone} tokens with the system prompt; the context of "
                    f"{self.llm.n_ctx} leaves room for {room} (shorten it or load with a larger n_ctx)")
            # drop the oldest user/assistant pair
            self.history = self.history[2:] if len(self.history) >= 2 else []

    def _with_tools(self, msgs):
        if not self.tools:
            return msgs, {}
        from .tools import prepare, tool_format
        return prepare(msgs, self.tools, tool_format(self.llm.tokenizer.chat_template))

    def stream(self, user: str | None, max_new_tokens: int = 256, tool_choice=None, **sampling):
        """Yield pieces of the answer (str) and of the reasoning (llm.reasoning.ReasoningPiece).

        user=None continues after tool results (add_tool_result); tool_choice "required" or a tool's
        name constrains the answer to a call; json_schema=/grammar=/regex= constrain it (llm/constrain.py)."""
        from .tools import constraint_args, parse, tool_format
        fmt = tool_format(self.llm.tokenizer.chat_template)
        if self.tools and tool_choice not in (None, "auto", "none"):
            sampling.update(constraint_args(self.tools, fmt, None if tool_choice == "required" else tool_choice))
        ids = self._fit(user, max_new_tokens)
        it = self.llm.stream_tokens(ids, max_new_tokens, **sampling)
        while True:
            try:
                _, piece = next(it)
            except StopIteration as done:
                self.last = done.value
                break
            if piece:
                yield piece
        # the answer only: templates drop earlier turns' reasoning (gpt-oss's refuses it in content)
        if user is not None:
            self.history.append({"role": "user", "content": user})
        if self.tools:
            from .tools import raw_text
            content, self.last_tool_calls = parse(raw_text(self.llm, self.last), fmt, self.tools)
            content = self.last.text.strip() if fmt == "harmony" else content
        else:
            content, self.last_tool_calls = "", []
        if self.last_tool_calls:
            self.history.append({"role": "assistant", "content": content, "tool_calls": self.last_tool_calls})
        else:
            self.history.append({"role": "assistant", "content": self.last.text.strip()})

    def add_tool_result(self, call: dict, result) -> None:
        """The result of one of last_tool_calls, as a `tool` message the next turn (stream(None)) sees."""
        self.history.append({"role": "tool", "content": str(result), "tool_call_id": call["id"],
                             "name": call["function"]["name"]})

    def send(self, user: str, **gen) -> str:
        """The answer (a reasoning model's thinking stays in self.last.reasoning)."""
        for _ in self.stream(user, **gen):
            pass
        return self.last.text

    def reset(self) -> None:
        self.history = []
