"""Turns a preprocessed .metal translation unit into C++ for the emulator.

The rewrite keeps every line where it was (the preprocessor's line markers then point diagnostics at
the .metal source) and changes only what plain C++ cannot express:

* `[[kernel]]` signatures: the `[[buffer(n)]]`, `[[threadgroup(n)]]` and builtin attributes are
  recorded in a parameter table and removed;
* `template [[host_name("name")]] [[kernel]] decltype(f<...>) f<...>;` becomes a registration of
  `f<...>` under that name (non-template kernels register under their own name);
* `threadgroup T name[N];` inside a kernel becomes a reference into the threadgroup's memory;
* vector constructors `float4(...)` become `vector_of<float4>(...)` (clang's functional cast would
  reinterpret `float4(int4)` instead of converting), and half literals `1.5h` become `half(1.5f)`.
"""
from __future__ import annotations

import itertools
import re

_BUILTINS = {
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "threads_per_simdgroup",
    "simdgroups_per_threadgroup",
}
_KERNEL = re.compile(r"\[\[\s*kernel\s*\]\]\s*void\s+(\w+)\s*\(")
_INSTANCE = re.compile(r"template\s*\[\[\s*host_name\s*\(((?:\s*\"[^\"]*\")+)\s*\)\s*\]\]\s*\[\[\s*kernel\s*\]\]\s*decltype\s*\(")
_ATTRIBUTE = re.compile(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]")
_THREADGROUP_DECL = re.compile(r"\bthreadgroup\s+([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]\n]+\])*)\s*;")


_VECTOR_CTOR = re.compile(r"(?<![\w:.])((?:float|half|bfloat|int|uint|short|ushort|char|uchar|ulong)[234])\s*\(")
_HALF_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)[hH]\b")


class RewriteError(ValueError):
    pass


def _closing(text: str, open_paren: int) -> int:
    """Index of the parenthesis closing the one at open_paren."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise RewriteError("unbalanced parentheses")


def _split_top_level(params: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        depth += {"(": 1, "<": 1, "[": 1, ")": -1, ">": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    if params.strip():
        parts.append(params[start:])
    return parts


def _param_entry(kernel: str, param: str) -> str:
    attr = _ATTRIBUTE.search(param)
    if not attr:
        raise RewriteError(f"kernel {kernel}: parameter `{param.strip()}` has no [[buffer]]/builtin attribute")
    name, index = attr.group(1), attr.group(2)
    if name == "buffer" and index is not None:
        return f"{{::msl_emu::ParamKind::buffer, {index}}}"
    if name == "threadgroup" and index is not None:
        return f"{{::msl_emu::ParamKind::threadgroup_memory, {index}}}"
    if name in _BUILTINS:
        return f"{{::msl_emu::ParamKind::builtin, int(::msl_emu::Builtin::{name})}}"
    raise RewriteError(f"kernel {kernel}: unsupported parameter attribute [[{attr.group(0)[2:-2]}]]")


def rewrite(source: str) -> str:
    """Returns the C++ source for a preprocessed .metal translation unit."""
    text = source
    tables: dict[str, list[str]] = {}
    plain: list[str] = []  # kernels that are not templates register under their own name
    out, pos = [], 0
    for m in _KERNEL.finditer(text):
        close = _closing(text, m.end() - 1)
        params = _split_top_level(text[m.end():close])
        tables[m.group(1)] = [_param_entry(m.group(1), p) for p in params]
        out.append(text[pos:m.end()])
        out.append(",".join(_ATTRIBUTE.sub("", p) for p in params))
        pos = close
        if not text[:m.start()].rstrip().endswith(">"):  # not `template <...> [[kernel]]`
            plain.append(m.group(1))
    out.append(text[pos:])
    text = "".join(out)

    serial = itertools.count()  # unique C++ identifiers for the generated statements

    def register(name: str, function: str, instance: str) -> str:
        n, table = next(serial), tables[function]
        return (
            f"static constexpr ::msl_emu::Param msl_emu_params_{n}[] = {{{', '.join(table)}}}; "
            f"static_assert(::msl_emu::arity(&{instance}) == {len(table)}); "
            f"static ::msl_emu::Registrar msl_emu_registrar_{n}({name}, "
            f"&::msl_emu::invoke<&{instance}, msl_emu_params_{n}>);"
        )

    out, pos = [], 0
    for m in _INSTANCE.finditer(text):
        close = _closing(text, m.end() - 1)
        instance = text[m.end():close].strip()
        tail = re.compile(r"\s*" + re.escape(instance).replace(r"\ ", r"\s*") + r"\s*;").match(text, close + 1)
        if not tail:
            raise RewriteError(f"cannot parse the instantiation of {instance}")
        function = instance.split("<")[0].strip()
        if function not in tables:
            raise RewriteError(f"{instance}: no [[kernel]] named {function}")
        name = m.group(1).strip()
        statement = text[m.start():tail.end()]
        out.append(text[pos:m.start()] + register(name, function, instance) + "\n" * statement.count("\n"))
        pos = tail.end()
    out.append(text[pos:])
    text = "".join(out)
    suffix = "".join(register(f'"{k}"', k, k) for k in plain)

    def threadgroup_reference(m: re.Match) -> str:
        type_, name, dims = m.group(1), m.group(2), m.group(3)
        return (
            f"threadgroup {type_} (&{name}){dims} = *(threadgroup {type_} (*){dims})"
            f"msl_emu_threadgroup_alloc({next(serial)}, sizeof({type_}{dims}), alignof({type_}));"
        )

    text = _THREADGROUP_DECL.sub(threadgroup_reference, text)
    text = _VECTOR_CTOR.sub(r"::metal::detail::vector_of<\1>(", text)
    text = _HALF_LITERAL.sub(lambda m: f"half({m.group(1)}{'' if re.search('[.eE]', m.group(1)) else '.'}f)", text)
    return '#include "msl_emu.h"\n' + text + "\n" + suffix + "\n"
