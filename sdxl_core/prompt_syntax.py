"""compel's prompt syntax parsed into weighted fragments, blends and conjunctions; A1111's `(word:1.3)` too.

Follows compel 2.5.1 (compel/prompt_parser.py): its pyparsing grammar is read here as a recursive-descent
parser that takes the same first match at each point, so a prompt gives compel's fragments, texts and weights.

    a (red)1.3 fox++ in the snow--   fragments weighted 1.3, 1.1**2 and 0.9**2, the rest 1
    ("a cat", "a dog").blend(0.7, 0.3)   a weighted mix of two prompts' embeddings
    ("a cat", "a dog").and()            both prompts' embeddings, one after the other

`.swap()` (prompt-to-prompt) and `withLora()` / `useLora()` are compel syntax for things this project does
not do; a prompt using them is refused rather than read as compel would read it.
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SPACE = " \t\r\n"  # what pyparsing skips before each element
SYNTAX_CHARS = '()",.+-='
ATTENTION_PLUS_BASE, ATTENTION_MINUS_BASE = 1.1, 0.9  # word+ and word-, compel's PromptParser defaults
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")  # pyparsing_common.real
_INTEGER = re.compile(r"-?[0-9]+")
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")
_QUOTED = re.compile(r'"(?:\\"|[^"\n\r])*"')  # QuotedString('"', esc_quote='\\"'), one line
_WHITESPACE_ESCAPES = {"\\t": "\t", "\\n": "\n", "\\f": "\f", "\\r": "\r"}
_A1111_WEIGHT = re.compile(r":\s*(\d+\.\d*|\.\d+|\d+)\s*$")
_LORA = re.compile(r"(?:useLora|withLora)\s*\(\s*[A-Za-z0-9_-]+\s*(?:,[^)]*)?\)")


class PromptSyntaxError(ValueError):
    """A prompt compel's syntax cannot read."""


@dataclass(frozen=True)
class Fragment:
    """Text whose tokens all take one weight."""

    text: str
    weight: float = 1.0


FlattenedPrompt = tuple[Fragment, ...]


@dataclass(frozen=True)
class Blend:
    """`(...).blend(w, ...)`: the prompts' embeddings mixed by `weights`, normalized to sum 1 unless asked not to."""

    prompts: tuple[FlattenedPrompt, ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class Conjunction:
    """A whole prompt: its parts' embeddings concatenated on the token axis, each part's weighted against ""."""

    prompts: tuple[FlattenedPrompt | Blend, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class _Attention:
    weight: float
    children: tuple


def parse_prompt(prompt: str) -> Conjunction:
    """compel's `Compel.parse_prompt_string`, after rewriting A1111's `(text:1.3)` to compel's `(text)1.3`."""
    text = re.sub(r",(\S)", r", \1", a1111_to_compel(prompt))  # compel puts a space after every comma
    if not text.strip():
        return Conjunction(((Fragment(""),),), (1.0,))
    try:
        parts, weights = _Parser(text).parse()
        flattened = [(_flatten_part(part), weight) for part, weight in zip(parts, weights)]
    except RecursionError:
        raise PromptSyntaxError("the prompt nests parentheses or quotes too deeply") from None
    kept = [(part, weight) for part, weight in flattened if part]
    if not kept:  # compel fails on a prompt of empty groups, e.g. "()"; it reads as "" here
        return Conjunction(((Fragment(""),),), (1.0,))
    return Conjunction(tuple(part for part, _ in kept), tuple(weight for _, weight in kept))


def a1111_to_compel(prompt: str) -> str:
    """`(text:1.3)` -> `(text)1.3`, nested groups too; other parentheses and escaped ones as they are."""
    out: list[str] = []  # one character each
    opened: list[int] = []
    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt):
            out += prompt[i : i + 2]
            i += 2
            continue
        if c == "(":
            opened.append(len(out))
        elif c == ")" and opened:
            tail = "".join(out[max(opened.pop() + 1, len(out) - 64) :])  # a weight is a few characters
            if weight := _A1111_WEIGHT.search(tail):
                del out[len(out) - len(tail) + weight.start() :]
                out += ")" + weight[1]
                i += 1
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _flatten_part(part) -> FlattenedPrompt | Blend | None:
    if isinstance(part, Blend):
        return part
    return _fused(_flatten(part, 1.0)) or None


def _flatten(items, scale: float) -> list[Fragment]:
    """Nested weights multiplied down to each fragment (compel's PromptParser.flatten). compel unescapes a
    fragment's text each time it makes one, here too: when parsed, when flattened and when fused."""
    out = []
    for item in items:
        if isinstance(item, _Attention):
            out += _flatten(item.children, scale * item.weight)
        else:
            out.append(Fragment(_unescape(item.text), item.weight * scale))
    return out


def _fused(fragments: list[Fragment]) -> FlattenedPrompt:
    """Neighbours of equal weight joined by a space (compel's fuse_fragments)."""
    fused: list[Fragment] = []
    for f in fragments:
        if fused and fused[-1].weight == f.weight:
            fused[-1] = Fragment(_unescape(fused[-1].text + " " + f.text), f.weight)
        else:
            fused.append(f)
    return tuple(fused)


def _memoized(method):
    """One result per position (and arguments): the grammar tries an element at one place several times, which
    unmemoized costs exponential time in nested parentheses (pyparsing's packrat cache does the same)."""
    def at(self, i: int, *args):
        key = (method.__name__, i, *args)
        if key not in self.memo:
            self.memo[key] = method(self, i, *args)
        return self.memo[key]
    return at


def _unescape(text: str) -> str:
    return text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


class _Parser:
    """compel's grammar (build_parser_syntax) over one string. Each method takes a position and returns
    (value, position after) or None where the element does not match there; pyparsing's whitespace skipping
    before elements is `self.skip`."""

    def __init__(self, text: str):
        self.s = text
        self.memo: dict[tuple, object] = {}

    def parse(self) -> tuple[list, list[float]]:
        """The conjunction's parts (lists of items, or a Blend) and their weights."""
        if (found := self.operator_call(0, (".and", ".add"))) is not None:
            (targets, options), end = found
            if rest := self.s[end:].strip():
                logger.warning("compel ignores the text after `.and()`, so does this parse: %r", rest)
            return targets, _conjunction_weights(options, len(targets))
        self.refuse_unsupported(0)
        if (found := self.operator_call(0, (".blend",))) is not None:
            (targets, options), end = found
            if self.s[end:].strip():
                raise PromptSyntaxError(f"a `.blend()` must be the whole prompt; remove {self.s[end:].strip()!r}")
            blend = _blend([_fused(_flatten(t, 1.0)) for t in targets], options)
            return [blend], [1.0]
        return [self.prompt(0)[0]], [1.0]

    # --- terminals -------------------------------------------------------------------------

    def skip(self, i: int) -> int:
        while i < len(self.s) and self.s[i] in SPACE:
            i += 1
        return i

    def literal(self, i: int, text: str) -> int | None:
        i = self.skip(i)
        return i + len(text) if self.s.startswith(text, i) else None

    def number(self, i: int):
        i = self.skip(i)
        match = _REAL.match(self.s, i) or _INTEGER.match(self.s, i)
        return (float(match[0]), match.end()) if match else None

    def weight(self, i: int):
        """`+`s, `-`s or a number (compel's attention_weight_operator: a run of signs wins over "-0.5")."""
        i = self.skip(i)
        for sign, base in (("+", ATTENTION_PLUS_BASE), ("-", ATTENTION_MINUS_BASE)):
            end = i
            while end < len(self.s) and self.s[end] == sign:
                end += 1
            if end > i:
                return pow(base, end - i), end
        return self.number(i)

    @_memoized
    def non_syntax_word(self, i: int):
        """Text free of `()",.+-=` but escaped ones, and `+` / `-` followed by such text."""
        i = end = self.skip(i)
        s = self.s
        while end < len(s):
            if s[end] == "\\" and end + 1 < len(s) and s[end + 1] in SYNTAX_CHARS:
                end += 2
            elif s[end] not in string.whitespace + SYNTAX_CHARS or (
                    s[end] in "+-" and end + 1 < len(s) and s[end + 1] not in SPACE + SYNTAX_CHARS):
                end += 1
            else:
                break
        return (Fragment(_unescape(s[i:end])), end) if end > i else None

    def free_word(self, i: int):
        i = end = self.skip(i)
        while end < len(self.s) and self.s[end] not in string.whitespace:
            end += 1
        return (Fragment(_unescape(self.s[i:end])), end) if end > i else None

    def quoted(self, i: int):
        """A double-quoted string's content, unquoted as pyparsing's QuotedString does."""
        i = self.skip(i)
        match = _QUOTED.match(self.s, i)
        if not match:
            return None
        content = re.sub(r"\\[tnfr]", lambda m: _WHITESPACE_ESCAPES[m[0]], match[0][1:-1])
        return content.replace('\\"', '"'), match.end()

    # --- fragments ---------------------------------------------------------------------------

    @_memoized
    def quoted_fragment(self, i: int, grammar=None):
        """A quoted string parsed whole as `grammar` (default: a fragment, which may hold commas and periods)."""
        found = self.quoted(i)
        if found is None:
            return None
        content, end = found
        if not content.strip():
            return [Fragment("")], end
        inner = _Parser(content.replace('"', '\\"'))
        items, inner_end = (grammar or _Parser.fragment)(inner, 0)
        if inner.skip(inner_end) != len(inner.s):
            return None
        return items, end

    @_memoized
    def parenthesized(self, i: int):
        start = self.literal(i, "(")
        if start is None:
            return None
        items, end = self.fragment(start)
        end = self.literal(end, ")")
        return (items, end) if end is not None else None

    @_memoized
    def fragment(self, i: int) -> tuple[list, int]:
        """compel's fragment_including_commas_or_periods: as many parts as match, each a list of items."""
        items = []
        while True:
            self.refuse_unsupported(i)
            found = (self.attention(i) or self.parenthesized(i) or self.quoted_fragment(i)
                     or self.one(self.non_syntax_word(i)) or self.punctuation(i))
            if found is None:
                return items, i
            part, i = found
            items += part

    def one(self, found):
        return None if found is None else ([found[0]], found[1])

    def punctuation(self, i: int):
        i = self.skip(i)
        return ([Fragment(self.s[i])], i + 1) if i < len(self.s) and self.s[i] in ",." else None

    @_memoized
    def operator_target(self, i: int):
        """A quoted or parenthesized fragment, or a bare word: what an operator such as `.blend` applies to."""
        return self.quoted_fragment(i) or self.parenthesized(i) or self.one(self.non_syntax_word(i))

    @_memoized
    def attention(self, i: int):
        """`(text).attend(w)`, `(text)w`, `"text"w`, `(text)++`, `word--`: the text's weight multiplied."""
        if (target := self.operator_target(i)) is not None:
            items, end = target
            end = self.literal(end, ".attend")
            end = end and self.literal(end, "(")
            found = end and self.weight(end)
            if found and (close := self.literal(found[1], ")")) is not None:
                return [_Attention(found[0], tuple(items))], close
        for target, signs_only in ((self.quoted_fragment(i) or self.parenthesized(i), False),
                                   (self.one(self.non_syntax_word(i)), True)):
            if target is None:
                continue
            items, end = target
            if (end < len(self.s) and self.s[end] not in SPACE and (not signs_only or self.s[end] in "+-")
                    and (found := self.weight(end)) is not None):
                return [_Attention(found[0], tuple(items))], found[1]
        return None

    def prompt(self, i: int) -> tuple[list, int]:
        """compel's top-level prompt: the structured parts where they match, any other run of non-space as text."""
        items = []
        while (i := self.skip(i)) < len(self.s):
            if self.s[i] in string.whitespace:
                i += 1
                continue
            self.refuse_unsupported(i)
            part, i = (self.attention(i) or self.quoted_fragment(i) or self.parenthesized(i)
                       or self.one(self.free_word(i)))
            items += part
        return items, i

    # --- operators ---------------------------------------------------------------------------

    def operator_call(self, i: int, names: tuple[str, ...]):
        """`(target, ...).name(options)`: ((targets, options), end), each target a list of items."""
        end, targets = self.literal(i, "("), []
        while end is not None:
            target = self.operator_target(end) or self.quoted_fragment(end, _Parser.prompt)
            if target is None:
                return None
            targets.append(target[0])
            end = target[1]
            if (comma := self.literal(end, ",")) is None:
                break
            end = comma
        end = end and self.literal(end, ")")
        end = end and next((e for name in names if (e := self.literal(end, name)) is not None), None)
        end = end and self.literal(end, "(")
        if end is None:
            return None
        options, end = self.options(end)
        end = self.literal(end, ")")
        return ((targets, options), end) if end is not None else None

    def options(self, i: int) -> tuple[list[str], int]:
        """Comma-separated `key=value`s, numbers or keywords: each one's first token (compel reads weights so)."""
        options, end = [], i
        found = self.option(end)
        while found is not None:
            options.append(found[0])
            end = found[1]
            comma = self.literal(end, ",")
            found = None if comma is None else self.option(comma)
        return options, end

    def option(self, i: int):
        i = self.skip(i)
        key = _KEYWORD.match(self.s, i)
        if key and (equals := self.literal(key.end(), "=")) is not None:
            value = self.number(equals) or self.keyword(equals)
            if value is not None:
                return key[0], value[1]
        if (number := self.number(i)) is not None:
            return str(number[0]), number[1]
        return (key[0], key.end()) if key else None

    def keyword(self, i: int):
        match = _KEYWORD.match(self.s, self.skip(i))
        return (match[0], match.end()) if match else None

    def refuse_unsupported(self, i: int) -> None:
        """PromptSyntaxError where compel would read `.swap()` or `withLora()` / `useLora()`."""
        if _LORA.match(self.s, self.skip(i)):
            raise PromptSyntaxError("compel's `withLora()` / `useLora()` is not supported in prompts")
        target = self.operator_target(i)
        if target is not None and self.literal(target[1], ".swap") is not None:
            raise PromptSyntaxError("compel's `.swap()` (prompt-to-prompt cross-attention control) is not supported")


def _floats(options: list[str], what: str) -> list[float]:
    try:
        return [float(o) for o in options]
    except ValueError:
        raise PromptSyntaxError(f"{what} weights must be numbers, got {options}") from None


def _blend(prompts: list[FlattenedPrompt], options: list[str]) -> Blend:
    normalize = not (options and options[-1] == "no_normalize")
    weights = _floats(options[:-1] if not normalize else options, "`.blend()`") or [1.0] * len(prompts)
    if len(weights) != len(prompts) or not all(prompts):
        raise PromptSyntaxError(f"`.blend()` of {len(prompts)} prompts needs as many weights, got {weights}")
    return Blend(tuple(prompts), tuple(weights), normalize)


def _conjunction_weights(options: list[str], count: int) -> list[float]:
    weights = _floats(options, "`.and()`") or [1.0] * count
    if len(weights) != count:
        raise PromptSyntaxError(f"`.and()` of {count} prompts needs as many weights, got {weights}")
    return weights
