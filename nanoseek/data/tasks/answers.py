"""Reading a final answer out of text (R1 paper §2.2.2: the "final answer in a specified format (e.g., within a
box)"). One reader abstraction, named by a string, for model completions (rl/rewards.py reads the answer part,
after </think>) and for the gold fields of task files (jsonl.py):

    boxed          the content of the last \\boxed{...} (DeepSeekMath, R1: "put your final answer within
                   \\boxed{}"): nested braces kept (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}), `\\boxed 5` read up to
                   whitespace or $, an unclosed box -> None
    gsm8k          the number after the last `####` (GSM8K's answers), commas removed ("#### 1,234" -> 1234)
    module:fn      a user function fn(text) -> str | None, from "package.module:function" or
                   "path/to/file.py:function" (`load_function`, the loader of user reward functions too)

`answer_tag` (R1-Zero's <answer>...</answer>) is the rewards' own parser, with its stricter tag rules.
Readers scan linearly (no backtracking regex), so adversarial text costs O(length).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

ANSWER_TAG = "answer_tag"
BOXED = "\\boxed"
_BOX_TOKEN = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    """The stripped content of the last \\boxed{...} or `\\boxed 5` in text; None when there is none, it is
    empty, or its braces do not close (a truncated answer)."""
    start = text.rfind(BOXED)
    while start >= 0 and text[start + len(BOXED):start + len(BOXED) + 1].isalpha():
        start = text.rfind(BOXED, 0, start)  # `\boxedfoo` is another command: look further back
    if start < 0:
        return None
    i = start + len(BOXED)
    while i < len(text) and text[i] in " \t":
        i += 1
    if text[i:i + 1] != "{":  # `\boxed 5`, else no answer
        m = _BOX_TOKEN.match(text, i) if i > start + len(BOXED) else None
        return m.group(0) if m else None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "\\":  # \{ \} \\ and commands: the next character is no brace of the box
            j += 2
            continue
        depth += (text[j] == "{") - (text[j] == "}")
        if depth == 0:
            return text[i + 1:j].strip() or None
        j += 1
    return None


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's gold: what follows the last `####`, stripped, commas removed; None without one."""
    _, sep, tail = text.rpartition("####")
    gold = tail.strip().replace(",", "")
    return gold if sep and gold else None


READERS: dict[str, Callable[[str], str | None]] = {"boxed": last_boxed, "gsm8k": gsm8k_answer}


def reader(spec: str, others: tuple[str, ...] = ()) -> Callable[[str], str | None]:
    """A named reader (READERS) or a user "module:function" (imported once; its result must be a str or None).
    `others`: the caller's further choices, named in the error."""
    if spec in READERS:
        return READERS[spec]
    if ":" not in spec:
        choices = [*others, *READERS]
        near = difflib.get_close_matches(spec, choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"answer reader {spec!r}: not one of {choices}{hint} nor a user function "
                         f"'module:function' / 'path/to/file.py:function'")
    return _user_reader(spec)


@lru_cache(maxsize=None)
def _user_reader(spec: str) -> Callable[[str], str | None]:
    fn = load_function(spec, "answer reader")

    def read(text: str) -> str | None:
        out = fn(text)
        if out is not None and not isinstance(out, str):
            raise ValueError(f"answer reader {spec} returned {out!r} ({type(out).__name__}); it must return a "
                             f"string or None")
        return out

    return read


def check_extractor(spec: str) -> str:
    """spec, once it names a reader of completions (answer_tag or a reader); the error names the choices."""
    if spec != ANSWER_TAG:
        reader(spec, (ANSWER_TAG,))
    return spec


def load_function(spec: str, kind: str) -> Callable:
    """Import a user function from "package.module:function" or "path/to/file.py:function"; errors start with
    `kind` and the spec, and say what is missing."""
    spec = spec.strip()
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"{kind} {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{kind} {spec!r}: no such file {path}")
        name = f"nanoseek_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ValueError(f"{kind} {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                raise ValueError(f"{kind} {spec!r}: no module named {e.name!r} (is it on sys.path? "
                                 f"a file path needs the .py suffix)") from e
            raise ValueError(f"{kind} {spec!r}: importing {module_name} failed: {e}") from e
        except Exception as e:
            raise ValueError(f"{kind} {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, fn_name):
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        near = difflib.get_close_matches(fn_name, names, n=1)
        raise ValueError(f"{kind} {spec!r}: {module_name} has no {fn_name!r}"
                         f"{f' (did you mean {near[0]!r}?)' if near else ''}; callables there: {sorted(names)}")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise ValueError(f"{kind} {spec!r}: {fn_name} is not callable ({type(fn).__name__})")
    return fn
