"""Metric families that encode their own sample lines.

A full render builds every collector's families once per array and per session: hundreds
of thousands of families and about a million samples at thousands of arrays. prometheus_client's
families make a Sample with a label dict per sample, which the encoder then sorts and escapes
label by label. `Family` keeps what `add_metric` was given and writes the lines from a
template made once per family name (label names sorted, as prometheus_client writes them), a
whole one-hot block with one format call. It is still a prometheus_client `Metric`: its
`samples` are made on demand, so prometheus_client's own encoders give the same lines (a
test compares them).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from prometheus_client.core import Metric
from prometheus_client.samples import Sample


def encode_value(v: float) -> str:
    if v == 1.0:
        return "1.0"
    if v == 0.0:
        return "0.0"
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class _Template:
    """The line of one sample of a family, as a format string over the label values in the
    order they were declared (the line lists them sorted by name)."""

    __slots__ = ("_one_hot", "labels", "line", "sample")

    def __init__(self, sample: str, labels: tuple[str, ...]):
        self.sample = sample
        self.labels = labels
        self.line = self._format([f"{{{i}}}" for i in range(len(labels))], f"{{{len(labels)}}}")
        self._one_hot: dict[tuple[tuple[str, ...], str | None], str] = {}

    def _format(self, fields: list[str], value: str) -> str:
        """A line as a format string: `fields` (one per label, as declared) and `value` are
        put in as they are."""
        labels = self.labels
        if not labels:
            return f"{self.sample} {value}\n"
        inner = ",".join(
            f'{labels[i]}="{fields[i]}"' for i in sorted(range(len(labels)), key=labels.__getitem__)
        )
        return f"{self.sample}{{{{{inner}}}}} {value}\n"

    def one_hot(self, states: tuple[str, ...], current: str | None) -> str:
        """The lines of a one-hot block (the state is the last label), as a format string over
        the other label values."""
        key = (states, current)
        block = self._one_hot.get(key)
        if block is None:
            others = [f"{{{i}}}" for i in range(len(self.labels) - 1)]
            lines = [(state, 1.0 if state == current else 0.0) for state in states]
            if current is not None and current not in states:
                lines.append((current, 1.0))
            block = "".join(
                self._format([*others, _brace(escape(state))], encode_value(value)) for state, value in lines
            )
            if current is None or current in states:  # not an unknown state: any text sysfs holds
                self._one_hot[key] = block
        return block


def _brace(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


_TEMPLATES: dict[tuple[str, tuple[str, ...]], _Template] = {}


def _template(sample: str, labels: Sequence[str]) -> _Template:
    key = (sample, tuple(labels))
    template = _TEMPLATES.get(key)
    if template is None:
        template = _TEMPLATES[key] = _Template(*key)
    return template


class _Made(threading.local):
    """The families made in this thread while a renderer records them (`recording`)."""

    families: list[Family] | None = None


MADE = _Made()


class Family(Metric):
    """A gauge or a counter whose samples are encoded from templates (see the module's doc).

    Names are fixed identifiers of this package (the tests render every one through
    prometheus_client, which validates them), so they are not validated here again."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], typ: str = "gauge"):
        made = MADE.families
        if made is not None:  # a renderer splits these families' samples by view (exposition)
            made.append(self)
        if typ == "counter" and name.endswith("_total"):
            name = name[:-6]  # as CounterMetricFamily: the samples are NAME_total
        self.name = name
        self.documentation = documentation
        self.unit = ""
        self.type = typ
        self._sample = name + "_total" if typ == "counter" else name
        self._labels = labels  # the template is looked up only if a sample is added (most are not)
        # What was added, in order: (label values, value), or (label values, states, current)
        # for a one-hot block.
        self._added: list[tuple] = []

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self._added.append((labels, value))

    def add_one_hot(self, labels: Sequence[str], states: tuple[str, ...], current: str | None) -> None:
        """One sample per known state (the last label), 1 for the current one; an unknown
        current state gets its own sample after them."""
        self._added.append((labels, states, current))

    @property
    def _template(self) -> _Template:
        return _template(self._sample, self._labels)

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]
        template = self._template
        sample, names = template.sample, template.labels
        samples = []
        for added in self._added:
            if len(added) == 2:
                samples.append(Sample(sample, dict(zip(names, added[0], strict=True)), added[1]))
                continue
            labels, states, current = added
            values = [(state, 1.0 if state == current else 0.0) for state in states]
            if current is not None and current not in states:
                values.append((current, 1.0))
            samples += [Sample(sample, dict(zip(names, [*labels, s], strict=True)), v) for s, v in values]
        return samples

    def encoded(self) -> bytes:
        """The sample lines, exactly as exposition.encode_both writes them for `samples`."""
        if not self._added:
            return b""
        return "".join(self.entry_lines()).encode()

    def entry_lines(self) -> list[str]:
        """The lines of each add_metric / add_one_hot call, in order (a one-hot block is one
        text of several lines): `encoded` joined, or split by whatever added them."""
        added = self._added
        template = _TEMPLATES.get((self._sample, tuple(self._labels))) or self._template
        line = template.line.format
        count = len(template.labels)
        lines = []
        for entry in added:
            labels = entry[0]
            plain = len(entry) == 2
            if len(labels) != (count if plain else count - 1):
                raise ValueError(f"{template.sample}: {len(labels)} label values for {template.labels}")
            joined = "".join(labels)
            if "\\" in joined or "\n" in joined or '"' in joined:
                labels = [escape(v) for v in labels]
            if plain:
                value = entry[1]
                lines.append(
                    line(*labels, "1.0" if value == 1.0 else "0.0" if value == 0.0 else encode_value(value))
                )
            else:
                lines.append(template.one_hot(entry[1], entry[2]).format(*labels))
        return lines


def gauge(name: str, documentation: str, labels: Sequence[str]) -> Family:
    return Family(name, documentation, labels)


def counter(name: str, documentation: str, labels: Sequence[str]) -> Family:
    return Family(name, documentation, labels, "counter")
