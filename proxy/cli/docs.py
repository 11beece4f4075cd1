"""The README's reference tables, generated from the code, so that they cannot drift from it.

    python -m proxy.cli.docs            # rewrite the marked regions of README.md
    python -m proxy.cli.docs --check    # exit 1, naming the regions, when README.md differs

Two regions, each between `<!-- NAME:begin -->` and `<!-- NAME:end -->`:

    metrics   every series on /metrics: the proxy's registry as built by the app for a dedicated
              topology, a pool and connector lmcache (some series exist only there), with each
              family's type, labels and help text
    config    every configuration key of the pydantic models (proxy.config): type, constraints,
              default and the field's description
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from proxy.config import ProxyConfig, load_config

README = Path(__file__).resolve().parents[2] / "README.md"
ENGINES = ["http://127.0.0.1:7100", "http://127.0.0.1:7200"]
# the topologies whose registries together hold every series: key -> (where, config overrides)
TOPOLOGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "dedicated": ("always", {"prefill": ENGINES[:1], "decode": ENGINES[1:]}),
    "pool": ("with a pool", {"pool": ENGINES}),
    "lmcache": (
        "connector lmcache",
        {"prefill": ENGINES[:1], "decode": ENGINES[1:], "connector": "lmcache"},
    ),
    "kubernetes": (
        "discovery.source kubernetes",
        {
            "discovery": {
                "source": "kubernetes",
                "selectors": {"decode": "role=decode"},
                "leader": {"identity": "docs"},
            }
        },
    ),
}


@dataclass(frozen=True)
class MetricDoc:
    series: str  # as exposed: counters end in _total; histograms add _bucket, _sum, _count
    type: str
    labels: tuple[str, ...]
    help: str


def registry_docs(registry: CollectorRegistry) -> list[MetricDoc]:
    """Every family a registry exposes, labels included even before any sample exists."""
    docs = []
    for collector in list(registry._collector_to_names):  # no public listing of collectors
        if isinstance(collector, MetricWrapperBase):
            name, kind = collector._name, str(collector._type)
            labels = tuple(collector._labelnames)
            docs.append(MetricDoc(exposed(name, kind), kind, labels, collector._documentation))
        else:
            for family in collector.collect():
                labels = tuple(getattr(family, "_labelnames", ()))
                docs.append(
                    MetricDoc(exposed(family.name, family.type), family.type, labels,
                              family.documentation)
                )  # fmt: skip
    return docs


def exposed(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


def metric_docs() -> list[tuple[MetricDoc, str]]:
    """Each series once, in registration order, with where it exists."""
    from proxy.app import ProxyApp  # the whole app: imported only to document it

    seen: dict[str, tuple[MetricDoc, str]] = {}
    for where, overrides in TOPOLOGIES.values():
        app = ProxyApp(load_config(None, **overrides))
        for doc in registry_docs(app.metrics.registry):
            seen.setdefault(doc.series, (doc, where))
    return list(seen.values())


def metrics_table() -> str:
    rows = [
        "| series | type | labels | exists | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for doc, where in metric_docs():
        labels = ", ".join(f"`{label}`" for label in doc.labels) or "-"
        rows.append(f"| `{doc.series}` | {doc.type} | {labels} | {where} | {cell(doc.help)} |")
    return "\n".join(rows)


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigDoc:
    key: str
    type: str
    default: str
    description: str


def config_docs(model: type[BaseModel] = ProxyConfig, prefix: str = "") -> list[ConfigDoc]:
    docs: list[ConfigDoc] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        nested = _model_of(field.annotation)
        if nested is not None:
            docs.extend(config_docs(nested, key + "."))
            continue
        docs.append(ConfigDoc(key, type_text(field), default_text(field), field.description or ""))
        optional = _model_of(_without_none(field.annotation))
        if optional is not None:  # a section that may be left out: its keys when given
            docs.extend(config_docs(optional, key + "."))
        item = _list_item_model(field.annotation)
        if item is not None:
            for sub, sub_field in item.model_fields.items():
                if sub == "lmcache" and name != "decode":
                    continue  # a receiver's ports: decoders only (ProxyConfig._check_lmcache)
                sub_nested = _model_of(_without_none(sub_field.annotation))
                if sub_nested is not None:
                    docs.extend(config_docs(sub_nested, f"{key}[].{sub}."))
                else:
                    text = sub_field.description or ""
                    docs.append(ConfigDoc(f"{key}[].{sub}", type_text(sub_field),
                                          default_text(sub_field), text))  # fmt: skip
    return docs


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _without_none(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if _is_union(annotation) and len(args) == 1:
        return args[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (typing.Union, types.UnionType)


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if get_origin(annotation) is tuple:
        return _model_of(get_args(annotation)[0])
    return None


def annotation_text(annotation: Any) -> str:
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation is str:
        return "string"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in get_args(annotation))
    if _is_union(annotation):
        args = [a for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(annotation_text(a) for a in args)
        return text + ", or none" if len(args) < len(get_args(annotation)) else text
    if get_origin(annotation) is tuple:
        item = get_args(annotation)[0]
        model = _model_of(item)
        if model is not None:
            return "list of URLs, or of {" + ", ".join(model.model_fields) + "}"
        return f"list of {annotation_text(item)}s"
    return getattr(annotation, "__name__", str(annotation))


def type_text(field: FieldInfo) -> str:
    bounds = []
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Ge):
            bounds.append(f"≥ {number(meta.ge)}")
        elif isinstance(meta, annotated_types.Gt):
            bounds.append(f"> {number(meta.gt)}")
        elif isinstance(meta, annotated_types.Le):
            bounds.append(f"≤ {number(meta.le)}")
        elif isinstance(meta, annotated_types.Lt):
            bounds.append(f"< {number(meta.lt)}")
    text = annotation_text(field.annotation)
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def number(value: Any) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:g}".replace("e+0", "e").replace("e+", "e")
    return str(value)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(see meaning)"  # computed at start-up, e.g. from the environment
    if field.is_required():
        return "required"
    value = field.default
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, (int, float)):
        return number(value)
    return f"`{value}`"


def config_table() -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for doc in config_docs():
        rows.append(f"| `{doc.key}` | {doc.type} | {doc.default} | {cell(doc.description)} |")
    return "\n".join(rows)


# --- the README ----------------------------------------------------------------------------


def cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


REGIONS = {"metrics": metrics_table, "config": config_table}


def region(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:begin -->\n)(.*?)(<!-- {name}:end -->)", re.DOTALL)


def render(readme: str) -> str:
    """The README with every region's content generated anew."""
    for name, table in REGIONS.items():
        pattern = region(name)
        if not pattern.search(readme):
            raise ValueError(f"README has no '<!-- {name}:begin -->' ... '<!-- {name}:end -->'")
        body = table()

        def fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + "\n" + m.group(3)

        readme = pattern.sub(fill, readme)
    return readme


def stale(readme: str) -> list[str]:
    """The regions whose content differs from what the code generates."""
    fresh = render(readme)
    out = []
    for name in REGIONS:
        old, new = region(name).search(readme), region(name).search(fresh)
        if old is None or new is None or old.group(2) != new.group(2):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.cli.docs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--check", action="store_true", help="only say whether README is stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    try:
        differ = stale(text)
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if differ:
            print(f"{args.readme}: the {' and '.join(differ)} reference differs from the code; "
                  "run 'python -m proxy.cli.docs'", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    args.readme.write_text(render(text))
    print(f"{args.readme}: {' and '.join(REGIONS)} references written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
