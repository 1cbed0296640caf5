"""Planning tasks: generators (determinism, uniqueness, splits), parsers and validators (accept right, reject wrong)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import dreamlm.tasks as tasks
from dreamlm.errors import DreamError
from dreamlm.tasks import countdown, stargraph, sudoku
from dreamlm.tasks.splits import key_split

PLANNING_SUDOKU4 = "0042\n2031\n4023\n3214"
PLANNING_CD = ("86,28,13,31,96", "86+28=114,31-13=18,114-18=96")
# planning.md elides the middle of its star example (`12,7|7,33|…|12,41/12,58=`); this is a completion of it.
PLANNING_STAR = ("12,7|7,33|41,9|9,58|12,41/12,58=", "12,41,9,58")


def flat(grid: list[list[int]]) -> list[int]:
    return [v for row in grid for v in row]


# ---------------------------------------------------------------- registry, determinism, files


def test_registry_names_and_alphabets():
    assert tasks.task_names() == ["sudoku4", "sudoku9", "cd3", "cd4", "cd5", "star-2-5", "star-3-5", "star-5-5"]
    assert tasks.get_task("sudoku4").alphabet == "01234\n"
    assert tasks.get_task("cd4").alphabet == "0123456789+-*/=,"
    with pytest.raises(DreamError, match="unknown task"):
        tasks.get_task("sudoku")
    assert "star-7-4" not in tasks.task_names()  # made on demand by get_task, not listed
    custom = tasks.register(tasks.star_task(7, 4))
    try:
        assert tasks.get_task("star-7-4") is custom
        example = custom.generate(random.Random(0))
        assert len(example["output"].split(",")) == 4
        assert custom.validate(example["input"], example["output"])
    finally:
        del tasks.TASKS["star-7-4"]


@pytest.mark.parametrize("name", tasks.task_names())
def test_generated_examples_validate_and_use_the_alphabet(name):
    task = tasks.get_task(name)
    count = 10 if name == "sudoku9" else 25
    examples = tasks.make_examples(name, count, seed=3, split="train")
    examples += tasks.make_examples(name, count // 5, seed=3, split="test")
    for example in examples:
        task.check_input(example["input"])
        assert task.validate(example["input"], example["output"]), example
        assert set(example["input"] + example["output"]) <= set(task.alphabet)


@pytest.mark.parametrize("name", ["sudoku4", "sudoku9", "cd4", "star-3-5"])
def test_generation_is_deterministic(name):
    n = 3 if name == "sudoku9" else 10
    first = tasks.make_examples(name, n, seed=7, split="train")
    assert first == tasks.make_examples(name, n, seed=7, split="train")
    assert first != tasks.make_examples(name, n, seed=8, split="train")
    assert first != tasks.make_examples(name, n, seed=7, split="test")


def test_write_dataset_is_deterministic_jsonl(tmp_path: Path):
    a = tasks.write_dataset("cd3", 20, 1, "ood", tmp_path / "a" / "cd3.jsonl")
    b = tasks.write_dataset("cd3", 20, 1, "ood", tmp_path / "b.jsonl")
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 20 and all(set(row) == {"input", "output"} for row in rows)
    s4 = tasks.write_dataset("sudoku4", 5, 1, "train", tmp_path / "s4.jsonl")
    assert "\\n" in s4.read_text().splitlines()[0]  # the 4×4 row separator survives as an escaped newline


def test_splits_are_checked():
    for name in ("sudoku4", "sudoku9", "star-2-5"):
        with pytest.raises(DreamError, match=f"task {name} has no ood split"):
            tasks.get_task(name).generate(random.Random(0), "ood")
    with pytest.raises(DreamError, match="unknown split"):
        tasks.make_examples("cd3", 1, 0, "valid")


# ---------------------------------------------------------------- sudoku


@pytest.mark.parametrize("size,blanks", [(4, b) for b in range(13)] + [(9, 40), (9, 50), (9, 56), (9, 60)])
def test_sudoku_unique_solution_and_exact_blanks(size, blanks):
    rng = random.Random(blanks)
    puzzle = sudoku.generate(rng, size, blanks)
    assert puzzle.blanks == blanks
    assert sudoku.count_solutions(puzzle.givens, limit=5) == 1
    assert sudoku.solve(puzzle.givens) == puzzle.solution
    assert all(g in (0, s) for g, s in zip(flat(puzzle.givens), flat(puzzle.solution)))
    assert sudoku.is_valid_solution(puzzle.input, puzzle.output)


def test_sudoku_impossible_blank_counts():
    for size, blanks in ((4, 13), (9, 62), (9, -1)):
        with pytest.raises(DreamError, match="blanks"):
            sudoku.generate(random.Random(0), size, blanks)
    with pytest.raises(DreamError, match="4 or 9"):
        sudoku.generate(random.Random(0), 6, 10)


def test_sudoku_train_and_test_never_share_a_solution_grid():
    rng = random.Random(0)
    for split in ("train", "test"):
        for _ in range(10):
            puzzle = sudoku.generate(rng, 4, 8, split=split)
            assert key_split("".join(map(str, flat(puzzle.solution)))) == split


def test_sudoku_planning_example_is_a_valid_puzzle():
    grid = sudoku.parse(PLANNING_SUDOKU4)
    assert sudoku.count_solutions(grid) == 1
    assert sudoku.format(sudoku.solve(grid)) == "1342\n2431\n4123\n3214"
    assert sudoku.is_valid_solution(PLANNING_SUDOKU4, "1342\n2431\n4123\n3214")
    assert tasks.get_task("sudoku4").validate(PLANNING_SUDOKU4, "1342\n2431\n4123\n3214")


def test_sudoku_format_round_trips():
    for size, blanks in ((4, 8), (9, 45)):
        puzzle = sudoku.generate(random.Random(1), size, blanks)
        for grid in (puzzle.givens, puzzle.solution):
            assert sudoku.parse(sudoku.format(grid)) == grid
        assert sudoku.format(sudoku.parse(puzzle.input)) == puzzle.input
    assert len(puzzle.input) == 81 and puzzle.input.isdigit()
    # surrounding whitespace, CRLF and the one-line 16-character form are accepted for 4×4
    assert sudoku.parse("  " + PLANNING_SUDOKU4.replace("\n", "\r\n") + "\n") == sudoku.parse(PLANNING_SUDOKU4)
    assert sudoku.parse(PLANNING_SUDOKU4.replace("\n", "")) == sudoku.parse(PLANNING_SUDOKU4, size=4)


def test_sudoku_models_read_every_accepted_layout_as_the_spec_writes_it():
    task = tasks.get_task("sudoku4")
    for text in (PLANNING_SUDOKU4.replace("\n", ""), PLANNING_SUDOKU4.replace("\n", " \r\n"), PLANNING_SUDOKU4):
        view, back = task.model_view(text)
        assert view == PLANNING_SUDOKU4  # the layout the models were trained on
        answer = back("1342\n2431\n4123\n3214")
        assert answer == ("1342243141233214" if "\n" not in text else "1342\n2431\n4123\n3214")
        assert task.validate(text, answer)
    assert task.training_pair(PLANNING_SUDOKU4.replace("\n", ""), "1342243141233214") == \
        (PLANNING_SUDOKU4, "1342\n2431\n4123\n3214")
    assert tasks.get_task("sudoku9").model_view(" 1" + "0" * 80)[0] == "1" + "0" * 80
    assert task.model_view("00")[0] == "00"  # not a grid: left for the validator to reject


@pytest.mark.parametrize("text,message", [
    ("0" * 80, "81 characters"),
    ("0" * 82, "81 characters"),
    ("0" * 80 + ".", "only contain digits"),
    ("0042\n2031\n4023", "4 rows of 4"),
    ("0042\n2031\n4023\n32145", "4 rows of 4"),
    ("0052\n2031\n4023\n3214", "digits 0..4"),
    ("0a42\n2031\n4023\n3214", "digits 0..4"),
    ("4042\n2031\n4023\n3214", "appears twice in row 1"),
    ("0042\n2031\n4023\n3212", "twice"),
    ("1000\n0100\n0000\n0000", "appears twice in box 1"),
    ("1000\n0000\n0000\n1000", "appears twice in column 1"),
    ("11" + "0" * 79, "appears twice in row 1"),
    ("", "got 0 characters"),
])
def test_sudoku_malformed_puzzles_raise(text, message):
    with pytest.raises(DreamError, match=message):
        sudoku.parse(text)
    with pytest.raises(DreamError):
        tasks.get_task("sudoku4" if "\n" in text else "sudoku9").check_input(text)


def test_sudoku_size_mismatch_raises():
    with pytest.raises(DreamError):
        sudoku.parse("0" * 81, size=4)
    with pytest.raises(DreamError):
        tasks.get_task("sudoku9").check_input(PLANNING_SUDOKU4)


def test_sudoku_validator_rejects_corrupted_answers():
    puzzle = sudoku.generate(random.Random(4), 9, 45)
    givens, solution = flat(puzzle.givens), flat(puzzle.solution)
    blank = givens.index(0)
    given = next(i for i, v in enumerate(givens) if v)

    def text(cells: list[int]) -> str:
        return "".join(map(str, cells))

    wrong_digit = list(solution)
    wrong_digit[blank] = wrong_digit[blank] % 9 + 1
    # Swapping two cells of a row keeps the row a permutation but breaks columns.
    swapped = list(solution)
    swapped[0], swapped[4] = swapped[4], swapped[0]
    # Relabelling two digits gives another valid sudoku, but one that drops the puzzle's givens.
    a, b = solution[given], solution[given] % 9 + 1
    relabelled = [b if v == a else a if v == b else v for v in solution]
    assert sudoku.is_valid_solution(text(relabelled), text(relabelled))
    left_blank = list(solution)
    left_blank[blank] = 0
    for answer in (text(wrong_digit), text(swapped), text(relabelled), text(left_blank), text(solution)[:-1],
                   text(solution) + "1", "", "garbage", "x" * 81, PLANNING_SUDOKU4, None, 12345):
        assert not sudoku.is_valid_solution(puzzle.input, answer)
    assert sudoku.is_valid_solution(puzzle.input, "\n " + puzzle.output + " \n")


def test_sudoku_validator_accepts_any_solution_of_an_ambiguous_puzzle():
    empty = "0000\n0000\n0000\n0000"
    assert sudoku.count_solutions(sudoku.parse(empty), limit=1000) == 288
    assert sudoku.is_valid_solution(empty, "1234\n3412\n2143\n4321")
    assert sudoku.is_valid_solution(empty, "4321\n2143\n3412\n1234")
    assert not sudoku.is_valid_solution(empty, "1234\n2341\n3412\n4123")  # rows and columns fine, boxes not
    with pytest.raises(DreamError):
        sudoku.is_valid_solution("1100\n0000\n0000\n0000", "1234\n3412\n2143\n4321")  # the puzzle is bad


# ---------------------------------------------------------------- countdown


def test_countdown_planning_example():
    numbers, target = countdown.parse_input(PLANNING_CD[0])
    assert (numbers, target) == ([86, 28, 13, 31], 96)
    assert countdown.is_valid_solution(*PLANNING_CD)
    assert tasks.get_task("cd4").validate(*PLANNING_CD)
    # The deterministic DFS finds exactly the example's solution first.
    assert countdown.format_steps(countdown.solve(numbers, target)) == PLANNING_CD[1]


@pytest.mark.parametrize("answer", [
    "86+28=114,31-13=18,114-18=97",  # wrong arithmetic
    "86+28=114,31-13=18,114-17=97",  # right arithmetic, 17 never available, wrong target
    "86+28=114,86-13=73,114-18=96",  # 86 reused
    "86+28=114,114-18=96,31-13=18",  # 18 used before it exists
    "86+28=114,13-31=-18,114-18=96",  # smaller-first subtraction
    "86+28=114,13-31=18,114-18=96",  # smaller-first subtraction
    "86+28=114,31-13=18,114+18=132",  # last result is not the target
    "86+28=114,31-13=18",  # missing equation
    "86+28=114,31-13=18,114-18=96,96-0=96",  # extra equation
    "86+28=114,31+13=44,114-44=70",  # valid arithmetic, wrong target
    "86-28=58,31-13=18,58/18=3",  # non-exact division
    "86+28=114,31-13=18,114-18=96,",  # trailing comma
    "86 + 28 = 114,31-13=18,114-18=96",
    "086+28=114,31-13=18,114-18=96",
    "86+28=114;31-13=18;114-18=96",
    "__import__('os').system('true')",
    "",
    "9" * 5000 + "+1=1,31-13=18,114-18=96",
    None,
])
def test_countdown_validator_rejects(answer):
    assert not countdown.is_valid_solution(PLANNING_CD[0], answer)


def test_countdown_validator_rules():
    assert countdown.is_valid_solution("6,4,3,2,12", "6*4=24,3-2=1,24/2=12") is False  # 2 used twice, 1 unused
    assert countdown.is_valid_solution("6,4,3,2,8", "6/3=2,4*2=8,2*8=16") is False  # wrong final target
    assert countdown.is_valid_solution("6,4,3,2,16", "6/3=2,4*2=8,2*8=16")  # equal numbers: one of each
    assert countdown.is_valid_solution("6,4,3,2,16", "6/3=2,4*2=8,8*2=16")  # operand order of * is free
    assert countdown.is_valid_solution("3,5,7,15", "3*5=15,7/7=1") is False  # 7 used twice
    assert countdown.is_valid_solution("7,3,10", "3+7=10")
    assert not countdown.is_valid_solution("7,3,10", "7+3=10,0+10=10")
    assert not countdown.is_valid_solution("7,3,3", "7/3=2")  # not exact (7 != 3*2)
    with pytest.raises(DreamError):
        countdown.is_valid_solution("7,0,7", "7+0=7")  # 0 is not a valid input number
    # Zero results are accepted by the validator (the generator never makes them); division by zero is not.
    assert countdown.is_valid_solution("5,5,7,7", "5-5=0,7+0=7")
    assert countdown.is_valid_solution("5,5,7,7", "5-5=0,7-0=7")
    assert not countdown.is_valid_solution("5,5,7,7", "5-5=0,7/0=7")


@pytest.mark.parametrize("text,message", [
    ("86,28,13,31,0", "target must be in 1..1000"),
    ("86,28,13,31,1001", "target must be in 1..1000"),
    ("86,28,0,31,96", "numbers must be in 1..99"),
    ("86,28,100,31,96", "numbers must be in 1..99"),
    ("86,28.5,13,31,96", "comma-separated"),
    ("86,-28,13,31,96", "comma-separated"),
    ("86,a,13,31,96", "comma-separated"),
    ("86,,13,31,96", "comma-separated"),
    ("86 28 13 31 96", "comma-separated"),
    ("5,10", "at least 2 numbers"),
    ("", "comma-separated"),
])
def test_countdown_malformed_inputs_raise(text, message):
    with pytest.raises(DreamError, match=message):
        countdown.parse_input(text)
    with pytest.raises(DreamError):
        countdown.is_valid_solution(text, "1+1=2")


def test_countdown_parse_is_lenient_on_whitespace_and_checks_k():
    assert countdown.parse_input(" 86,28,13,31,96\n") == ([86, 28, 13, 31], 96)
    assert countdown.parse_input("1,2,999") == ([1, 2], 999)  # external sets may use larger targets
    with pytest.raises(DreamError, match="cd3 puzzle has 3 numbers"):
        tasks.get_task("cd3").check_input(PLANNING_CD[0])


def test_countdown_generator_conventions():
    rng = random.Random(5)
    for k in (3, 4, 5):
        for _ in range(15):
            puzzle = countdown.generate(rng, k, "train")
            assert len(puzzle.numbers) == k and len(puzzle.steps) == k - 1
            assert all(1 <= x <= 99 for x in puzzle.numbers) and 10 <= puzzle.target <= 100
            assert puzzle.steps[-1].result == puzzle.target
            assert all(step.result > 0 for step in puzzle.steps)  # no zero results from the generator
            assert countdown.solve(puzzle.numbers, puzzle.target) == list(puzzle.steps)
            assert countdown.is_valid_solution(puzzle.input, puzzle.output)


def test_countdown_fixed_view():
    # Every number zero-padded to one width per k: each equation's characters sit at fixed places.
    assert [countdown.view_width(k) for k in (2, 3, 4, 5)] == [4, 4, 6, 8]  # 99**2 = 9801, 99**3 = 970299, ...
    task = tasks.get_task("cd4")
    view_in, view_out = task.training_pair(*PLANNING_CD, "fixed")
    assert view_in == "000086,000028,000013,000031,000096"
    assert view_out == "000086+000028=000114,000031-000013=000018,000114-000018=000096"
    text, to_answer = task.model_view(" 86,28,13,31,96\n", "fixed")
    assert text == view_in and to_answer(view_out) == PLANNING_CD[1]
    cd3 = tasks.get_task("cd3")
    for example in tasks.make_examples("cd3", 30, 3, "train") + tasks.make_examples("cd3", 10, 3, "ood"):
        view_in, view_out = cd3.training_pair(example["input"], example["output"], "fixed")
        assert len(view_in) == 4 * 4 + 3 and len(view_out) == 2 * 14 + 1  # one length for every CD3 puzzle
        assert cd3.model_view(example["input"], "fixed")[1](view_out) == example["output"]
    # A wrong answer stays wrong (and a malformed one malformed) once mapped back.
    assert not task.validate(PLANNING_CD[0], to_answer(view_out.replace("000114", "000115")))
    assert to_answer("0086+0a28=114,,") == "86+0a28=114,,"
    assert countdown.from_fixed("000+0007=7") == "0+7=7"
    with pytest.raises(DreamError, match="does not fit the 4-digit fixed view"):
        cd3.training_pair("99,99,99,100", "99*99=9801,9801*99=970299", "fixed")
    with pytest.raises(DreamError, match="target must be in"):
        cd3.model_view("1,2,3,0", "fixed")


def test_countdown_refs_view_writes_reused_results_as_letters():
    # The fixed view, except that an operand which is an earlier result is written as that equation's letter: the
    # model cannot copy a result from where it is used, it has to compute it.
    task = tasks.get_task("cd4")
    view_in, view_out = task.training_pair(*PLANNING_CD, "refs")
    assert view_in == "000086,000028,000013,000031,000096"
    assert view_out == "000086+000028=000114,000031-000013=000018,aaaaaa-bbbbbb=000096"
    assert task.model_view(PLANNING_CD[0], "refs")[1](view_out) == PLANNING_CD[1]
    for name, letters in (("cd3", "a"), ("cd4", "ab"), ("cd5", "abc")):
        for example in tasks.make_examples(name, 40, 5, "test"):
            task = tasks.get_task(name)
            view_in, view_out = task.training_pair(example["input"], example["output"], "refs")
            assert len(view_out) == len(task.training_pair(example["input"], example["output"], "fixed")[1])
            assert set(view_out) - set("0123456789+-*/=,") <= set(letters)
            assert task.model_view(example["input"], "refs")[1](view_out) == example["output"]
    # A value that is both an unused input number and an unused result: the result is referenced.
    assert countdown.to_refs("2*2=4,4+4=8", 3) == "0002*0002=0004,aaaa+0004=0008"
    # A letter for a later (or missing) equation, or a mixed run, stays as written: the validator rejects it.
    assert countdown.from_refs("0086+0028=0114,bbbb-0018=0096") == "86+28=114,bbbb-18=96"
    assert countdown.from_refs("aaaa+0028=0114,0031-0013=0018") == "aaaa+28=114,31-13=18"
    assert countdown.from_refs("0086+0028=0114,abaa-0018=0096") == "86+28=114,abaa-18=96"
    assert not tasks.get_task("cd3").validate("86,28,18,96", "86+28=114,bbbb-18=96")
    # Every answer in a fixed-width view has one layout, so a diffusion solver can pin where it ends.
    cd3 = tasks.get_task("cd3")
    assert cd3.answer_layout("0086,0028,0013,0096", "refs") == "0000+0000=0000,0000+0000=0000"
    assert cd3.answer_layout("86,28,13,96", "") is None


def test_countdown_ood_split_holds_out_targets():
    assert countdown.OOD_TARGETS == (17, 27, 37, 47, 57, 67, 77, 87, 97)
    held_out = set(countdown.OOD_TARGETS)
    assert 0.08 <= len(held_out) / 91 <= 0.12
    ood = tasks.make_examples("cd3", 40, 0, "ood")
    assert {countdown.parse_input(e["input"])[1] for e in ood} <= held_out
    for split in ("train", "test"):
        examples = tasks.make_examples("cd3", 80, 0, split)
        assert not {countdown.parse_input(e["input"])[1] for e in examples} & held_out


def test_countdown_train_and_test_are_disjoint():
    def keys(split: str) -> set[str]:
        out = set()
        for e in tasks.make_examples("cd3", 60, 0, split):
            numbers, target = countdown.parse_input(e["input"])
            out.add(f"{sorted(numbers)}:{target}")
        return out

    train, test = keys("train"), keys("test")
    assert not train & test
    assert all(key_split(k) == "train" for k in train) and all(key_split(k) == "test" for k in test)


def test_countdown_bad_k():
    with pytest.raises(DreamError):
        countdown.generate(random.Random(0), 1)
    with pytest.raises(DreamError):
        tasks.countdown_task(9)


# ---------------------------------------------------------------- star graph


def test_star_planning_example():
    assert stargraph.parse_input(PLANNING_STAR[0]) == ([(12, 7), (7, 33), (41, 9), (9, 58), (12, 41)], 12, 58)
    assert stargraph.is_valid_solution(*PLANNING_STAR)
    assert stargraph.solve(PLANNING_STAR[0]) == [12, 41, 9, 58]


@pytest.mark.parametrize("degree,length", [(2, 5), (3, 5), (5, 5), (1, 2), (30, 4)])
def test_star_generator_conventions(degree, length):
    rng = random.Random(degree)
    for _ in range(10):
        puzzle = stargraph.generate(rng, degree, length)
        nodes = {x for edge in puzzle.edges for x in edge}
        assert len(puzzle.edges) == degree * (length - 1) and len(nodes) == 1 + degree * (length - 1)
        assert nodes <= set(stargraph.node_range(degree, length))
        assert len({len(str(x)) for x in nodes}) == 1  # one name width: the answer's layout is fixed
        assert len(puzzle.path) == length and puzzle.path[0] == puzzle.centre and puzzle.path[-1] == puzzle.goal
        assert sum(puzzle.centre in edge for edge in puzzle.edges) == degree
        assert stargraph.solve(puzzle.input) == list(puzzle.path)
        assert stargraph.is_valid_solution(puzzle.input, puzzle.output)
        assert stargraph.parse_input(puzzle.input) == (list(puzzle.edges), puzzle.centre, puzzle.goal)
    assert stargraph.node_range(2, 5) == range(10, 100)
    assert stargraph.node_range(30, 4) == range(100, 1000)  # 91 nodes: 90 two-digit names are too few


def test_star_relabel_round_trip():
    # One-digit and three-digit names from another generator are read in the training layout and mapped back.
    text = "12,7|7,333|41,9|9,58|12,41/12,58="
    renamed, back = stargraph.relabel(text)
    assert renamed != text and stargraph.relabel(text) == (renamed, back)  # deterministic per puzzle
    edges, centre, goal = stargraph.parse_input(renamed)
    assert all(10 <= n <= 99 for e in edges for n in e)
    assert [(back[a], back[b]) for a, b in edges] == [(12, 7), (7, 333), (41, 9), (9, 58), (12, 41)]
    assert (back[centre], back[goal]) == (12, 58)
    path = ",".join(map(str, stargraph.solve(renamed)))
    assert stargraph.unlabel(path, back) == "12,41,9,58"
    task = tasks.get_task("star-2-5")
    view, to_answer = task.model_view(text)
    assert view == renamed and task.validate(text, to_answer(path))
    assert not task.validate(text, to_answer(path.rsplit(",", 1)[0]))  # a broken answer stays broken
    assert stargraph.unlabel("garbage", back) == "garbage"
    # Names already of the generator's width pass through untouched.
    own = tasks.get_task("star-2-5").generate(random.Random(3))["input"]
    assert stargraph.relabel(own)[0] == own and task.model_view(own)[0] == own
    assert tasks.get_task("sudoku4").model_view("0000\n0000")[0] == "0000\n0000"


def test_star_stretch_splices_fresh_nodes_after_the_centre():
    text, answer = PLANNING_STAR  # arms of 2 and 3 nodes past the centre
    edges, centre, goal = stargraph.parse_input(text)
    assert stargraph.arm_lengths(edges, centre) == {7: 2, 41: 3} and stargraph.shape(edges, centre) == (2, 4)
    longer, splice = stargraph.stretch(text, 5)
    assert longer == stargraph.stretch(text, 5)[0]  # seeded by the puzzle
    new_edges, new_centre, new_goal = stargraph.parse_input(longer)
    assert (new_centre, new_goal) == (centre, goal) and stargraph.shape(new_edges, centre) == (2, 5)
    assert set(stargraph.arm_lengths(new_edges, centre).values()) == {4}  # every arm made as long: a proper G(2, 5)
    assert [len(splice[7]), len(splice[41])] == [2, 1]
    assert set(edges) - {(12, 7), (12, 41)} <= set(new_edges)  # the other edges kept, written the same way
    spliced = [centre, *splice[41], 41, 9, 58]
    assert stargraph.is_valid_solution(longer, ",".join(map(str, spliced)))
    assert stargraph.unstretch(",".join(map(str, spliced)), splice) == answer
    wrong = [centre, *splice[7], 41, 9, 58]  # the other arm's spliced nodes: left in, so invalid in the original
    assert stargraph.unstretch(",".join(map(str, wrong)), splice) == ",".join(map(str, wrong))
    assert not stargraph.is_valid_solution(text, stargraph.unstretch(",".join(map(str, wrong)), splice))
    assert stargraph.unstretch("12,x", splice) == "12,x"
    assert stargraph.stretch(text, 4) != (text, {})  # equal arms of 4 nodes: the shorter arm gets one
    assert stargraph.stretch(text, 3) == (text, None)  # an arm is already longer: unchanged, arms not all 3
    proper = "12,7|7,33|33,20|12,41|41,9|9,58/12,58="
    assert stargraph.stretch(proper, 4) == (proper, {})  # already that shape
    # Edges written towards the centre, and graphs that are not stars, are refused (issue 19: they were answered
    # with names from outside the graph).
    with pytest.raises(DreamError, match="points into the centre 12"):
        stargraph.stretch("7,12|33,7|41,12|58,41/12,58=", 4)
    with pytest.raises(DreamError, match="node 7 branches to"):
        stargraph.parse_input("12,7|7,33|7,20|12,41/12,41=")
    assert stargraph.unstretch("12,7", None) == "12,7"


def test_star_stretch_adds_decoy_arms_up_to_a_degree():
    text = "12,7|7,33|33,58/12,58="  # G(1, 4): a bare path
    wide, splice = stargraph.stretch(text, 5, degree=3)
    assert wide == stargraph.stretch(text, 5, degree=3)[0]  # seeded by the puzzle
    edges, centre, goal = stargraph.parse_input(wide)
    assert (centre, goal) == (12, 58) and stargraph.shape(edges, centre) == (3, 5)
    assert sorted(stargraph.arm_lengths(edges, centre).values()) == [4, 4, 4]
    assert len({n for e in edges for n in e}) == 13 and all(a in {12} | {b for _, b in edges} for a, _ in edges)
    answer = [12, *splice[7], 7, 33, 58]  # the goal's arm stretched; the decoys are not in the splice
    assert list(splice) == [7] and stargraph.solve(wide) == answer
    assert stargraph.unstretch(",".join(map(str, answer)), splice) == "12,7,33,58"
    assert stargraph.is_valid_solution(text, stargraph.unstretch(",".join(map(str, answer)), splice))
    decoy = next(n for n in stargraph.arm_lengths(edges, centre) if n != splice[7][0])
    assert not stargraph.is_valid_solution(text, stargraph.unstretch(f"12,{decoy}", splice))
    # Already enough arms: the degree asks for nothing.
    proper = "12,7|7,33|12,41|41,9/12,9="
    assert stargraph.stretch(proper, 3, degree=2) == (proper, {})


def test_star_stretch_makes_an_inner_goal_a_leaf():
    text = "12,7|7,33|33,20|12,41|41,9|9,58/12,41="  # the goal 41 sits next to the centre on a 4-node arm
    trimmed, splice = stargraph.stretch(text, 4)
    edges, centre, goal = stargraph.parse_input(trimmed)
    assert goal == 41 and not {9, 58} & {n for e in edges for n in e}  # the nodes past the goal are gone
    assert sorted(stargraph.arm_lengths(edges, centre).values()) == [3, 3] and len(splice[41]) == 2
    answer = stargraph.solve(trimmed)
    assert answer == [12, *splice[41], 41] and stargraph.unstretch(",".join(map(str, answer)), splice) == "12,41"
    assert stargraph.is_valid_solution(text, "12,41")
    # A leaf goal keeps every node; an inner goal on a graph of the right shape is still rewritten.
    assert stargraph.stretch("12,7|7,33|12,41|41,9/12,9=", 3) == ("12,7|7,33|12,41|41,9/12,9=", {})
    _, splice = stargraph.stretch("12,7|7,33|12,41|41,9/12,41=", 3)
    assert splice[7] == () and len(splice[41]) == 1


def test_star_edge_view_round_trip():
    # Any names (one- and three-digit here) become 10..9+n, each edge one `a>b` word; answers map back and forth.
    text = "12,7|7,333|41,9|9,58|12,41/12,58="
    task = tasks.get_task("star-2-3")
    view, to_answer = task.model_view(text, "edges")
    assert view == task.model_view(text, "edges")[0]  # deterministic per puzzle
    edge_part, query = view.split("/")
    pairs = [tuple(map(int, e.split(">"))) for e in edge_part.split("|")]
    names = {n for e in pairs for n in e}
    assert names == set(range(10, 16)) and len(pairs) == 5
    view_in, view_out = task.training_pair(text, "12,41,9,58", "edges")
    assert view_in == view
    assert [a for a, _ in pairs].count(int(view_out.split(",")[0])) == 2  # the centre starts two edges
    assert to_answer(view_out) == "12,41,9,58" and task.validate(text, to_answer(view_out))
    assert not task.validate(text, to_answer(view_out.rsplit(",", 1)[0]))
    words = stargraph.edge_words(6)
    assert len(words) == 6 + 6 * 5 and "10>15" in words and "10>10" not in words
    from dreamlm.training.data import char_tokenizer, expand_words

    assert expand_words(["10..15>10..15"]) == words[6:]
    tok = char_tokenizer("0123456789,|/=>", ["10..15", "10..15>10..15"])
    ids = tok.encode(view)
    assert len(ids) == 5 + 4 + 5 and tok.decode(ids) == view  # one token per edge, name, separator
    with pytest.raises(DreamError, match="has no view 'bogus'"):
        task.model_view(text, "bogus")
    with pytest.raises(DreamError, match="has no view"):
        tasks.get_task("sudoku4").model_view("0000\n0000\n0000\n0000", "edges")


@pytest.mark.parametrize("answer", [
    "12,41,58",  # broken path (skips 9)
    "41,9,58",  # does not start at the centre
    "12,41,9",  # does not end at the goal
    "12,7,33",  # wrong arm
    "12,41,12,41,9,58",  # back and forth along real edges
    "12,7,12,41,9,58",
    "58,9,41,12",  # reversed
    "12,41,9,58,",
    "12, 41, 9, 58",
    "12,41,9,58=",
    "",
    "garbage",
    None,
])
def test_star_validator_rejects(answer):
    assert not stargraph.is_valid_solution(PLANNING_STAR[0], answer)


@pytest.mark.parametrize("text,message", [
    ("12,7|7,33|41,9|9,58|12,41/12,58", "must look like"),
    ("12,7|7,33|41,9|9,58|12,41|12,58=", "must look like"),
    ("12,7|7,33||12,41/12,58=", "must look like"),
    ("12-7|7,33/12,33=", "must look like"),
    ("12,7|7,7/12,7=", "self-loop"),
    ("12,7|7,12/12,7=", "appears twice"),
    ("12,7|7,33/12,12=", "same centre and goal"),
    ("12,7|7,33/5,33=", "centre 5 is not a node"),
    ("12,7|7,33/12,58=", "goal 58 is not a node"),
    ("12,7|33,58/12,58=", "cannot be reached"),
    ("", "must look like"),
])
def test_star_malformed_inputs_raise(text, message):
    with pytest.raises(DreamError, match=message):
        stargraph.parse_input(text)
    with pytest.raises(DreamError):
        tasks.get_task("star-2-5").validate(text, "12,7")


def test_any_star_graph_by_name():
    task = tasks.get_task("star-7-4")  # not pre-registered: made from its name
    example = task.generate(random.Random(0))
    edges, centre, goal = stargraph.parse_input(example["input"])
    assert len(edges) == 7 * 3 and len(example["output"].split(",")) == 4
    assert sum(centre in e for e in edges) == 7 and task.validate(example["input"], example["output"])
    for bad in ("star-2-1", "star-0-5", "star-2", "star-a-b"):
        with pytest.raises(DreamError, match="unknown task"):
            tasks.get_task(bad)


def test_star_bad_knobs():
    with pytest.raises(DreamError):
        stargraph.generate(random.Random(0), 0, 5)
    with pytest.raises(DreamError):
        tasks.star_task(2, 1)


# ---------------------------------------------------------------- hygiene


def test_no_eval_or_exec_in_task_code():
    for path in Path(tasks.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert "eval(" not in source and "exec(" not in source, path


def test_workers_give_the_same_examples_for_any_count(tmp_path: Path):
    one = tasks.make_examples("star-2-5", 1500, 3, "test", workers=1)
    two = tasks.make_examples("star-2-5", 1500, 3, "test", workers=2)
    assert one == two and len(one) == 1500 and len({e["input"] for e in one}) == 1500
    assert one[:1000] != tasks.make_examples("star-2-5", 1000, 3, "test")  # its own, documented stream
    task = tasks.get_task("star-2-5")
    assert all(task.validate(e["input"], e["output"]) for e in one)
    with pytest.raises(DreamError, match="workers must be"):
        tasks.make_examples("star-2-5", 10, 0, "train", workers=0)
