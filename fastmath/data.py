"""Rows in, tokenised documents out: loading, validation, chat templating and loss masks.

Sources: a local .jsonl / .json / .parquet file, or a Hugging Face dataset id (via `datasets`).
Row formats:
  * prompt/solution: `{prompt_field: str, solution_field: str}`. The prompt (after the user prefix) goes
    through the chat template with the generation prompt; the solution is appended verbatim followed by
    the tokenizer's eos token. Appending (rather than templating the assistant turn) keeps the reasoning
    intact: some templates (DeepSeek-R1-Distill's) strip everything before `</think>` from assistant
    turns, which would silently delete the very traces SFT is meant to teach.
  * chat: `{messages_field: [{"role": ..., "content": ...}, ...]}`; every assistant turn carries loss,
    located by templating each prefix (the template must render prefixes as prefixes; checked). A
    conversation is usable when it is a non-empty list of objects with string `role` and `content`, the
    roles are system / user / assistant (system only first), a user turn comes before the first assistant
    turn, no assistant turn is empty, and the last turn is the assistant's (nothing after it to learn).
    A row the chat template refuses (its own checks, e.g. roles that must alternate) is skipped with the
    template's message as the reason.

Chat template and reasoning prefill (the same in every stage):
  * The template is `data.chat_template`: 'model' keeps the tokenizer's own, a name picks a template shipped in
    fastmath/chat_templates/ (`fast_math_r1_sft`, the seed's SFT template), anything else is a .jinja file. It is
    set on the tokenizer, so the stage's export saves it and the next stage (GRPO, eval) renders with it.
  * Reasoning prefill: some generation prompts already open the reasoning block (DeepSeek-R1-Distill's ends
    with `<think>\n`). Detected by rendering a prompt: it ends with `<think>` and whitespace at most
    (`data.reasoning_prefill`: auto = detect, yes = require it, no = ignore it). That opening,
    `Formatter.reasoning_prefix`, is then part of every prompt, so (1) SFT drops a solution's own leading
    `<think>` (and the whitespace after it): the trained text holds exactly one; (2) a sampled completion
    never holds it, so the rewards, the answer extraction and the eval judge `Formatter.judged(completion)`
    = the prefix + the completion, never the completion alone.
  * BOS (`data.bos`): 'tokenizer' puts the tokenizer's BOS token before every templated prompt when its own
    config adds one on encode (`tokenizer_adds_bos`; R1-Distill's does, Qwen's define none) and the rendered
    template does not already start with it (R1-Distill's own template renders `{{bos_token}}`): one BOS, as the
    seed's SFTTrainer and vLLM text prompts got. 'never' adds none.
  * Pad-token loss (`data.mask_pad_tokens`, SFT): no loss on any token equal to the pad token, as the seed's
    collator (labels = ids, pad ids -> -100) did; with R1-Distill's pad = eos that masks every eos.
  * System prompt and user prefix: per stage (`prompt_settings`): SFT and the held-out check use
    `data.system_prompt` / `data.user_prefix`; GRPO and eval use `grpo.rollout.*` / `eval.*`, null = data's. The user
    prefix is put before the problem in the user turn of prompt rows (chat rows are used as written).

Bad rows are skipped and counted by reason (never silently); a source with zero usable rows, or a
missing file, raises `DataError` naming it.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fastmath.errors import ConfigError, DataError, first_line


@dataclass
class Document:
    input_ids: list[int]
    loss_mask: list[bool]


@dataclass
class DataReport:
    """What happened to the rows of one source."""

    source: str
    rows: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"data {self.source}: {self.used} of {self.rows} rows used"
        if self.truncated:
            text += f", {self.truncated} truncated to max_length"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            text += f"; skipped: {reasons}"
        return text


# ---------------------------------------------------------------------------------------------
# Reading rows


def local_data_path(source: str) -> Path | None:
    """The local file a data setting names (by its suffix, a leading '.', '/' or '~', or because it exists),
    or None for an HF dataset id. Also used by the early path check (fastmath/preflight.py)."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists() or source.startswith((".", "/", "~")):
        return path
    return None


def read_rows(source: str, split: str, report: DataReport) -> Iterator[dict]:
    """Yield raw rows; unreadable lines are counted in `report.skipped`, not raised."""
    path = local_data_path(source)
    if path is not None:
        if path.is_dir():
            raise DataError(f"data source {path} is a folder, not a data file (.jsonl, .json or .parquet)")
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        if path.suffix == ".parquet":
            yield from _read_parquet(path, report)
        elif path.suffix == ".json" and _looks_like_json_array(path):
            yield from _read_json_array(path, report)
        else:
            yield from _read_jsonl(path, report)
    else:
        yield from _read_hub(source, split, report)


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as err:  # permission denied, a broken link, a device that went away
        raise DataError(f"data file {path} cannot be read: {err.strerror or first_line(err)}") from None


# A JSON-lines row larger than this is skipped unread (counted): parsing it would hold it several times over in
# memory, and no usable example is that long (data.max_length tokens are a few hundred KiB of text).
MAX_ROW_BYTES = 16 << 20
UTF8_BOM = b"\xef\xbb\xbf"


class JsonNumber(str):
    """A JSON number as the text the file wrote (`1e23`, `0.1`, `12345678901234567890`): gold answers are judged
    as written, with no detour through a float. Not a string field's value (`text_field` refuses it)."""


def parse_json(text: str):
    """json.loads, keeping every number as its source text (a JsonNumber) and bounded in nesting by Python's
    recursion limit (RecursionError for a deeper document)."""
    return json.loads(text, parse_int=JsonNumber, parse_float=JsonNumber, parse_constant=JsonNumber)


def _bounded_lines(handle) -> Iterator[bytes | None]:
    """The file's lines, each read at most MAX_ROW_BYTES at a time; None for a line longer than that (skipped
    to its end without holding it)."""
    first = True
    while raw := handle.readline(MAX_ROW_BYTES + 1):
        if first and raw.startswith(UTF8_BOM):  # a UTF-8 byte-order mark, as some editors write
            raw = raw[len(UTF8_BOM):]
        first = False
        if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
            while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def _read_jsonl(path: Path, report: DataReport) -> Iterator[dict]:
    with _open(path) as handle:
        for raw in _bounded_lines(handle):
            if raw is None:
                report.rows += 1
                report.skipped[f"row larger than {MAX_ROW_BYTES >> 20} MiB"] += 1
                continue
            if not raw.strip():
                continue
            report.rows += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.skipped["not UTF-8"] += 1
                continue
            try:
                row = parse_json(text)
            except json.JSONDecodeError:
                report.skipped["not valid JSON"] += 1
                continue
            except RecursionError:
                report.skipped["nested too deeply"] += 1
                continue
            if not isinstance(row, dict):
                report.skipped["not a JSON object"] += 1
                continue
            yield row


def _looks_like_json_array(path: Path) -> bool:
    with _open(path) as handle:
        return handle.read(64).removeprefix(UTF8_BOM).lstrip().startswith(b"[")


def _read_json_array(path: Path, report: DataReport) -> Iterator[dict]:
    with _open(path) as handle:
        raw = handle.read()
    try:
        rows = parse_json(raw.removeprefix(UTF8_BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"data file {path} is not a readable JSON array: {first_line(err)[:200]}") from None
    except RecursionError:
        raise DataError(f"data file {path} is nested too deeply to read as a JSON array") from None
    for row in rows:
        report.rows += 1
        if isinstance(row, dict):
            yield row
        else:
            report.skipped["not a JSON object"] += 1


def _read_parquet(path: Path, report: DataReport) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"data file {path} is not a readable parquet file: {err}") from None
    for row in table.to_pylist():
        report.rows += 1
        yield row


def _read_hub(name: str, split: str, report: DataReport) -> Iterator[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, auth, missing split: all end here with the cause
        raise DataError(f"could not load dataset '{name}' (split '{split}'): {first_line(err)}") from None
    for row in dataset:
        report.rows += 1
        yield row


# ---------------------------------------------------------------------------------------------
# Chat templates and the reasoning prefill

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")
REASONING_OPEN = "<think>"
PREFILL_RULES = ("auto", "yes", "no")


def shipped_templates() -> list[str]:
    """Names of the chat templates shipped with fastmath (fastmath/chat_templates/<name>.jinja)."""
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.jinja"))


def chat_template_text(setting: str) -> str | None:
    """The template a `data.chat_template` setting names: None for 'model' (keep the tokenizer's own), else the
    text of a shipped template (by name) or of a .jinja file (by path)."""
    if setting == "model":
        return None
    if "/" not in setting and (TEMPLATE_DIR / f"{setting}.jinja").is_file():
        return (TEMPLATE_DIR / f"{setting}.jinja").read_text(encoding="utf-8")
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'data.chat_template': {setting!r} is not 'model', a shipped template "
                          f"({', '.join(shipped_templates())}) or a template file")
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ConfigError(f"config key 'data.chat_template': {path} is larger than {MAX_TEMPLATE_BYTES >> 20} MiB, "
                              f"which no chat template is")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config key 'data.chat_template': cannot read {path}: {first_line(err)}") from None


def reasoning_prefix(rendered_prompt: str, rule: str = "auto") -> str:
    """The opening of the reasoning block a rendered generation prompt ends with (from its last `<think>` to the
    end, when only whitespace follows that tag), or ''. rule 'no' ignores it; 'yes' requires it."""
    at = rendered_prompt.rfind(REASONING_OPEN)
    opens = at >= 0 and not rendered_prompt[at + len(REASONING_OPEN):].strip()
    if rule == "yes" and not opens:
        raise ConfigError(f"data.reasoning_prefill=yes, but the chat template's generation prompt does not end "
                          f"by opening {REASONING_OPEN} (it ends with {rendered_prompt[-40:]!r})")
    return rendered_prompt[at:] if opens and rule != "no" else ""


def without_reasoning_open(solution: str) -> str:
    """A solution that opens its own reasoning block, with that `<think>` and the whitespace after it removed (the
    prompt supplies them); any other solution unchanged."""
    body = solution.lstrip()
    if body.startswith(REASONING_OPEN):
        return body[len(REASONING_OPEN):].lstrip()
    return solution


def prompt_settings(config, stage: str) -> dict:
    """The Formatter keywords of a stage: the run's template and prefill rule with the stage's system prompt and
    user prefix ('sft' and 'heldout': data.*; 'grpo' and 'eval': grpo.rollout.* and eval.*, where null means data's)."""
    d = config.data
    system, prefix = d.system_prompt, d.user_prefix
    if stage in ("grpo", "eval"):
        own = config.grpo.rollout if stage == "grpo" else config.eval
        system = d.system_prompt if own.system_prompt is None else own.system_prompt
        prefix = d.user_prefix if own.user_prefix is None else own.user_prefix
    return {"system_prompt": system, "user_prefix": prefix, "chat_template": d.chat_template,
            "reasoning_prefill": d.reasoning_prefill, "bos": d.bos}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own config puts a BOS token before encoded text (R1-Distill's add_bos_token: true;
    Qwen2.5 / Qwen3 define none): what a trainer that encodes rendered text with special tokens gets, as the seed's
    SFTTrainer and vLLM's text prompts did."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    plain = tokenizer("1", add_special_tokens=False)["input_ids"]
    special = tokenizer("1", add_special_tokens=True)["input_ids"]
    return special[:1] == [bos] and plain[:1] != [bos]


# ---------------------------------------------------------------------------------------------
# Rows to documents


CHAT_ROLES = ("system", "user", "assistant")


class TemplateRefused(DataError):
    """The tokenizer's chat template raised on a conversation (its own checks, or transformers'). Counted as
    a skip where rows are templated; an error naming the cause where a single prompt is."""

    def __init__(self, detail: str):
        super().__init__(f"the chat template refused a conversation: {detail}")
        self.detail = detail


PROBE_PROBLEM = "What is 12 + 34?"
# A rendered probe prompt longer than this is a template gone wrong (real ones add a few hundred characters). The
# sandbox transformers renders templates in bounds `range` but not string repetition, so a template can still
# allocate much more before this check sees the result.
MAX_PROBE_CHARS = 100_000
# A chat template file larger than this is not a chat template (the largest in TRL's collection is ~10 KiB).
MAX_TEMPLATE_BYTES = 1 << 20
# A row whose text has more characters than CHARS_PER_TOKEN_BOUND x data.max_length is not tokenised: tokenising
# costs memory in proportion to the text (over 10 GB for one 50 MB row), and at that length the row is longer
# than max_length for any tokenizer that averages fewer characters per token (real ones average 3-5).
CHARS_PER_TOKEN_BOUND = 32


def _squeezed(text: str) -> str:
    return "".join(text.split()).lower()


def special_token_texts(tokenizer) -> list[str]:
    """The texts of a tokenizer's special tokens (the ones it matches inside ordinary text), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token.content))
    return sorted((t for t in texts if t), key=len, reverse=True)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and not isinstance(value, JsonNumber)


def conversation_problem(messages: object, field_name: str) -> str | None:
    """Why a chat row cannot be trained on (the skip reason), or None when it can (rules: module doc)."""
    if not isinstance(messages, list) or not messages:
        return f"field '{field_name}' is not a non-empty list of messages"
    if not all(isinstance(m, dict) and _is_text(m.get("role")) and _is_text(m.get("content")) for m in messages):
        return f"a message in '{field_name}' is not an object with string 'role' and 'content'"
    roles = [m["role"] for m in messages]
    unknown = [r for r in roles if r not in CHAT_ROLES]
    if unknown:
        return f"unknown role '{unknown[0][:20]}' in '{field_name}' (expected {', '.join(CHAT_ROLES)})"
    if "system" in roles[1:]:
        return "a system message after the first turn"
    if "assistant" not in roles:
        return "no assistant message"
    if "user" not in roles[:roles.index("assistant")]:
        return "no user message before the first assistant message"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        return "an empty assistant message"
    if roles[-1] != "assistant":
        return "the last message is not the assistant's"
    return None


@dataclass
class Formatter:
    """Turns validated rows into token ids and loss masks with one tokenizer and one policy.

    A `chat_template` other than 'model' is set on the tokenizer itself (so an export of it saves the template);
    `reasoning_prefix` is what the generation prompt pre-fills of the reasoning block (module docstring)."""

    tokenizer: object
    prompt_field: str = "problem"
    solution_field: str = "solution"
    messages_field: str = ""
    system_prompt: str = ""
    max_length: int = 1024
    overlong: str = "drop"
    loss_on: str = "completion"
    user_prefix: str = ""
    chat_template: str = "model"
    reasoning_prefill: str = "auto"
    bos: str = "tokenizer"
    mask_pad_tokens: bool = False
    reasoning_prefix: str = field(init=False, default="")
    special_texts: list[str] = field(init=False, default_factory=list)
    bos_id: int | None = field(init=False, default=None)

    def __post_init__(self):
        template = chat_template_text(self.chat_template)
        if template is not None:
            self.tokenizer.chat_template = template
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; use a model whose tokenizer defines one, or set "
                            "data.chat_template")
        if self.tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; it is needed to end each completion")
        if self.bos not in ("tokenizer", "never"):
            raise ConfigError(f"bos must be 'tokenizer' or 'never', got {self.bos!r}")
        if self.bos == "tokenizer" and tokenizer_adds_bos(self.tokenizer):
            self.bos_id = self.tokenizer.bos_token_id
        if self.reasoning_prefill not in PREFILL_RULES:
            raise ConfigError(f"reasoning_prefill must be one of {list(PREFILL_RULES)}, got {self.reasoning_prefill!r}")
        self.reasoning_prefix = reasoning_prefix(self._render(self.prompt_messages("1 + 1 = ?"), True),
                                                 self.reasoning_prefill)
        self._probe()
        self.special_texts = special_token_texts(self.tokenizer)

    def _probe(self) -> None:
        """Stop on a template or tokenizer that would train on something else than the rows: a probe prompt must
        render with the problem text and the system prompt, and survive tokenising and decoding."""
        rendered = self._render(self.prompt_messages(PROBE_PROBLEM), True)
        shown = rendered if len(rendered) <= 160 else rendered[:160] + "..."
        if len(rendered) > MAX_PROBE_CHARS:
            raise DataError(f"the chat template renders a one-line probe prompt as {len(rendered)} characters (more "
                            f"than {MAX_PROBE_CHARS}); it would add that much to every row (data.chat_template)")
        if PROBE_PROBLEM not in rendered:
            raise DataError(f"the chat template does not show the problem: the probe problem {PROBE_PROBLEM!r} renders "
                            f"as {shown!r}; a template must render the messages it is given (data.chat_template)")
        if self.system_prompt and self.system_prompt not in rendered:
            raise DataError(f"the chat template does not show the system prompt: with {self.system_prompt[:60]!r} "
                            f"the probe renders as {shown!r} (data.chat_template)")
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        decoded = self.tokenizer.decode(ids)
        if _squeezed(PROBE_PROBLEM) not in _squeezed(decoded):
            raise DataError(f"the tokenizer loses text: the probe prompt becomes {len(ids)} tokens that decode to "
                            f"{decoded[:80]!r} (a model folder without tokenizer.json loads a tokenizer that knows "
                            f"almost nothing; its vocabulary has {len(self.tokenizer)} tokens)")

    def skipped_for_special_tokens(self, report: DataReport, *texts: str) -> bool:
        """Count the row as skipped when one of `texts` holds a special token (see special_token_in)."""
        special = next(filter(None, map(self.special_token_in, texts)), None)
        if special:
            report.skipped[f"text holds the special token {special!r}"] += 1
        return special is not None

    def special_token_in(self, text: str) -> str | None:
        """The first special token (as text) that `text` holds: the tokenizer would turn it into the real control
        token (an end of turn inside a solution), so such a row is skipped and counted, never trained on."""
        return next((token for token in self.special_texts if token in text), None)

    def prompt_messages(self, prompt: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": self.user_prefix + prompt}]

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._template(self.prompt_messages(prompt), add_generation_prompt=True)

    def judged(self, completion: str) -> str:
        """What rewards, answer extraction and the eval judge: the pre-filled opening plus the sampled text."""
        return self.reasoning_prefix + completion

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja's TemplateError from the template's own checks, and kin
            raise TemplateRefused(first_line(err)[:120]) from None

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        # transformers 5 returns a BatchEncoding for tokenize=True; render text and tokenise it ourselves.
        text = self._render(messages, add_generation_prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_id is not None and ids[:1] != [self.bos_id]:  # a template that renders BOS keeps its one
            ids = [self.bos_id] + ids
        return ids

    def document(self, row: dict, report: DataReport) -> Document | None:
        """One row -> Document, or None with the reason counted in `report`."""
        try:
            if self.messages_field:
                pieces = self._chat_pieces(row, report)
            else:
                pieces = self._prompt_solution_pieces(row, report)
        except TemplateRefused as err:
            report.skipped[f"chat template refused the row: {err.detail}"] += 1
            return None
        if pieces is None:
            return None
        ids: list[int] = []
        mask: list[bool] = []
        for piece_ids, carries_loss in pieces:
            ids.extend(piece_ids)
            mask.extend([carries_loss or self.loss_on == "all"] * len(piece_ids))
        if self.mask_pad_tokens and self.tokenizer.pad_token_id is not None:
            pad = self.tokenizer.pad_token_id
            mask = [m and t != pad for t, m in zip(ids, mask)]
        if len(ids) > self.max_length:
            if self.overlong == "drop":
                report.skipped["longer than max_length"] += 1
                return None
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            report.truncated += 1
        if sum(mask[1:]) == 0:
            report.skipped["no completion tokens within max_length"] += 1
            return None
        return Document(ids, mask)

    def _prompt_solution_pieces(self, row: dict, report: DataReport):
        prompt = text_field(row, self.prompt_field, report)
        solution = text_field(row, self.solution_field, report) if prompt is not None else None
        if prompt is None or solution is None:
            return None
        if self.skipped_for_special_tokens(report, prompt, solution):
            return None
        bound = CHARS_PER_TOKEN_BOUND * self.max_length
        if len(prompt) + len(solution) > bound:
            if self.overlong == "drop" or len(prompt) >= bound:
                report.skipped[f"text longer than {bound} characters (32 x max_length), not tokenised"] += 1
                return None
            solution = solution[: bound - len(prompt)]  # past max_length tokens anyway; truncated below
        if self.reasoning_prefix:  # the prompt opens the reasoning block: one <think> in the trained text
            solution = without_reasoning_open(solution)
        completion = self.tokenizer(solution, add_special_tokens=False)["input_ids"]
        return [(self.prompt_ids(prompt), False), (completion + [self.tokenizer.eos_token_id], True)]

    def _chat_pieces(self, row: dict, report: DataReport):
        messages = row.get(self.messages_field)
        if messages is None:
            report.skipped[f"missing field '{self.messages_field}'"] += 1
            return None
        problem = conversation_problem(messages, self.messages_field)
        if problem is not None:
            report.skipped[problem] += 1
            return None
        if self.skipped_for_special_tokens(report, *(m["content"] for m in messages)):
            return None
        if len(messages) > self.max_length:  # each renders to a token at least; and each assistant turn costs
            # two renders of the prefix before it, so the turns bound the (quadratic) work too
            report.skipped["more messages than max_length, not tokenised"] += 1
            return None
        bound = CHARS_PER_TOKEN_BOUND * self.max_length
        if sum(len(m["content"]) for m in messages) > bound:
            report.skipped[f"text longer than {bound} characters (32 x max_length), not tokenised"] += 1
            return None
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if self.reasoning_prefix:
            messages = [dict(m, content=without_reasoning_open(m["content"])) if m["role"] == "assistant" else m
                        for m in messages]
        # Each assistant turn below renders its whole prefix twice (quadratic in the turns): an overlong row is found
        # with one render first, and under truncation the turns past max_length tokens are not rendered at all.
        if self.overlong == "drop" and len(self._template(messages, add_generation_prompt=False)) > self.max_length:
            report.skipped["longer than max_length"] += 1
            return None
        # `done` holds the tokens emitted so far; each assistant turn must extend it exactly.
        pieces, done = [], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if len(done) >= self.max_length:  # what follows is cut off by the truncation anyway
                break
            before = self._template(messages[:i], add_generation_prompt=True)
            through = self._template(messages[: i + 1], add_generation_prompt=False)
            if before[: len(done)] != done or through[: len(before)] != before:
                raise DataError("the chat template does not render conversation prefixes as token prefixes "
                                "(it rewrites earlier turns); use the prompt/solution format "
                                "(data.messages_field='') for this model")
            pieces.append((before[len(done):], False))
            pieces.append((through[len(before):], True))
            done = through
        return pieces


def text_field(row: dict, name: str, report: DataReport) -> str | None:
    if name not in row or row[name] is None:
        report.skipped[f"missing field '{name}'"] += 1
        return None
    value = row[name]
    if not isinstance(value, str) or isinstance(value, JsonNumber):
        report.skipped[f"field '{name}' is not a string"] += 1
        return None
    if not value.strip():
        report.skipped[f"empty field '{name}'"] += 1
        return None
    return value


def load_documents(source: str, split: str, formatter: Formatter, max_rows: int = 0,
                   progress: bool = False) -> tuple[list[Document], DataReport]:
    """Read and tokenise every row of a source; raises DataError if none is usable."""
    from tqdm import tqdm

    report = DataReport(source=source if split in ("", "train") else f"{source} [{split}]")
    docs: list[Document] = []
    rows = read_rows(source, split, report)
    for row in tqdm(rows, desc=f"tokenising {Path(source).name}", disable=not progress, leave=False):
        doc = formatter.document(row, report)
        if doc is not None:
            docs.append(doc)
            report.used += 1
            if max_rows and report.used >= max_rows:
                break
    if not docs:
        detail = f" ({report.summary()})" if report.rows else ""
        raise DataError(f"no usable rows in {source}{detail}")
    return docs, report
