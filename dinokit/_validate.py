"""Bounded reading of small structured files, and structural type checks with one-line errors.

Every JSON or YAML file dinokit reads (recipes, ``--set`` values, config.json, meta.json, metadata)
goes through here: its size is checked before it is read, its nesting depth before it is parsed (no
RecursionError), and a YAML file's expanded size after (a "billion laughs" file of shared aliases
is cheap to load but exponential to walk). Errors are one line naming the file (and key) and show a
shortened value (:func:`short`), never the whole expanded one.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 1 << 20  # config.json and other JSON configs: 1 MiB is far beyond any real one
MAX_YAML_BYTES = 256 << 10  # recipes and --set values (YAML parses ~100x slower than JSON); real ones are ~3 KB
MAX_METADATA_BYTES = 64 << 20  # metadata files that list paths (feature files, index metadata)
MAX_DEPTH = 64  # nesting levels; real configs use 3
MAX_NODES = 100_000  # values after YAML alias expansion; a real recipe has about 100

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_short.maxlevel = 3
# strings (with escapes) and then the brackets that nest, for the depth scan of JSON text
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def short(value: Any) -> str:
    """A repr of ``value`` of at most about 100 characters, whatever its size or nesting."""
    return _short.repr(value)


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line (whitespace runs joined) and cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def where(source: str | os.PathLike[str], key: str = "") -> str:
    """``"SOURCE: KEY"`` (either part may be empty) for the start of an error message."""
    parts = [str(p) for p in (source, key) if str(p)]
    return ": ".join(parts) if parts else "<input>"


# ------------------------------------------------------------------------------------ reading


def read_text(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES, what: str = "file",
              error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of ``path``, refusing files over ``max_bytes`` before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, over the {max_bytes}-byte limit for a {what}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder, expected a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or type(e).__name__})") from e
    if len(data) > max_bytes:
        raise error(f"{path}: over the {max_bytes}-byte limit for a {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from e


def json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (strings ignored); linear time, no recursion."""
    depth = best = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        best = max(best, depth)
    return best


def parse_json(text: str, source: str | os.PathLike[str] = "", *, max_depth: int = MAX_DEPTH,
               error: type[Exception] = ValueError) -> Any:
    """``json.loads`` with a depth limit checked first; every failure is ``error("SOURCE: reason")``."""
    expect(text, str, source, error=error)
    if json_depth(text) > max_depth:
        raise error(f"{where(source)}: nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where(source)}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError, MemoryError) as e:  # e.g. an integer of 5000 digits
        raise error(f"{where(source)}: not valid JSON ({type(e).__name__}: {str(e)[:100]})") from e


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH,
              what: str = "JSON file", error: type[Exception] = ValueError) -> Any:
    """Read and parse a JSON file within size and depth limits (one-line errors naming ``path``)."""
    return parse_json(read_text(path, max_bytes=max_bytes, what=what, error=error), path,
                      max_depth=max_depth, error=error)


def yaml_depth(text: str, source: str | os.PathLike[str] = "", error: type[Exception] = ValueError,
               max_depth: int | None = None) -> int:
    """The deepest collection nesting of YAML ``text`` from its token stream (no recursion).

    With ``max_depth`` the scan stops at the first token past it (PyYAML's scanner slows down
    with each open flow level, so a 100000-deep file must not be scanned to its end).
    """
    import yaml  # PyYAML: only the recipe and --set paths need it

    opens = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
             yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
    closes = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    depth = best = 0
    try:
        for tok in yaml.scan(text, Loader=_safe_loader()):
            if isinstance(tok, opens):
                depth += 1
                best = max(best, depth)
                if max_depth is not None and depth > max_depth:
                    break
            elif isinstance(tok, closes):
                depth -= 1
    except yaml.YAMLError as e:
        raise error(f"{where(source)}: not valid YAML ({_yaml_reason(e)})") from e
    except UnicodeError as e:  # e.g. a --set argument holding undecodable bytes (surrogate escapes)
        raise error(f"{where(source)}: not valid text ({type(e).__name__} at position {getattr(e, 'start', '?')})") from e
    return best


def _safe_loader() -> Any:
    """PyYAML's safe loader, the libyaml (C) one when built: the same documents, about 10x faster."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader) if yaml.__with_libyaml__ else yaml.SafeLoader


def _yaml_reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines[:2])[:200] or type(e).__name__


def parse_yaml(text: str, source: str | os.PathLike[str] = "", *, max_depth: int = MAX_DEPTH,
               max_nodes: int = MAX_NODES, error: type[Exception] = ValueError) -> Any:
    """``yaml.safe_load`` with depth checked before and expanded size after; one-line errors."""
    import yaml  # PyYAML: only the recipe and --set paths need it

    expect(text, str, source, error=error)
    if yaml_depth(text, source, error, max_depth) > max_depth:
        raise error(f"{where(source)}: nested deeper than {max_depth} levels")
    try:
        data = yaml.load(text, Loader=_safe_loader())  # a SafeLoader: yaml.safe_load, in C when built
    except yaml.YAMLError as e:
        raise error(f"{where(source)}: not valid YAML ({_yaml_reason(e)})") from e
    except (RecursionError, MemoryError, ValueError, OverflowError) as e:
        raise error(f"{where(source)}: not valid YAML ({type(e).__name__})") from e
    check_tree(data, source, max_nodes=max_nodes, max_depth=max_depth, error=error)
    return data


def read_yaml(path: str | os.PathLike[str], *, max_bytes: int = MAX_YAML_BYTES, max_depth: int = MAX_DEPTH,
              max_nodes: int = MAX_NODES, what: str = "YAML file", error: type[Exception] = ValueError) -> Any:
    """Read and parse a YAML (or JSON) file within size, depth and expansion limits."""
    text = read_text(path, max_bytes=max_bytes, what=what, error=error)
    return parse_yaml(text, path, max_depth=max_depth, max_nodes=max_nodes, error=error)


def check_tree(data: Any, source: str | os.PathLike[str] = "", *, max_nodes: int = MAX_NODES,
               max_depth: int = MAX_DEPTH, error: type[Exception] = ValueError) -> int:
    """Count the values in ``data`` as a tree (shared aliases counted each time); error past the limits."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise error(f"{where(source)}: expands to more than {max_nodes} values (nested YAML aliases?)")
        if depth > max_depth:
            raise error(f"{where(source)}: nested deeper than {max_depth} levels")
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return count


# ------------------------------------------------------------------------------------ type checks

_TYPE_WORDS = {dict: "a mapping", Mapping: "a mapping", list: "a list", str: "a string", int: "an integer",
               tuple: "a list", float: "a number", bool: "true or false", type(None): "null"}


def type_name(value: Any) -> str:
    """A JSON-ish name for the type of ``value`` (mapping, list, string, ...)."""
    for tp, word in (((bool,), "boolean"), ((Mapping,), "mapping"), ((list, tuple), "list"), ((str,), "string"),
                     ((int,), "integer"), ((float,), "number"), ((type(None),), "null")):
        if isinstance(value, tp):
            return word
    return type(value).__name__


def expect(value: Any, types: type | tuple[type, ...], source: str | os.PathLike[str], key: str = "",
           *, error: type[Exception] = ValueError) -> Any:
    """``value`` when it is one of ``types`` (bool is not a number here), else ``error`` naming source and key."""
    tps = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, tps) and not (isinstance(value, bool) and bool not in tps)
    if not ok:
        want = " or ".join(dict.fromkeys(_TYPE_WORDS.get(t, t.__name__) for t in tps))
        raise error(f"{where(source, key)}: expected {want}, got {type_name(value)} {short(value)}")
    return value


def expect_mapping(value: Any, source: str | os.PathLike[str], key: str = "", *,
                   error: type[Exception] = ValueError) -> dict[str, Any]:
    """A mapping with string keys, else ``error`` naming source and key."""
    expect(value, Mapping, source, key, error=error)
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise error(f"{where(source, key)}: keys must be strings, got {short(bad[0])}")
    return dict(value)


def _expect_numbers(value: Any, source: str | os.PathLike[str], key: str, n: int | None,
                    error: type[Exception]) -> None:
    expect(value, (list, tuple), source, key, error=error)
    if n is not None and len(value) != n:
        raise error(f"{where(source, key)}: expected {n} numbers, got {short(value)}")
    for i, v in enumerate(value):
        expect(v, (int, float), source, f"{key}[{i}]", error=error)


def check_model_config(config: Any, source: str | os.PathLike[str], *,
                       error: type[Exception] = ValueError) -> dict[str, Any]:
    """Type-check the fields of a model ``config.json`` (timm/dinokit or HF transformers) that
    dinokit reads; returns it as a dict. Errors name ``source`` and the key."""
    cfg = expect_mapping(config, source, error=error)
    for key in ("architecture", "model_type", "pretrained_cfg.interpolation", "pretrained_cfg.crop_mode"):
        section, _, name = key.rpartition(".")
        holder = cfg.get(section) if section else cfg
        if isinstance(holder, Mapping) and holder.get(name) is not None:
            expect(holder[name], str, source, key, error=error)
    for key in ("model_args", "pretrained_cfg", "dinokit"):
        if cfg.get(key) is not None:
            expect_mapping(cfg[key], source, key, error=error)
    if cfg.get("num_attention_heads") is not None:
        expect(cfg["num_attention_heads"], int, source, "num_attention_heads", error=error)
    pcfg = cfg.get("pretrained_cfg") or {}
    for name, n in (("input_size", 3), ("mean", None), ("std", None)):
        if pcfg.get(name) is not None:
            _expect_numbers(pcfg[name], source, f"pretrained_cfg.{name}", n, error)
    if pcfg.get("crop_pct") is not None:
        expect(pcfg["crop_pct"], (int, float), source, "pretrained_cfg.crop_pct", error=error)
    return cfg
