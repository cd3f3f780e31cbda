"""The one generation path shared by `gpt2mm ask`, the HTTP API and the web page.

`Engine.prepare` turns a conversation (user/assistant turns, images) into a `Prompt`: token ids in the
model's `Q: <image> ... A: ...<|endoftext|>Q: ... A:` format and preprocessed pixel values. `Engine.generate`
runs ONE `model.generate` over several requests (left-padded; the batcher in `gpt2mm.serve.batching`
calls it with whatever arrived together) and streams text deltas per choice as tokens come in.

Streaming and per-row stopping go through one `StoppingCriteria` that `generate` calls after every
step with the whole batch: it sees each row's new token, decides per row whether that row is done (end of
text, a stop string, its own token limit, a cancelled request) and hands out the new text. A row's answer
is exactly `processor.postprocess_answer` of its generated text, cut at the request's own stop strings;
the streamed deltas concatenate to that answer (text that might still turn into a stop string, or a
half-decoded UTF-8 character, is held back until it is certain).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from gpt2mm.devices import pick_device
from gpt2mm.processing import STOP_STRINGS


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. `temperature == 0` (or below 1e-5) is greedy; requests with equal `batch_key` may share a batch."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature can overflow to inf (NaN probabilities); it is argmax anyway.
        return self.temperature < 1e-5

    def batch_key(self) -> tuple[Any, ...] | None:
        """Requests with the same key can run in one `generate`. None: run alone (a seeded sampled request
        must not depend on which other requests happened to share its batch)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sample", float(self.temperature), float(self.top_p))


@dataclass
class Prompt:
    """Token ids of a conversation ending in `A:`, and the pixel values of its images in `<image>` order."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # (num_images, 3, H, W)

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass
class Choice:
    """One generated answer: the text, the generated token ids (end-of-text included) and why it ended."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


@dataclass
class GenerationRequest:
    """A prompt, how to decode it, and where its results go.

    `on_delta(choice_index, text)` is called from the generating thread as text becomes certain;
    `on_done(request)` once all its choices are finished (or `error` is set). Set `cancelled` to stop early.
    """

    prompt: Prompt
    params: SamplingParams
    on_delta: Callable[[int, str], None] | None = None
    on_done: Callable[[GenerationRequest], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    choices: list[Choice] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        if self.on_done is not None:
            self.on_done(self)


class Engine:
    """A loaded model + processor on one device, and the generation function everything else uses.

    `generate` is not re-entrant: call it from one thread at a time (the batcher's worker, or the CLI).
    """

    def __init__(
        self, model: Any, processor: Any, device: str | torch.device | None = None, compile: bool = False
    ):
        self.device = torch.device(pick_device(device) if not isinstance(device, torch.device) else device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_token_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.image_token = processor.image_token
        self.batches_run = 0  # statistics: generate calls, and the largest batch, in rows
        self.max_rows_seen = 0
        self._lock = threading.Lock()  # one generate at a time
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self.compiled = None  # compile=True: single greedy answers through gpt2mm.serve.compiled
        if compile:
            from gpt2mm.serve.compiled import CompiledGreedy

            self.compiled = CompiledGreedy(self.model, max_cache_len=self.context_length)
        self.compiled_answers = 0  # statistics: answers the compiled path gave

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | None = None,
        dtype: str = "float32",
        compile: bool = False,
    ) -> Engine:
        """Load a model directory or hub id (`gpt2mm.load_model`) for inference."""
        from gpt2mm.loading import load_model

        model, processor = load_model(name_or_path, dtype=_DTYPES[dtype])
        return cls(model, processor, device=device, compile=compile)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.n_positions)

    @property
    def num_image_tokens(self) -> int:
        return int(self.model.config.num_image_tokens)

    # --- prompts ------------------------------------------------------------------------------------------

    def encode_turns(self, turns: Sequence[tuple[str, str, int]]) -> list[int]:
        """(role, text, number of images) turns, user first, alternating, ending with a user turn -> ids:
        `processor.encode_turns` as a prompt to answer (a `ValueError` for an empty question), so serving
        feeds the model exactly the tokens training gave it."""
        with self._tokenizer_lock:
            return self.processor.encode_turns(turns, generation_prompt=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prepare(self, turns: Sequence[tuple[str, str, int]], images: Sequence[Any] = ()) -> Prompt:
        """Token ids and pixel values for a conversation; `images` are PIL images in turn order."""
        n = sum(t[2] for t in turns)
        if n != len(images):
            raise ValueError(f"the turns hold {n} images but {len(images)} were given")
        ids = self.encode_turns(turns)
        pixels = self.processor.preprocess_images(list(images)) if images else None
        return Prompt(ids, pixels)

    def ask(
        self,
        question: str,
        image: Any = None,
        params: SamplingParams | None = None,
        on_delta: Callable[[int, str], None] | None = None,
    ) -> GenerationRequest:
        """One question (about one image, a list of images, or none) -> the finished request (see
        `.choices`). Several images stand where the question's `<image>` placeholders do, or, without
        placeholders, all before the question."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        prompt = self.prepare([("user", question, len(images))], images)
        request = GenerationRequest(prompt, params or SamplingParams(), on_delta=on_delta)
        self.generate([request])
        if request.error is not None:
            raise request.error
        return request

    # --- generation ---------------------------------------------------------------------------------------

    def max_new_tokens_for(self, prompt: Prompt, wanted: int) -> int:
        """`wanted`, clamped so that prompt + answer fit the context (position embeddings end there)."""
        return max(0, min(wanted, self.context_length - len(prompt.input_ids)))

    def generate(self, requests: Sequence[GenerationRequest]) -> None:
        """Generate every choice of every request, as few `model.generate` calls as the limits allow.

        Requests must share a `batch_key` (the batcher groups them). Each request ends with `finish()`:
        with its choices filled in, or with `error` set; this function itself does not raise for them.
        """
        live = [r for r in requests if not r.cancelled.is_set()]
        for r in requests:
            if r.cancelled.is_set():
                r.choices = [Choice(i, finish_reason="cancelled") for i in range(r.params.n)]
                r.finish()
        for chunk in self._fit_context(live):
            try:
                with self._lock:
                    self._generate_batch(chunk)
            except Exception as e:  # a bad batch fails its own requests, not the server
                for r in chunk:
                    if r.error is None and not all(c.finish_reason for c in r.choices):
                        r.finish(e)
                continue
            for r in chunk:
                r.finish()

    def _fit_context(self, requests: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        """Split so that in each batch the longest prompt + the largest token limit fit the context:
        left-padded rows all advance to the batch's length, and positions past the context do not exist."""
        chunks: list[list[GenerationRequest]] = []
        for r in requests:
            need_new = self.max_new_tokens_for(r.prompt, r.params.max_new_tokens)
            for chunk in chunks:
                longest = max(len(x.prompt.input_ids) for x in chunk + [r])
                most_new = max([self.max_new_tokens_for(x.prompt, x.params.max_new_tokens) for x in chunk])
                if longest + max(most_new, need_new) <= self.context_length:
                    chunk.append(r)
                    break
            else:
                chunks.append([r])
        return chunks

    @torch.inference_mode()
    def _generate_batch(self, requests: list[GenerationRequest]) -> None:
        rows: list[_Row] = []
        for r in requests:
            r.choices = [Choice(i) for i in range(r.params.n)]
            limit = self.max_new_tokens_for(r.prompt, r.params.max_new_tokens)
            stops = tuple(s for s in r.params.stop if s)
            rows += [_Row(r, c, limit, stops) for c in r.choices]
        for row in rows:
            if row.limit == 0:
                row.close("length")
        active = [row for row in rows if row.choice.finish_reason is None]
        if not active:
            return
        params = active[0].request.params
        self.batches_run += 1
        self.max_rows_seen = max(self.max_rows_seen, len(active))
        if self._answer_compiled(active):
            return
        width = max(len(row.request.prompt.input_ids) for row in active)
        ids, mask = self._left_padded([row.request.prompt for row in active], width)
        pixels = [row.request.prompt.pixel_values for row in active]
        pixels = [p for p in pixels if p is not None]
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max(row.limit for row in active),
            stopping_criteria=StoppingCriteriaList([_RowTracker(self, active)]),
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            use_cache=True,
        )
        if pixels:
            dtype = next(self.model.parameters()).dtype
            kwargs["pixel_values"] = torch.cat(pixels).to(self.device, dtype)
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        tracker = kwargs["stopping_criteria"][0]
        if not params.greedy and params.seed is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(params.seed)
                self.model.generate(**kwargs)
        else:
            self.model.generate(**kwargs)
        self._close_rest(active, tracker)

    def _left_padded(self, prompts: list[Prompt], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of prompts left-padded to `width`, on the CPU."""
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p.input_ids) :] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[i, width - len(p.input_ids) :] = 1
        return ids, mask

    def _close_rest(self, active: list[_Row], tracker: _RowTracker) -> None:
        for row in active:  # out of steps: whatever is left is final
            if row.choice.finish_reason is None:
                row.close("length", row.visible(tracker.decode(row))[0].strip())

    def _answer_compiled(self, active: list[_Row]) -> bool:
        """One greedy answer about one image through the compiled path (`compile=True`), its prompt
        left-padded to a multiple of 64 tokens (each width is compiled once). False: not such a request."""
        if self.compiled is None or len(active) != 1:
            return False
        row = active[0]
        prompt = row.request.prompt
        width = -(-len(prompt.input_ids) // 64) * 64
        if not row.request.params.greedy or prompt.num_images != 1 or width + row.limit > self.context_length:
            return False
        ids, mask = self._left_padded([prompt], width)
        dtype = next(self.model.parameters()).dtype
        tracker = _RowTracker(self, active)
        self.compiled(
            ids.to(self.device),
            mask.to(self.device),
            prompt.pixel_values.to(self.device, dtype),
            row.limit,
            on_token=lambda token: bool(tracker(torch.tensor([[token]]), None)[0]),
        )
        self.compiled_answers += 1
        self._close_rest(active, tracker)
        return True


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_engine_arguments(parser: Any) -> None:
    """The options of `Engine.from_pretrained` that `gpt2mm ask` and `gpt2mm serve` share."""
    parser.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    parser.add_argument(
        "--compile",
        action="store_true",
        help="answer single greedy questions about one image through a compiled static-cache path (CUDA "
        "graphs on a GPU: ~10x lower latency); each prompt-length bucket compiles once, in under a minute",
    )


class _Row:
    """One choice being generated: its tokens so far, its stop strings, and what was already streamed."""

    def __init__(self, request: GenerationRequest, choice: Choice, limit: int, stops: tuple[str, ...]):
        self.request = request
        self.choice = choice
        self.limit = limit
        self.stops = STOP_STRINGS + stops
        self.text_ids: list[int] = []  # generated ids without the end-of-text token
        self.sent = ""  # what on_delta was given so far

    def visible(self, text: str) -> tuple[str, bool]:
        """The answer in `text` (cut at the first stop string, left-stripped) and whether a stop was hit."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut].lstrip(), True
        return text.lstrip(), False

    def safe_prefix(self, answer: str) -> str:
        """The part of an unfinished answer that later tokens cannot change: without a trailing partial
        character, trailing whitespace (stripped at the end) or a tail that may grow into a stop string."""
        answer = answer.rstrip("\ufffd")
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(answer)), 0, -1):
                if answer.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return answer[: len(answer) - hold].rstrip()

    def emit(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            delta = text[len(self.sent) :]
            self.sent = text
            if self.request.on_delta is not None:
                self.request.on_delta(self.choice.index, delta)

    def close(self, reason: str, answer: str | None = None) -> None:
        if answer is not None:
            self.emit(answer)
        self.choice.text = answer if answer is not None else self.sent
        self.choice.finish_reason = reason


class _RowTracker(StoppingCriteria):
    """Called by `generate` after each step with the whole batch: collects, streams and stops each row."""

    def __init__(self, engine: Engine, rows: list[_Row]):
        self.engine = engine
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        done = []
        for row, token in zip(self.rows, new):
            if row.choice.finish_reason is None:
                self._step(row, token)
            done.append(row.choice.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _step(self, row: _Row, token: int) -> None:
        if row.request.cancelled.is_set():
            row.close("cancelled")
            return
        row.choice.token_ids.append(token)
        if token == self.engine.eos_token_id:
            row.close("stop", row.visible(self.decode(row))[0].strip())
            return
        row.text_ids.append(token)
        answer, stopped = row.visible(self.decode(row))
        if stopped:
            row.close("stop", answer.strip())
        elif len(row.choice.token_ids) >= row.limit:
            row.close("length", answer.strip())
        else:
            row.emit(row.safe_prefix(answer))

    def decode(self, row: _Row) -> str:
        return self.engine.decode(row.text_ids)


def load_engine(model: str, device: str, dtype: str, compile: bool) -> Engine:
    """The engine `gpt2mm ask` and `gpt2mm serve` answer with: the device checked first, and a model that
    cannot be loaded a UsageError naming it (exit code 2, no traceback)."""
    from gpt2mm.errors import UsageError

    device = pick_device(device)
    try:
        return Engine.from_pretrained(model, device=device, dtype=dtype, compile=compile)
    except UsageError:
        raise  # already names what could not be loaded (gpt2mm.errors.ModelNotFoundError)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the model {model}: {e}") from e
