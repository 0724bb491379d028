"""Write bench/README.md: one table of every benchmark's figure, its SPEC §14 target, the
machine and the command, read from the JSON files in bench/results/ (`make bench` runs this
last). A result that is missing is listed as not yet run, never guessed.

Run from the repository root: `python bench/summary.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
Row = tuple[str, str, bool | None]  # figure, target, met


def _api(d: dict[str, Any]) -> Row:
    one, two = d["runs"]["1"], d["runs"].get("2", {})
    read = one["get_record"]
    figure = (f"1 worker: GET /records/{{id}} {read['requests_per_second']:.0f} req/s, "
              f"{one['read_ratio_to_healthz']} of /healthz (p50 {read.get('p50_ms')} ms, "
              f"p99 {read['p99_ms']} ms); POST {one['write_ratio_to_healthz']} of /healthz")
    paced = one.get("get_record_paced")
    if paced:
        figure += (f"; paced ({paced['pause_between_requests_ms']} ms between a connection's "
                   f"requests, {paced['requests_per_second']:.0f} req/s): p99 "
                   f"{paced['p99_ms']} ms")
    if "scale_out_get_record_2_over_1" in d:
        figure += f"; 2 workers: {d['scale_out_get_record_2_over_1']}x the reads of 1"
        if "scale_out_cpu_bound_2_over_1" in d:
            figure += (f" (the 2 cores allow {d['scale_out_cpu_bound_2_over_1']}x at the CPU "
                       "costs measured)")
    met = all(one["meets_targets"].values()) and all(two.get("meets_targets", {}).values()) \
        and d.get("meets_scale_out", True)
    return figure, "reads ≥ 0.40, writes ≥ 0.25 of /healthz, p99 < 50 ms; 2 workers ≥ 1.4x", met


def _api_cpu(d: dict[str, Any]) -> Row:
    runs, rel = d["runs"], d["cpu_relative_to_healthz"]
    return (f"worker CPU per request in process: GET /records/{{id}} "
            f"{runs['get_record']['cpu_ms_per_request']} ms ({rel['get_record']}x /healthz), "
            f"POST {runs['post_record']['cpu_ms_per_request']} ms ({rel['post_record']}x)",
            "none (where a request's CPU goes; api.json holds the targets)", None)


def _audit_append(d: dict[str, Any]) -> Row:
    pg = d["append"]["postgres"]
    return (f"{pg['queued_and_chained_per_second']}/s queued and chained vs "
            f"{pg['plain_inserts_per_second']}/s plain inserts ({pg['ratio']}), merge delay "
            f"max {pg['merge_delay_ms']['max']} ms",
            "≥ 0.80; merge delay ≤ 1 s", pg["meets_target"])


def _audit_verify(d: dict[str, Any]) -> Row:
    v = d["verify"]
    full = v["postgres"]["full"]
    return (f"{full['events_per_second_median']:,} events/s over {full['events']:,} events "
            f"(median of {full['rounds']})", "≥ 200,000 events/s", v["meets_target_postgres"])


def _audit_search(d: dict[str, Any]) -> Row:
    return (f"worst filtered page with its total, p95: {d['worst_page_plus_total_p95_ms']} ms "
            f"over {d['events']:,} events", f"well under {d['target_ms_per_page']:.0f} ms",
            d["meets_target"])


def _crypto(d: dict[str, Any]) -> Row:
    return (f"envelope seal+open {d['ratio_to_ideal_envelope']} of inline AES-GCM",
            f"≥ {d['target']}", d["meets_target"])


def _attachments(d: dict[str, Any]) -> Row:
    return (f"streaming seal {d['seal_ratio_to_bare_aesgcm']}, open "
            f"{d['open_ratio_to_bare_aesgcm']} of bare AES-GCM", f"≥ {d['target']}",
            d["meets_target"])


def _auth(d: dict[str, Any]) -> Row:
    return (f"refresh rotation {d['ours_rotations_per_second']}/s vs bcrypt-hashed tokens "
            f"{d['naive_bcrypt_rotations_per_second']}/s ({d['ratio']}x)",
            f"≥ {d['target_ratio']}x", d["meets_target"])


def _login_storm(d: dict[str, Any]) -> Row:
    return (f"reads during a login storm: p99 {d['reads_during_storm']['p99_ms']} ms (alone "
            f"{d['reads_alone']['p99_ms']} ms)", f"p99 < {d['target_p99_ms']:.0f} ms",
            d["meets_target"])


def _rewrap(d: dict[str, Any]) -> Row:
    return (f"{d['rewrapped_per_second']:,} data keys/s over {d['deks']:,} while serving",
            f"≥ {d['target_per_second']:,}/s", d["meets_target"])


def _export(d: dict[str, Any]) -> Row:
    json_, fhir = d["memory"]["json"], d["memory"]["fhir"]
    return (f"GDPR export peak memory for a {json_['document_ratio_large_to_small']}x larger "
            f"document: {json_['tracemalloc_peak_ratio_large_to_small']}x (JSON), "
            f"{fhir['tracemalloc_peak_ratio_large_to_small']}x (FHIR)",
            "constant memory", d.get("memory_flat"))


TABLE: list[tuple[str, str, Callable[[dict[str, Any]], Row]]] = [
    ("api.json", "API (HTTPS, PostgreSQL, wrk 32 connections)", _api),
    ("api_cpu.json", "API worker CPU (in process)", _api_cpu),
    ("audit.json", "audit append", _audit_append),
    ("audit.json", "audit verify", _audit_verify),
    ("audit_search.json", "audit search", _audit_search),
    ("crypto.json", "envelope encryption", _crypto),
    ("attachments.json", "attachment streaming", _attachments),
    ("auth.json", "refresh-token rotation", _auth),
    ("login_storm.json", "login storm", _login_storm),
    ("rewrap.json", "key rotation (rewrap)", _rewrap),
    ("export.json", "GDPR export", _export),
]


def _part(d: dict[str, Any], name: str) -> dict[str, Any]:
    """The part of a result a row reads (audit.json holds two benchmarks)."""
    return d.get(name.split()[-1], d) if name.startswith("audit ") and "append" in d else d


def render() -> str:
    lines = ["# Benchmark results", "",
             "Written by `python bench/summary.py` (the last step of `make bench`) from the JSON "
             "files beside it; each file holds its method and full figures. Figures are from "
             "one run on the machine named, where the load generator and the database share "
             "the cores; a shared machine's noise moves them by 10-20 %.", "",
             "| benchmark | figure | target | met | machine | command |",
             "| --- | --- | --- | --- | --- | --- |"]
    for file, name, row in TABLE:
        path = RESULTS / file
        if not path.exists():
            lines.append(f"| {name} | not yet run | | | | |")
            continue
        data = json.loads(path.read_text())
        part = _part(data, name)
        figure, target, met = row(data)
        machine = part.get("machine") or {}
        where = (f"{machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, "
                 f"{str(part.get('date', ''))[:10]}")
        mark = {True: "yes", False: "**no**", None: "n/a"}[met]
        lines.append(f"| {name} | {figure} | {target} | {mark} | {where} | "
                     f"`{part.get('command', '')}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "README.md").write_text(render())
    print(render())
