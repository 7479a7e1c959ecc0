"""A chat session: history, system prompt, the model's template, oldest turns dropped to fit."""
from __future__ import annotations

from .engine import LLM, ContextOverflow


class ChatSession:
    def __init__(self, llm: LLM, system_prompt: str | None = None, reserve: int = 256,
                 template_options: dict | None = None):
        self.llm = llm
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
            ids = self.llm.encode_chat(self.messages(user), **self.template_options)
            if len(ids) <= room:
                return ids
            if not self.history:
                alone = len(ids)
                raise ContextOverflow(
                    f"this message is {alone} tokens with the system prompt; the context of "
                    f"{self.llm.n_ctx} leaves room for {room} (shorten it or load with a larger n_ctx)")
            # drop the oldest user/assistant pair
            self.history = self.history[2:] if len(self.history) >= 2 else []

    def stream(self, user: str, max_new_tokens: int = 256, **sampling):
        """Yield pieces of the answer (str) and of the reasoning (llm.reasoning.ReasoningPiece)."""
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
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": self.last.text.strip()}]

    def send(self, user: str, **gen) -> str:
        """The answer (a reasoning model's thinking stays in self.last.reasoning)."""
        for _ in self.stream(user, **gen):
            pass
        return self.last.text

    def reset(self) -> None:
        self.history = []
