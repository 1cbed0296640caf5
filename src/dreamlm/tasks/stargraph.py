"""Star graph G(d, l) path finding (Bachmann & Nagarajan, "The Pitfalls of Next-Token Prediction").

Format (a contract, see planning.md): input is the shuffled edge list and the query, `12,7|7,33|...|12,41/12,58=`;
output is the path from the centre to the goal, `12,41,9,58`.

Conventions (those of the paper's reference generator, so `star-2-5` is its `deg_2_path_5`):
- l counts the nodes of one arm *including the centre*, i.e. the answer path has l nodes and l-1 edges (in the
  planning.md example `12,41,9,58` is a path of l = 4); the graph has 1 + d(l-1) nodes and d(l-1) edges.
- Edges are written outward, parent first (`12,41`, then `41,9`), in shuffled order; the goal is an arm's leaf.
- Node names are distinct random integers of one width: two digits (10..99), or m digits with at least twice as many
  m-digit names as nodes for bigger graphs (so names stay sparse in their range). One width keeps every node the
  same number of characters, so a character-level model sees the answer's layout before it knows the path.
- Puzzles from elsewhere may use any names (`12,7|7,33|...`, one-digit names included): `relabel` maps them onto
  random names of this width and back, so the solver reads every external set in its training layout; the graph
  and the path are unchanged.
- The validator reads edges as undirected and requires a simple path (no repeated node); in a tree the simple
  path between two nodes is unique, so this accepts exactly the right answer whichever way external sets orient
  their edges.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict, deque
from dataclasses import dataclass

from dreamlm.errors import DreamError

_INT = r"(?:0|[1-9][0-9]*)"
_INPUT = re.compile(rf"({_INT},{_INT}(?:\|{_INT},{_INT})*)/({_INT}),({_INT})=")
_PATH = re.compile(rf"{_INT}(?:,{_INT})*")
_MAX_DIGITS = 9  # node names are small; keeps int() cheap on garbage answers

Edge = tuple[int, int]


@dataclass(frozen=True)
class Puzzle:
    """A generated star graph: shuffled outward edges, the query (centre, goal) and the answer path."""

    edges: tuple[Edge, ...]
    centre: int
    goal: int
    path: tuple[int, ...]

    @property
    def input(self) -> str:
        """The edge list and query in the spec text format."""
        return format_input(self.edges, self.centre, self.goal)

    @property
    def output(self) -> str:
        """The centre-to-goal path in the spec text format."""
        return ",".join(map(str, self.path))


def format_input(edges: list[Edge] | tuple[Edge, ...], centre: int, goal: int) -> str:
    """`a,b|c,d|.../centre,goal=`."""
    return "|".join(f"{a},{b}" for a, b in edges) + f"/{centre},{goal}="


def name_width(nodes: int) -> int:
    """Digits per node name for a graph of `nodes` nodes: 2, or more until there are twice as many names as nodes."""
    width = 2
    while 9 * 10 ** (width - 1) < 2 * nodes:
        width += 1
    return width


def names_for(nodes: int) -> range:
    """The names a graph of `nodes` nodes draws from: every integer with `name_width(nodes)` digits."""
    width = name_width(nodes)
    return range(10 ** (width - 1), 10 ** width)


def node_range(degree: int, length: int) -> range:
    """The names a G(d, l) draws from."""
    return names_for(1 + degree * (length - 1))


def generate(rng: random.Random, degree: int, length: int) -> Puzzle:
    """A random G(degree, length) with a random goal leaf; see the module docstring for the conventions."""
    for name, value, low in (("degree", degree, 1), ("length", length, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DreamError(f"star graph {name} must be an integer >= {low}, got {value!r}")
    arm = length - 1
    names = rng.sample(node_range(degree, length), 1 + degree * arm)
    centre = names[0]
    arms = [names[1 + i * arm:1 + (i + 1) * arm] for i in range(degree)]
    edges = []
    for nodes in arms:
        chain = [centre, *nodes]
        edges.extend(zip(chain, chain[1:]))
    rng.shuffle(edges)
    chosen = arms[rng.randrange(degree)]
    return Puzzle(tuple(edges), centre, chosen[-1], (centre, *chosen))


def parse_input(text: str) -> tuple[list[Edge], int, int]:
    """Parse `a,b|.../centre,goal=` into (edges, centre, goal); malformed or unsolvable → DreamError."""
    if not isinstance(text, str):
        raise DreamError(f"a star graph puzzle must be text, got {type(text).__name__}")
    body = text.strip()
    match = _INPUT.fullmatch(body)
    if match is None:
        raise DreamError(f"a star graph puzzle must look like 'a,b|c,d|.../centre,goal=', got {body[:40]!r}")
    if any(len(tok) > _MAX_DIGITS for tok in re.split(r"[,|/=]", body)):
        raise DreamError(f"star graph node names must have at most {_MAX_DIGITS} digits")
    edges = [(int(a), int(b)) for a, b in (pair.split(",") for pair in match.group(1).split("|"))]
    centre, goal = int(match.group(2)), int(match.group(3))
    seen: set[frozenset[int]] = set()
    for a, b in edges:
        if a == b:
            raise DreamError(f"star graph edge {a},{b} is a self-loop")
        if frozenset((a, b)) in seen:
            raise DreamError(f"star graph edge {a},{b} appears twice")
        seen.add(frozenset((a, b)))
    if centre == goal:
        raise DreamError(f"star graph query has the same centre and goal ({centre})")
    adjacency = _adjacency(edges)
    for role, node in (("centre", centre), ("goal", goal)):
        if node not in adjacency:
            raise DreamError(f"star graph {role} {node} is not a node of the graph")
    if not _reachable(adjacency, centre, goal):
        raise DreamError(f"star graph goal {goal} cannot be reached from the centre {centre}")
    _check_star(edges, centre, goal)
    return edges, centre, goal


def _check_star(edges: list[Edge], centre: int, goal: int) -> None:
    """Edges point away from the centre, every node but the centre has one parent and arms do not branch: a star,
    not some other graph (DreamError naming what is wrong). The goal may sit inside an arm (`stretch` handles it)."""
    parent: dict[int, int] = {}
    children: dict[int, list[int]] = defaultdict(list)
    for a, b in edges:
        if b == centre:
            raise DreamError(f"star graph edge {a},{b} points into the centre {centre}; edges go from the centre "
                             "outward (parent,child)")
        if b in parent:
            raise DreamError(f"star graph node {b} has two parents ({parent[b]} and {a}); a star's arms are paths")
        parent[b] = a
        children[a].append(b)
    for node, kids in children.items():
        if node != centre and len(kids) > 1:
            raise DreamError(f"star graph node {node} branches to {sorted(kids)}; only the centre may have "
                             "several children")
    orphans = sorted({a for a, _ in edges} - set(parent) - {centre})
    if orphans:
        raise DreamError(f"star graph node {orphans[0]} has no parent: the graph is not one star around the centre "
                         f"{centre} (edges are parent,child)")



def _adjacency(edges: list[Edge]) -> dict[int, set[int]]:
    adjacency: dict[int, set[int]] = defaultdict(set)
    for a, b in edges:
        adjacency[a].add(b)
        adjacency[b].add(a)
    return adjacency


def _reachable(adjacency: dict[int, set[int]], start: int, goal: int) -> bool:
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            return True
        for nxt in adjacency[node] - seen:
            seen.add(nxt)
            queue.append(nxt)
    return False


def arm_lengths(edges: list[Edge], centre: int) -> dict[int, int] | None:
    """Nodes on each arm (by the centre's neighbour that starts it, centre excluded) when every arm is a simple
    chain out of the centre; None when the graph is not such a star (a node of degree > 2 off the centre, a
    cycle)."""
    adjacency = _adjacency(edges)
    lengths = {}
    for start in sorted(adjacency[centre]):
        previous, node, count = centre, start, 1
        while len(adjacency[node]) == 2:
            previous, node = node, next(n for n in adjacency[node] if n != previous)
            count += 1
            if node == centre or count > len(adjacency):
                return None
        if len(adjacency[node]) != 1:
            return None
        lengths[start] = count
    return lengths


def shape(edges: list[Edge], centre: int) -> tuple[int, int]:
    """(degree, length) of a star graph: the centre's edges, and nodes on its longest arm including the centre
    (for a graph that is not a star: nodes per arm on average)."""
    degree = sum(centre in edge for edge in edges)
    arms = arm_lengths(edges, centre)
    if arms:
        return degree, max(arms.values()) + 1
    nodes = len({n for edge in edges for n in edge})
    return degree, (nodes - 1) // max(degree, 1) + 1


Splice = dict[int, tuple[int, ...]]  # a neighbour of the centre → the fresh nodes spliced in before it


def stretch(text: str, length: int, degree: int = 0) -> tuple[str, Splice | None]:
    """The puzzle with every arm `length` nodes long (centre included) and at least `degree` arms: fresh nodes
    spliced in between the centre and each of its neighbours, as many as that arm needs, and decoy arms of fresh
    nodes added until there are `degree` arms (new edges written the way the puzzle writes its centre's edges, and
    put at random places in the edge list). Seeded by the puzzle, so the same puzzle is always stretched the same
    way.

    A goal inside an arm is first made its leaf (the nodes past it play no part in the answer and are dropped).
    A G(d, l) becomes a G(max(d, degree), length) (a star with arms of several lengths becomes one with equal arms)
    whose answer is the old one with the spliced nodes after the centre, so a model of longer arms or more arms
    reads it (`unstretch` maps its answer back); decoys lead nowhere near the goal, which arm leads to it is no
    easier to see, and the path still has to be found. A puzzle already of that shape comes back unchanged with an
    empty splice; one that is not a star, or has a longer arm, comes back unchanged with None (its arms are not all
    `length` nodes).
    """
    edges, centre, goal = parse_input(text)
    beyond = _beyond(edges, centre, goal)
    if beyond:  # the nodes past the goal on its arm play no part in the answer: the goal is made a leaf
        edges = [(a, b) for a, b in edges if a not in beyond and b not in beyond]
    arms = arm_lengths(edges, centre)
    if not arms or max(arms.values()) + 1 > length:
        return text, None
    decoys = max(degree - len(arms), 0)
    if set(arms.values()) == {length - 1} and not decoys and not beyond:
        return text, {}
    rng = random.Random(f"stretch/{text.strip()}")
    nodes = {n for edge in edges for n in edge}
    count = sum(length - 1 - arm for arm in arms.values()) + decoys * (length - 1)
    pool = [n for n in names_for(len(nodes) + count) if n not in nodes]
    fresh = iter(rng.sample(pool, count))
    outward = next(a == centre for a, b in edges if centre in (a, b))

    def chain_edges(chain: list[int], out: bool) -> list[Edge]:
        return list(zip(chain, chain[1:])) if out else [(y, x) for x, y in zip(chain, chain[1:])]

    kept: list[Edge] = []
    splice: Splice = {}
    for a, b in edges:
        if centre not in (a, b):
            kept.append((a, b))
            continue
        neighbour = b if a == centre else a
        splice[neighbour] = tuple(next(fresh) for _ in range(length - 1 - arms[neighbour]))
        kept.extend(chain_edges([centre, *splice[neighbour], neighbour], a == centre))
    for _ in range(decoys):
        kept.extend(chain_edges([centre, *(next(fresh) for _ in range(length - 1))], outward))
    rng.shuffle(kept)
    return format_input(kept, centre, goal), splice


def _beyond(edges: list[Edge], centre: int, goal: int) -> set[int]:
    """The nodes reached from the centre through the goal (breadth-first; none when the goal is a leaf)."""
    adjacency = _adjacency(edges)
    parent: dict[int, int | None] = {centre: None}
    queue = deque([centre])
    beyond: set[int] = set()
    while queue:
        node = queue.popleft()
        if parent[node] == goal or parent[node] in beyond:
            beyond.add(node)
        for nxt in sorted(adjacency[node]):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return beyond


def unstretch(answer: str, splice: Splice | None) -> str:
    """An answer to a stretched puzzle in the original's terms: the spliced nodes right after the centre are
    dropped when they are exactly those spliced before the next node; anything else is left as written (names that
    are not in the original graph make such an answer invalid there)."""
    path = _parse_path(answer)
    if path is None or not splice:
        return answer
    for neighbour, fresh in splice.items():
        if path[1:2 + len(fresh)] == [*fresh, neighbour]:
            return ",".join(str(n) for n in [path[0], *path[1 + len(fresh):]])
    return answer


def relabel(text: str) -> tuple[str, dict[int, int]]:
    """The puzzle with node names in the generator's layout, and the map from new names back to the given ones.

    A puzzle whose names already all have the generator's width is returned unchanged (identity map). Otherwise the
    names are replaced by random distinct names of that width, seeded by the puzzle text (the same puzzle always
    gets the same names); edge order and the graph are kept. Malformed puzzles raise DreamError.
    """
    edges, centre, goal = parse_input(text)
    nodes = list(dict.fromkeys([n for edge in edges for n in edge]))
    names = names_for(len(nodes))
    if all(n in names for n in nodes):
        return text.strip(), {n: n for n in nodes}
    new = dict(zip(nodes, random.Random(text.strip()).sample(names, len(nodes))))
    return format_input([(new[a], new[b]) for a, b in edges], new[centre], new[goal]), {v: k for k, v in new.items()}


def compact_names(text: str) -> dict[int, int]:
    """A map from the puzzle's node names to 10, 11, ..., 9 + n (n nodes) in a random order seeded by the puzzle
    text: the smallest name set a model can read, so that `edge_view` needs only n(n - 1) edge tokens."""
    return _compact_names(parse_input(text)[0], text)


def _compact_names(edges: list[Edge], text: str) -> dict[int, int]:
    nodes = list(dict.fromkeys([n for edge in edges for n in edge]))
    names = list(range(10, 10 + len(nodes)))
    random.Random(text.strip()).shuffle(names)
    return dict(zip(nodes, names))


def edge_view(text: str) -> tuple[str, dict[int, int]]:
    """The puzzle as an edge-token model reads it, and the map from its names back to the puzzle's.

    Nodes get `compact_names` and every edge is written `a>b` (one token for such a model's tokenizer, see
    `edge_words`), so finding a node's parent is one attention lookup instead of a match on a name followed by a
    hop to its neighbour. The graph, the query and the edge order are unchanged; the path still has to be found.
    """
    edges, centre, goal = parse_input(text)
    new = _compact_names(edges, text)
    view = "|".join(f"{new[a]}>{new[b]}" for a, b in edges) + f"/{new[centre]},{new[goal]}="
    return view, {v: k for k, v in new.items()}


def edge_words(nodes: int) -> list[str]:
    """Tokenizer words of an edge-token model of graphs with up to `nodes` nodes: the names 10..9+nodes and every
    edge `a>b` between two of them."""
    names = range(10, 10 + nodes)
    return [str(n) for n in names] + [f"{a}>{b}" for a in names for b in names if a != b]


def unlabel(answer: str, back: dict[int, int]) -> str:
    """Map an answer path written in `relabel`'s names back to the puzzle's names (unknown names left as written)."""
    path = _parse_path(answer)
    return answer if path is None else ",".join(str(back.get(n, n)) for n in path)


def _parse_path(text: object) -> list[int] | None:
    """A comma-joined list of node names, or None when the text is not one."""
    if not isinstance(text, str):
        return None
    body = text.strip()
    if not _PATH.fullmatch(body) or any(len(tok) > _MAX_DIGITS for tok in body.split(",")):
        return None
    return [int(tok) for tok in body.split(",")]


def solve(text: str) -> list[int]:
    """The centre-to-goal path of a puzzle (breadth-first search)."""
    edges, centre, goal = parse_input(text)
    adjacency = _adjacency(edges)
    parent = {centre: centre}
    queue = deque([centre])
    while queue:
        node = queue.popleft()
        for nxt in sorted(adjacency[node]):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    path = [goal]
    while path[-1] != centre:
        path.append(parent[path[-1]])
    return path[::-1]


def is_valid_solution(input_text: str, answer_text: str) -> bool:
    """True if the answer is a simple path of graph edges from the centre to the goal.

    Raises DreamError for a malformed puzzle (bad data); never raises on a malformed answer (returns False).
    """
    edges, centre, goal = parse_input(input_text)
    path = _parse_path(answer_text)
    if path is None or path[0] != centre or path[-1] != goal or len(set(path)) != len(path):
        return False
    adjacency = _adjacency(edges)
    return all(b in adjacency.get(a, ()) for a, b in zip(path, path[1:]))
