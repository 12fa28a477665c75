"""YAML application specs, read strictly: dates stay strings, a key written twice is a
problem, and aliases may not expand a small text into a huge tree ("billion laughs").

Apart from ``meshorch/apps/spec.py`` so that PyYAML is imported at the first YAML spec
only: an agent that is given JSON specs (the hub's deltas, the API's JSON) never loads it.
"""

from __future__ import annotations

import yaml


class UnreadableYaml(ValueError):
    """The document is not valid YAML, is empty, or expands past the node limit."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps dates as strings and records duplicate keys.

    ``version: 2024-05-01`` stays the string it looks like, and a key written twice is a
    problem instead of the silent last-one-wins of YAML loaders.
    """

    duplicates: list[str]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    self.duplicates.append(f"line {line}: duplicate key {key_node.value!r}")
                seen.add(key)
        return dict(super().construct_mapping(node, deep=deep))


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str, max_nodes: int) -> tuple[object, list[str]]:
    """The document's data and its duplicate keys (``line N: duplicate key 'k'``).

    Raises ``UnreadableYaml`` when it cannot be read or expands past ``max_nodes`` nodes.
    """
    loader: _Loader | None = None
    try:
        # The reader refuses control characters as it is built: inside the try, so they
        # are an unreadable document (400), not an error of the caller (500).
        loader = _Loader(text)
        loader.duplicates = []
        node = loader.get_single_node()
        if node is None:
            raise UnreadableYaml("the document is empty")
        size = _expanded_size(node, {}, set(), max_nodes)
        if size > max_nodes:
            raise UnreadableYaml(f"expands to {size} YAML nodes, the limit is {max_nodes}")
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise UnreadableYaml(f"not valid YAML: {where}{what}") from exc
    except UnreadableYaml:
        raise
    except (yaml.YAMLError, ValueError) as exc:
        raise UnreadableYaml(f"not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise UnreadableYaml("nested too deeply") from exc
    finally:
        if loader is not None:
            loader.dispose()
    return data, loader.duplicates


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int], cap: int) -> int:
    """Nodes in the tree once aliases are expanded; aliases share nodes, hence the memo."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ValueError("recursive alias")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, sizes, active, cap) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(
            _expanded_size(k, sizes, active, cap) + _expanded_size(v, sizes, active, cap)
            for k, v in node.value
        )
    else:
        size = 1
    active.discard(key)
    sizes[key] = min(size, cap + 1)  # capped so huge counts stay cheap
    return sizes[key]
