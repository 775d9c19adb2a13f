"""Benchmark records and the tables of docs/benchmarks.md generated from them: the envelope
every bench writes, records -> tables, the marker section rewritten in place, `--check`, and
the committed page matching the committed records (figures are never copied by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heron.bench.record import Results, Row, make_record, record_path, speed_row, write_record
from heron.bench.report import BEGIN, END, load_records, render, report, update
from heron.cli import build_parser, main
from heron.cli.bench.common import command_line, settings
from heron.errors import InvalidRequestError

REPO = Path(__file__).resolve().parents[2]

XEON = {
    "cpu_model": "Intel(R) Xeon(R) Platinum 8488C",
    "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile"],
    "usable_cpus": 2,
    "memory_gib": 8.0,
    "torch_version": "2.13.0",
    "heron_kernels": True,
}
EPYC = {**XEON, "cpu_model": "AMD EPYC 9R14", "cpu_flags": ["avx2", "avx512f"]}


def write(folder: Path, name: str, machine: dict, bench: str, date: str, rows: list[Row]) -> Path:
    record = {
        "bench": bench,
        "heron_version": "0.1.0",
        "git_commit": "abc123",
        "date": date,
        "command": f"heron bench {bench} --num-prompts 16",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf, bfloat16 on cpu",
        "machine": machine,
        "machine_slug": name,
        "load": {"load_average": [1.0, 1.0, 1.0], "other_cpu_busy": 0.5},
        "table": [vars(r) for r in rows],
    }
    return write_record(record, folder / name / f"{bench}-{date.replace(':', '')}.json")


@pytest.fixture
def records(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    older = [speed_row("generated tok/s", 100.0, "transformers", 50.0)]
    newer = [
        speed_row("generated tok/s, none weights", 1105.3, "transformers", 507.0),
        speed_row("generated tok/s, 2 replicas", 30.0),
    ]
    write(results, "xeon-2cpu-amx", XEON, "throughput", "2026-01-01T00:00:00Z", older)
    write(results, "xeon-2cpu-amx", XEON, "throughput", "2026-02-01T00:00:00Z", newer)
    ppl = [Row("perplexity, int4 weights", 27.83, "transformers (bfloat16)", 27.86)]
    write(results, "xeon-2cpu-amx", XEON, "latency", "2026-01-15T00:00:00Z", ppl)
    write(results, "epyc-2cpu-avx512", EPYC, "latency", "2026-01-20T00:00:00Z", [])
    return results


def test_records_become_one_table_per_bench_and_machine(records: Path):
    section = render(load_records(records), records.parent / "docs")
    assert section.startswith(BEGIN) and section.rstrip().endswith(END)
    # machines in slug order, each with its flags; benches by name
    epyc, xeon = section.index("### AMD EPYC 9R14"), section.index("### Intel(R) Xeon(R)")
    assert epyc < xeon
    assert "avx2 avx512f avx512_bf16 amx_tile" in section
    assert section.index("#### heron bench latency", xeon) < section.index(
        "#### heron bench throughput", xeon
    )
    # the latest record of a bench, with its date, commit and load, and a link to it
    assert "| generated tok/s, none weights | 1,105 | transformers: 507.0 | 2.18x |" in section
    assert "| generated tok/s, 2 replicas | 30.00 | - | - |" in section
    assert "| generated tok/s | 100.0 |" not in section
    assert "2026-02-01T00:00:00Z, heron 0.1.0 at abc123" in section
    assert "other processes kept 0.5 CPUs busy" in section
    assert "the latest of 2" in section
    assert "(../results/xeon-2cpu-amx/throughput-2026-02-01T000000Z.json" in section
    assert "`heron bench throughput --num-prompts 16`" in section
    # no ratio where it means nothing; an empty table says so
    assert "| perplexity, int4 weights | 27.83 | transformers (bfloat16): 27.86 | - |" in section
    assert "| (no rows) | - | - | - |" in section


def test_update_rewrites_only_the_marked_section(records: Path):
    text = f"# Benchmarks\n\nprose before\n\n{BEGIN}\nstale table\n{END}\n\nprose after\n"
    section = render(load_records(records))
    updated = update(text, section)
    assert updated.startswith("# Benchmarks\n\nprose before\n\n")
    assert updated.endswith(f"{END}\n\nprose after\n")
    assert "stale table" not in updated and "1,105" in updated
    assert update(updated, section) == updated  # idempotent
    with pytest.raises(InvalidRequestError, match="--docs"):
        update("no markers here", section)


def test_check_fails_on_a_stale_page_until_it_is_regenerated(records: Path, capsys):
    docs = records.parent / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n{BEGIN}\n{END}\n")
    flags = ["bench", "report", "--results", str(records), "--docs", str(docs)]
    assert main([*flags, "--check"]) == 1
    assert "does not match the records" in capsys.readouterr().err
    assert docs.read_text() == f"# Benchmarks\n\n{BEGIN}\n{END}\n"  # --check writes nothing
    assert main(flags) == 0
    assert main([*flags, "--check"]) == 0
    # a new record makes the page stale again
    write(records, "xeon-2cpu-amx", XEON, "latency", "2026-03-01T00:00:00Z", [])
    assert main([*flags, "--check"]) == 1


def test_a_file_that_is_not_a_record_is_an_error(records: Path):
    (records / "notes.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(InvalidRequestError, match="not a benchmark record"):
        load_records(records)


def test_the_committed_page_matches_the_committed_records():
    """docs/benchmarks.md's figures come from benchmarks/results: run `make bench-report`."""
    current, generated = report(REPO / "benchmarks" / "results", REPO / "docs" / "benchmarks.md")
    assert load_records(REPO / "benchmarks" / "results"), "no committed records"
    assert current == generated, "docs/benchmarks.md is out of date: run `heron bench report`"


def test_every_record_has_the_common_envelope(tmp_path: Path):
    parse = build_parser().parse_args
    args = parse(["bench", "throughput", "--num-prompts", "16", "--skip-llama-cpp", "--record"])
    command = command_line(args)
    assert command == "heron bench throughput --num-prompts 16 --skip-llama-cpp"
    # a flag that stores False is named as typed, not by its destination
    kv = parse(["bench", "kv", "--lengths", "300", "--no-prefix-caching", "--json", "x.json"])
    assert command_line(kv) == "heron bench kv --no-prefix-caching --lengths 300"
    given = settings(args)
    assert given["num_prompts"] == 16 and given["skip_llama_cpp"] is True
    assert "record" not in given and "json" not in given and "func" not in given
    rows = [speed_row("generated tok/s", 20.0, "transformers", 10.0)]
    record = make_record(Results("throughput", {"heron": {"x": 1}}, rows, "m"), given, command)
    for key in ("bench", "heron_version", "git_commit", "date", "command", "settings"):
        assert key in record
    assert record["date"].endswith("Z") and record["table"][0]["ratio"] == 2.0
    assert record["heron"] == {"x": 1}  # the bench's own results beside the envelope
    machine = record["machine"]
    assert machine["cpu_model"] and machine["torch_version"] and "cpu_flags" in machine
    assert record["machine_slug"] in str(record_path("out", record))
    assert record_path("out", record).name.startswith("throughput-")
    path = write_record(record, record_path(tmp_path, record))
    assert load_records(tmp_path)[0].path == path
