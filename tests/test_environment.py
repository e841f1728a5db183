"""Run provenance: the machine record of each start of a run, and the bench's machines table."""

from __future__ import annotations

import json

import torch

from semiseg import environment
from semiseg.bench import RunResult, machines_table
from semiseg.environment import cpu_model, cpu_vendor, describe, machine_label, read_cpuinfo
from semiseg.run_folder import RunFolder

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor 2
flags\t\t: fpu sse avx2
"""


def test_cpu_model_reads_the_name_and_the_bf16_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    model, flags = cpu_model(info)
    assert model == "Intel(R) Xeon(R) Processor"
    assert flags == ["amx_bf16", "avx512_bf16", "amx_tile", "avx512f", "avx2"]
    # No /proc/cpuinfo (macOS, Windows): a name from `platform`, no flags.
    model, flags = cpu_model(tmp_path / "absent")
    assert isinstance(model, str) and flags == []


def test_read_cpuinfo_keeps_the_first_processor(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert read_cpuinfo(info)["model name"] == "Intel(R) Xeon(R) Processor"
    assert "amx_bf16" in read_cpuinfo(info)["flags"]
    assert read_cpuinfo(tmp_path / "absent") == {}
    monkeypatch.setattr(environment, "CPUINFO", info)
    assert cpu_vendor() == "GenuineIntel"
    assert describe()["cpu_vendor"] == "GenuineIntel"


def test_describe_is_json_and_names_the_software():
    record = json.loads(json.dumps(describe("cpu")))
    assert record["device"] == "cpu" and "gpu" not in record
    assert record["torch"] and record["python"] and record["cores"] >= 1
    assert record["torch_threads"] >= 1
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_machine_label_tells_cpu_generations_and_gpus_apart():
    amx = {"cpu": "Intel(R) Xeon(R) Processor", "cpu_flags": ["amx_bf16", "avx512_bf16"]}
    amd = {"cpu": "AMD EPYC 9R14", "cpu_flags": ["avx512_bf16", "avx512f"]}
    for record in (amx, amd):
        record.update(cores=2, torch="2.15.0")
    assert machine_label(amx) == "Intel(R) Xeon(R) Processor (amx_bf16) x2, torch 2.15.0"
    assert machine_label(amd) == "AMD EPYC 9R14 (avx512_bf16) x2, torch 2.15.0"
    assert machine_label({"cpu": "Apple M2", "cores": 8, "torch": "2.15.0"}) == (
        "Apple M2 x8, torch 2.15.0"
    )
    gpu = {**amd, "gpu": "NVIDIA H100 80GB HBM3"}
    assert machine_label(gpu) == "NVIDIA H100 80GB HBM3, torch 2.15.0"


def test_run_folder_appends_one_record_per_start(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_environments() == []
    run.record_environment({"iteration": 0, "cpu": "a"})
    run.record_environment({"iteration": 8, "cpu": "b"})
    assert [e["iteration"] for e in run.read_environments()] == [0, 8]
    # A kill mid-append tears the last line: the records before it still read.
    with run.environment.open("a") as f:
        f.write('{"iteration": 12, "cp')
    assert [e["iteration"] for e in run.read_environments()] == [0, 8]


def test_machines_table_lists_each_machine_and_unrecorded_runs():
    a, b = "AMD EPYC x2, torch 2.15.0", "Xeon (amx_bf16) x2, torch 2.15.0"
    results = [
        RunResult("supervised", 0, 0.6, 0.3, 0.2, 10, machines=(a,)),
        RunResult("supervised", 1, 0.6, 0.3, 0.2, 10, machines=(b,)),
        RunResult("fixmatch", 0, 0.6, 0.3, 0.2, 10, machines=(a, b)),
        RunResult("fixmatch", 1, 0.6, 0.3, 0.2, 10),
    ]
    assert machines_table(results).splitlines()[2:] == [
        f"| {a} | supervised 0, fixmatch 0 |",
        f"| {b} | supervised 1, fixmatch 0 |",
        "| not recorded | fixmatch 1 |",
    ]
    # Records from before environment.jsonl: nothing to say, no table.
    assert machines_table([RunResult("supervised", 0, 0.6, 0.3, 0.2, 10)]) == ""
