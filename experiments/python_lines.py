"""The task of ``reinforce.py``: finish a line of Python so that it parses.

A prompt is a window of the token stream (``text_corpus.py``) that ends inside a line of
code: the lines before it and the line's beginning (its *head*). The model writes tokens
until one of them holds a line break (or is the end-of-text token); the line it completed,
the head followed by the completion's text up to the break, earns

    reward = 1  if the line is valid Python (:func:`is_python_line`) and the completion
                ended it within the allowed tokens,
    reward = 0  otherwise.

A line is *valid Python* when, stripped of its indentation, ``ast.parse`` accepts it alone
(``x = f(a, b)``, ``return x``, ``import os``, ``# a comment``) or as the header of a block
whose body is ``pass`` (``def f(x):``, ``for i in range(3):  # count``). Clauses that need
the block before them (``else:``, ``except E:``), decorators and lines that open a bracket
closed on a later line are not valid alone. Only the syntax is checked (``return`` outside
a function is valid): nothing runs.

Prompts are cut from lines that are valid as the file has them, at a token boundary where the
head is not valid by itself, so every prompt has a completion earning 1 (the file's own) and
none where stopping at once does. :func:`cut_prompts` draws them, reproducibly from a seed.
"""

from __future__ import annotations

import ast
import dataclasses
import warnings

import numpy as np

LINE_BREAK = "\n"


def is_python_line(line: str) -> bool:
    """Whether ``line`` parses as Python alone or as a block's header followed by ``pass``
    (see the module's docstring). Blank lines are not valid."""
    code = line.strip()
    if not code:
        return False
    for source in (code, code + LINE_BREAK + " pass"):
        try:
            with warnings.catch_warnings():  # "invalid escape sequence" and the like
                warnings.simplefilter("ignore")
                ast.parse(source)
            return True
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
    return False


def completed_line(head: str, completion: str) -> str:
    """The line that ``completion`` (decoded text) makes of ``head``: up to its first break."""
    return head + completion.split(LINE_BREAK, 1)[0]


def line_reward(head: str, completion: str, ended: bool) -> float:
    """1.0 when the completion ended the line (``ended``) and the completed line is valid
    Python, else 0.0."""
    return float(ended and is_python_line(completed_line(head, completion)))


def line_ending_tokens(tokenizer, vocab_size: int, end_of_text: int) -> np.ndarray:
    """bool ``[V]``: the tokens that end a line: those whose text holds a line break, and the
    end-of-text token."""
    texts = tokenizer.decode_batch([[token] for token in range(vocab_size)])
    ends = np.array([LINE_BREAK in text for text in texts], bool)
    ends[end_of_text] = True
    return ends


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Prompts cut from a token stream.

    Attributes:
      tokens: int32 ``[n, prompt_tokens]``: each a window of the stream ending inside a line.
      heads: the text of each line's beginning, which the completion continues.
      rests: the rest of each line as the file has it (one completion that earns 1).
    """

    tokens: np.ndarray
    heads: tuple[str, ...]
    rests: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.heads)


def _last_line(text: str) -> str:
    return text.rsplit(LINE_BREAK, 1)[-1]


def cut_prompts(
    stream: np.ndarray,
    tokenizer,
    ends_line: np.ndarray,
    *,
    count: int,
    prompt_tokens: int,
    end_of_text: int,
    seed: int,
) -> Prompts:
    """``count`` prompts of ``prompt_tokens`` tokens cut from ``stream``, from lines taken in
    an order drawn from ``seed``.

    A line is the tokens after a line-ending token (``ends_line``), which carries the line's
    indentation, up to the next one. A line qualifies when it is valid Python
    (:func:`is_python_line`) and has at least two tokens of its own; it is cut before one of
    them drawn at random (not the first), and kept when the head holds code (not only
    spaces) but is not valid Python alone, and the window before the cut holds the whole head
    (the line break before it included) and no end of a file. ``ValueError`` when fewer than
    ``count`` lines qualify.
    """
    random = np.random.default_rng(seed)
    breaks = np.flatnonzero(ends_line[stream])
    windows, heads, rests = [], [], []
    for k in random.permutation(len(breaks) - 1):
        start, end = breaks[k] + 1, breaks[k + 1]  # the line's own tokens: [start, end)
        if end - start < 2:
            continue
        cut = int(random.integers(start + 1, end))
        window = stream[cut - prompt_tokens : cut] if cut >= prompt_tokens else None
        if window is None or cut - prompt_tokens > breaks[k] or np.any(window == end_of_text):
            continue
        head = _last_line(tokenizer.decode(stream[breaks[k] : cut].tolist()))
        line = _last_line(tokenizer.decode(stream[breaks[k] : end].tolist()))
        if not head.strip() or is_python_line(head) or not is_python_line(line):
            continue
        windows.append(window)
        heads.append(head)
        rests.append(line[len(head) :])
        if len(heads) == count:
            break
    if len(heads) < count:
        raise ValueError(
            f"only {len(heads)} lines of the stream can be cut into prompts of {prompt_tokens} "
            f"tokens; {count} were asked for: use fewer or shorter prompts, or more files."
        )
    return Prompts(np.stack(windows).astype(np.int32), tuple(heads), tuple(rests))
