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

It also enforces the Metal rules that are visible in the text (RewriteError, naming the .metal line):
kernel signatures (void return; [[buffer(n)]] / [[threadgroup(n)]] indices 0..30 and parameters that
are pointers or references with the address space spelled in the signature; builtin attributes of
the types Metal allows) and the statements Metal lacks (goto, noexcept). With conformance=True the
result is the variant the conformance pass parses in clang's C++ for OpenCL mode: the same text
against conformance/msl_conformance.h, the host-name instantiations kept as explicit instantiations.
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


# Types each builtin attribute may be declared with (MSL 3.1, "Attributes for kernel function input
# arguments"): the grid / threadgroup coordinates and sizes are uint or ushort scalars or 2-/3-vectors,
# the indices and SIMD-group counts uint or ushort.
_COORDINATE = {"uint", "uint2", "uint3", "ushort", "ushort2", "ushort3"}
_INDEX = {"uint", "ushort"}
_BUILTIN_TYPES = {
    "thread_position_in_grid": _COORDINATE,
    "thread_position_in_threadgroup": _COORDINATE,
    "threadgroup_position_in_grid": _COORDINATE,
    "threads_per_threadgroup": _COORDINATE,
    "threadgroups_per_grid": _COORDINATE,
    "threads_per_grid": _COORDINATE,
    "thread_index_in_threadgroup": _INDEX,
    "thread_index_in_simdgroup": _INDEX,
    "simdgroup_index_in_threadgroup": _INDEX,
    "threads_per_simdgroup": _INDEX,
    "simdgroups_per_threadgroup": _INDEX,
}
# Entries of a compute function's buffer and threadgroup-memory argument tables (Metal feature set
# tables: 31 each), so [[buffer(n)]] and [[threadgroup(n)]] take n in 0..30.
_ARGUMENT_TABLE = {"buffer": 31, "threadgroup": 31}
_ANY_KERNEL = re.compile(r"\[\[\s*kernel\s*\]\](?!\s*decltype\b)")
_LINE_MARKER = re.compile(r'^#\s*(\d+)\s+"([^"]*)"', re.M)
_STRING = re.compile(r'"(?:\\.|[^"\\\n])*"')
# Statements and specifiers Metal lacks that C++ for OpenCL accepts (MSL 3.1, "Restrictions").
_FORBIDDEN = {"goto": "Metal has no goto", "noexcept": "Metal has no noexcept"}


class RewriteError(ValueError):
    pass


def _location(text: str, offset: int) -> str:
    """`file:line` of text[offset] in the .metal source, from the preprocessor's line markers."""
    line, name, start = 1, "<source>", 0
    for m in _LINE_MARKER.finditer(text, 0, offset):
        line, name, start = int(m.group(1)), m.group(2), text.find("\n", m.end()) + 1
    return f"{name}:{line + text.count(chr(10), start, offset)}"


def _error(text: str, offset: int, message: str) -> RewriteError:
    return RewriteError(f"{_location(text, offset)}: error: {message}")


def _without_template_arguments(type_: str) -> str:
    while True:
        stripped = re.sub(r"<[^<>]*>", "", type_)
        if stripped == type_:
            return type_
        type_ = stripped


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


def _param_entry(kernel: str, param: str, fail) -> str:
    """The parameter-table entry of one kernel parameter; fail(message) raises at its .metal line."""
    attr = _ATTRIBUTE.search(param)
    spelled = " ".join(param.split())
    if not attr:
        raise fail(f"kernel {kernel}: parameter `{spelled}` has no [[buffer]]/builtin attribute")
    name, index = attr.group(1), attr.group(2)
    declaration = _without_template_arguments(" ".join(_ATTRIBUTE.sub("", param).split()))
    type_ = re.sub(r"\s*\b\w+$", "", declaration)  # without the parameter's name
    if name in _ARGUMENT_TABLE and index is not None:
        if int(index) >= _ARGUMENT_TABLE[name]:
            raise fail(f"kernel {kernel}: [[{name}({index})]] is outside the argument table "
                       f"(indices 0..{_ARGUMENT_TABLE[name] - 1})")
        spaces = ("device", "constant") if name == "buffer" else ("threadgroup",)
        if not (re.search(r"[*&]", type_) and any(re.search(rf"\b{s}\b", type_) for s in spaces)):
            raise fail(f"kernel {kernel}: [[{name}({index})]] parameter `{' '.join(_ATTRIBUTE.sub('', param).split())}`"
                       f" must be a pointer or reference to {' or '.join(spaces)} memory, with the address space"
                       f" spelled in the signature (not hidden in a template argument)")
        kind = "buffer" if name == "buffer" else "threadgroup_memory"
        return f"{{::msl_emu::ParamKind::{kind}, {index}}}"
    if name in _BUILTINS:
        scalar = re.sub(r"\bconst\b", "", type_).strip()
        if scalar not in _BUILTIN_TYPES[name]:
            raise fail(f"kernel {kernel}: [[{name}]] cannot be declared `{scalar}` "
                       f"(Metal allows {', '.join(sorted(_BUILTIN_TYPES[name]))})")
        return f"{{::msl_emu::ParamKind::builtin, int(::msl_emu::Builtin::{name})}}"
    raise fail(f"kernel {kernel}: unsupported parameter attribute [[{attr.group(0)[2:-2]}]]")


def _check_text(text: str) -> None:
    """Rules visible in the text itself: kernels return void; no goto, no noexcept."""
    for m in _ANY_KERNEL.finditer(text):
        if not re.match(r"\s*void\b", text[m.end():m.end() + 100]):
            raise _error(text, m.start(), "a [[kernel]] function must return void")
    blanked = _STRING.sub(lambda m: " " * len(m.group(0)), _LINE_MARKER.sub(lambda m: " " * len(m.group(0)), text))
    for word, message in _FORBIDDEN.items():
        m = re.search(rf"\b{word}\b", blanked)
        if m:
            raise _error(text, m.start(), f"`{word}`: {message}")


def rewrite(source: str, conformance: bool = False) -> str:
    """Returns the C++ source for a preprocessed .metal translation unit (for the conformance pass
    with conformance=True); raises RewriteError naming the .metal line of a Metal rule it breaks."""
    text = source
    _check_text(text)
    tables: dict[str, list[str]] = {}
    plain: list[str] = []  # kernels that are not templates register under their own name
    out, pos = [], 0
    for m in _KERNEL.finditer(text):
        close = _closing(text, m.end() - 1)
        params = _split_top_level(text[m.end():close])
        starts = itertools.accumulate([m.end()] + [len(p) + 1 for p in params])
        tables[m.group(1)] = [
            _param_entry(m.group(1), p, lambda message, at=at + len(p) - len(p.lstrip()): _error(text, at, message))
            for p, at in zip(params, starts)]
        out.append(text[pos:m.end()])
        out.append(",".join(_ATTRIBUTE.sub("", p) for p in params))
        pos = close
        if not text[:m.start()].rstrip().endswith(">"):  # not `template <...> [[kernel]]`
            plain.append(m.group(1))
    out.append(text[pos:])
    text = "".join(out)

    serial = itertools.count()  # unique C++ identifiers for the generated statements

    def register(name: str, function: str, instance: str) -> str:
        if conformance:  # no registry: an explicit instantiation, so the templates are checked
            return f"template decltype({instance}) {instance};"
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
            raise _error(text, m.start(), f"cannot parse the instantiation of {instance}")
        function = instance.split("<")[0].strip()
        if function not in tables:
            raise _error(text, m.start(), f"{instance}: no [[kernel]] named {function}")
        name = m.group(1).strip()
        statement = text[m.start():tail.end()]
        out.append(text[pos:m.start()] + register(name, function, instance) + "\n" * statement.count("\n"))
        pos = tail.end()
    out.append(text[pos:])
    text = "".join(out)
    suffix = "" if conformance else "".join(register(f'"{k}"', k, k) for k in plain)

    def threadgroup_reference(m: re.Match) -> str:
        type_, name, dims = m.group(1), m.group(2), m.group(3)
        return (
            f"threadgroup {type_} (&{name}){dims} = *(threadgroup {type_} (*){dims})"
            f"msl_emu_threadgroup_alloc({next(serial)}, sizeof({type_}{dims}), alignof({type_}));"
        )

    text = _THREADGROUP_DECL.sub(threadgroup_reference, text)
    text = _VECTOR_CTOR.sub(r"::metal::detail::vector_of<\1>(", text)
    text = _HALF_LITERAL.sub(lambda m: f"half({m.group(1)}{'' if re.search('[.eE]', m.group(1)) else '.'}f)", text)
    header = "msl_conformance.h" if conformance else "msl_emu.h"
    return f'#include "{header}"\n' + text + "\n" + suffix + "\n"
