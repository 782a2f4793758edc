"""Reading a service's Prometheus exposition in tests, with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape of a /metrics endpoint: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        families = text_string_to_metric_families(text)
        self.samples = [(s.name, dict(s.labels), float(s.value)) for fam in families for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples of that name whose labels include `labels` (0 when there are none)."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())
