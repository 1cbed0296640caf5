"""Short chat prompts the project makes itself: training prompts for Dream-style SFT (answered by the AR base) and a
held-out set with checkable answers for the chat bench.

Every prompt comes from a family (capitals, arithmetic, opposites, counting facts, Python functions, …) filled from
a list; each filler belongs to the training or the held-out side by a hash of its text, so no held-out question is
ever a training prompt. A held-out prompt carries its checker: the words an answer must contain, or unit tests that a
Python function in the answer must pass (run by `check_code` in a sandboxed subprocess, see sandbox.py).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens",
    "Turkey": "Ankara", "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad", "Cuba": "Havana",
    "Colombia": "Bogota", "Nigeria": "Abuja", "Morocco": "Rabat", "Ukraine": "Kyiv", "Czech Republic": "Prague",
    "Romania": "Bucharest", "Philippines": "Manila", "Pakistan": "Islamabad", "New Zealand": "Wellington",
    "Scotland": "Edinburgh", "England": "London", "United States": "Washington",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "old": "new",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "high": "low", "left": "right",
    "wet": "dry", "strong": "weak", "rich": "poor", "loud": "quiet", "long": "short", "push": "pull",
    "inside": "outside", "true": "false", "win": "lose", "buy": "sell", "day": "night", "thick": "thin",
}
COUNTS = {
    "legs does a spider have": "8", "legs does a dog have": "4", "days are in a week": "7",
    "months are in a year": "12", "hours are in a day": "24", "minutes are in an hour": "60",
    "sides does a triangle have": "3", "sides does a square have": "4", "sides does a hexagon have": "6",
    "legs does an insect have": "6", "wheels does a bicycle have": "2", "continents are there": "7",
    "days are in a leap year": "366", "seconds are in a minute": "60", "planets are in the solar system": "8",
    "strings does a standard guitar have": "6", "players are on a soccer team on the field": "11",
}
WORDS = {"two": "2", "three": "3", "four": "4", "six": "6", "seven": "7", "eight": "8", "eleven": "11",
         "twelve": "12", "sixty": "60", "twenty-four": "24"}
# name, signature, what it does, unit tests (asserts over the function)
FUNCTIONS = [
    ("reverse_string", "s", "returns the string s reversed", ["reverse_string('abc') == 'cba'", "reverse_string('') == ''"]),
    ("is_even", "n", "returns True if the integer n is even", ["is_even(4) is True", "is_even(7) is False"]),
    ("square", "x", "returns x squared", ["square(3) == 9", "square(-2) == 4"]),
    ("add", "a, b", "returns the sum of a and b", ["add(2, 3) == 5", "add(-1, 1) == 0"]),
    ("maximum", "numbers", "returns the largest number in the list numbers",
     ["maximum([1, 5, 3]) == 5", "maximum([-2, -7]) == -2"]),
    ("count_vowels", "s", "returns how many vowels (a, e, i, o, u) the string s contains",
     ["count_vowels('hello') == 2", "count_vowels('xyz') == 0"]),
    ("factorial", "n", "returns n factorial", ["factorial(0) == 1", "factorial(5) == 120"]),
    ("is_palindrome", "s", "returns True if the string s reads the same forwards and backwards",
     ["is_palindrome('level') is True", "is_palindrome('abc') is False"]),
    ("celsius_to_fahrenheit", "c", "converts a temperature from Celsius to Fahrenheit",
     ["celsius_to_fahrenheit(0) == 32", "celsius_to_fahrenheit(100) == 212"]),
    ("average", "numbers", "returns the average of the list numbers",
     ["average([1, 2, 3]) == 2", "average([4]) == 4"]),
    ("fibonacci", "n", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1",
     ["fibonacci(0) == 0", "fibonacci(10) == 55"]),
    ("count_words", "text", "returns the number of words in the string text",
     ["count_words('a b c') == 3", "count_words('') == 0"]),
    ("first_char", "s", "returns the first character of the string s", ["first_char('hello') == 'h'"]),
    ("last_item", "items", "returns the last element of the list items", ["last_item([1, 2, 3]) == 3"]),
    ("to_upper", "s", "returns the string s in upper case", ["to_upper('abc') == 'ABC'"]),
    ("sum_list", "numbers", "returns the sum of the list numbers", ["sum_list([1, 2, 3]) == 6", "sum_list([]) == 0"]),
    ("is_positive", "n", "returns True if n is greater than zero", ["is_positive(3) is True", "is_positive(-1) is False"]),
    ("double", "x", "returns twice x", ["double(4) == 8"]),
    ("min_of_two", "a, b", "returns the smaller of a and b", ["min_of_two(3, 7) == 3", "min_of_two(5, 2) == 2"]),
    ("remove_spaces", "s", "returns the string s without spaces", ["remove_spaces('a b c') == 'abc'"]),
    ("count_char", "s, c", "returns how many times the character c occurs in the string s",
     ["count_char('banana', 'a') == 3"]),
    ("is_empty", "items", "returns True if the list items is empty", ["is_empty([]) is True", "is_empty([1]) is False"]),
    ("cube", "x", "returns x cubed", ["cube(2) == 8", "cube(-3) == -27"]),
    ("absolute", "x", "returns the absolute value of x without using abs", ["absolute(-4) == 4", "absolute(3) == 3"]),
]
# A short right body of each function (what follows its signature and docstring): the true length of a body for the
# length modes of `dreamlm bench infill --lengths` (tests check that each passes its unit tests)
BODIES = {
    "reverse_string": "return s[::-1]", "is_even": "return n % 2 == 0", "square": "return x * x",
    "add": "return a + b", "maximum": "return max(numbers)",
    "count_vowels": "return sum(1 for ch in s if ch in 'aeiou')",
    "factorial": "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
    "is_palindrome": "return s == s[::-1]", "celsius_to_fahrenheit": "return c * 9 / 5 + 32",
    "average": "return sum(numbers) / len(numbers)",
    "fibonacci": "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "count_words": "return len(text.split())", "first_char": "return s[0]", "last_item": "return items[-1]",
    "to_upper": "return s.upper()", "sum_list": "return sum(numbers)", "is_positive": "return n > 0",
    "double": "return 2 * x", "min_of_two": "return a if a < b else b", "remove_spaces": "return s.replace(' ', '')",
    "count_char": "return s.count(c)", "is_empty": "return len(items) == 0", "cube": "return x ** 3",
    "absolute": "return -x if x < 0 else x",
}
OPEN_ENDED = [  # training only: no checker, the AR base's answer is the target
    "Explain what a Python list is in one sentence.", "What does the len function do in Python?",
    "Give one tip for writing readable code.", "What is a variable?", "Explain recursion briefly.",
    "What is the difference between a list and a tuple in Python?", "What is a dictionary in Python?",
    "Why do programmers write tests?", "What does the return statement do?", "What is a for loop?",
    "Name three primary colors.", "What is photosynthesis?", "Why is the sky blue?", "What is water made of?",
    "Suggest a name for a pet cat.", "Write a haiku about the sea.", "What is the largest ocean?",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?", "What is an atom?",
]


def _side(text: str, held_share: float = 0.3) -> str:
    """'held' or 'train' for a filler, from a hash of its text (stable across Python versions and machines)."""
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "held" if h < held_share else "train"


@dataclass
class ChatPrompt:
    """One prompt; `expect` words (any one must appear, case-insensitive) or `tests` for a Python function."""

    family: str
    prompt: str
    expect: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    function: str = ""


def chat_prompts(side: str, seed: int = 0) -> list[ChatPrompt]:
    """Every prompt of one side ('train' or 'held'), in a fixed shuffled order."""
    if side not in ("train", "held"):
        raise ValueError("side must be 'train' or 'held'")
    out: list[ChatPrompt] = []
    for country, capital in CAPITALS.items():
        if _side(country) == side:
            out.append(ChatPrompt("capital", f"What is the capital of {country}?", [capital]))
    for word, opposite in OPPOSITES.items():
        if _side(word) == side:
            out.append(ChatPrompt("opposite", f"What is the opposite of \"{word}\"?", [opposite]))
    for what, n in COUNTS.items():
        if _side(what) == side:
            words = [w for w, d in WORDS.items() if d == n]
            out.append(ChatPrompt("count", f"How many {what}?", [n] + words))
    rng = random.Random(f"arith-{side}")
    pairs = {(a, b) for a in range(2, 60) for b in range(2, 60) if _side(f"{a}+{b}") == side}
    for a, b in rng.sample(sorted(pairs), 40 if side == "held" else 150):
        out.append(ChatPrompt("add", f"What is {a} + {b}?", [str(a + b)]))
    for name, args, does, tests in FUNCTIONS:
        if _side(name) == side:
            out.append(ChatPrompt("code", f"Write a Python function {name}({args}) that {does}.", tests=tests,
                                  function=name))
    if side == "train":
        out += [ChatPrompt("open", p) for p in OPEN_ENDED]
    random.Random(seed).shuffle(out)
    return out


def check_answer(prompt: ChatPrompt, answer: str, timeout: float = 5.0) -> bool:
    """Whether `answer` is right: an expected word as a whole word, or a function that passes the unit tests."""
    if prompt.tests:
        return check_code(answer, prompt.tests, timeout)
    return any(re.search(rf"(?<![\w.]){re.escape(w)}(?![\w])", answer, re.IGNORECASE) for w in prompt.expect)


def extract_code(answer: str) -> str:
    """The Python code of an answer: the first fenced block if any, else the whole text."""
    fenced = re.search(r"```(?:python|py)?\s*\n(.*?)```", answer, re.DOTALL)
    return fenced.group(1) if fenced else answer


def check_code(answer: str, tests: list[str], timeout: float = 5.0) -> bool:
    """Run the answer's code and the asserts in a sandboxed subprocess (see sandbox.run_python); True if all pass."""
    from dreamlm.sandbox import run_python

    program = extract_code(answer) + "\n\n" + "\n".join(f"assert {t}" for t in tests) + "\n"
    return run_python(program, timeout=timeout).ok
