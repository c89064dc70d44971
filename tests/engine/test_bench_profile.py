"""`ember bench throughput --profile`: the op table it prints comes from a real profiled run."""

from ember.bench.throughput import EmberRunner
from ember.bench.workloads import Workload


def test_profile_lists_the_runs_ops(llama_dir):
    runner = EmberRunner(str(llama_dir), "float32", kv_cache_gib=0.05)
    workload = Workload("tiny", [list(range(5, 5 + n)) for n in (3, 17, 40)], 6)
    report = runner.profile(workload, top=30)
    lines = report.splitlines()
    assert lines[0].startswith("profiled run:")
    names = [line.split()[0] for line in lines[1:]]
    assert len(names) == 30
    assert any("linear" in name or "mm" in name for name in names), names  # the products are profiled
    shares = [float(line.rsplit("(", 1)[1].rstrip("%)")) for line in lines[1:]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5
