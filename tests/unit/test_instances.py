"""The instance table and fit checks (pure: no AWS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral import instances
from corral.errors import PlanError
from corral.instances import (
    ecs_reserved_mib,
    expand,
    fitting,
    load_instance_types,
    split_allowed,
    table_info,
)
from corral.plan import make_plan
from corral.routes import check_fits
from corral.spec import Resources, loads_workflow


def test_table_has_a_dated_header_and_sane_rows() -> None:
    info = table_info()
    assert info["region"] and info["date"] and info["currency"] == "USD"
    table = load_instance_types()
    assert len(table) > 200
    m5 = table["m5.large"]
    assert (m5.vcpus, m5.memory_mib, m5.gpus, m5.family) == (2, 8192, 0, "m5")
    assert 0 < m5.spot_usd_hour < m5.on_demand_usd_hour
    g = table["g4dn.12xlarge"]
    assert g.gpus == 4 and g.gpu_model == "T4"
    assert table["p3.2xlarge"].gpu_model == "V100"
    for t in table.values():
        assert t.vcpus > 0 and t.memory_mib > 0 and t.on_demand_usd_hour > 0


def test_expand_keywords_families_and_names() -> None:
    optimal = {t.family for t in expand(["optimal"])}
    assert optimal == {"c6i", "m6i", "r6i", "c7i"}
    assert {t.family for t in expand(["default_arm64"])} == {"c6g", "m6g", "r6g", "c7g"}
    assert [t.name for t in expand(["m5"])][:2] == ["m5.large", "m5.xlarge"]
    assert [t.name for t in expand(["c5.2xlarge", "c5.2xlarge"])] == ["c5.2xlarge"]
    assert expand(["z9.unknown"]) == []
    assert {t.family for t in expand([])} == optimal  # nothing given: what Batch's default means


def test_fitting_keeps_ecs_overhead_and_sorts_by_price() -> None:
    # 8 GiB exactly does not fit an 8 GiB instance: ECS keeps some memory for itself
    fits = fitting(Resources(vcpus=2, memory=8192), ["m5"])
    assert fits[0].name == "m5.xlarge"
    fits = fitting(Resources(vcpus=2, memory=7000), ["m5"])
    assert fits[0].name == "m5.large"
    assert ecs_reserved_mib(8192) == 492 and ecs_reserved_mib(1024) == 256
    prices = [t.on_demand_usd_hour for t in fitting(Resources(vcpus=1, memory=1024), ["optimal"])]
    assert prices == sorted(prices)
    gpu = fitting(Resources(vcpus=4, memory=8192, gpus=4), ["g4dn", "g5"])
    assert {t.name for t in gpu} >= {"g4dn.12xlarge", "g5.12xlarge"} and all(t.gpus >= 4 for t in gpu)


def test_split_allowed_routes_gpu_families() -> None:
    assert split_allowed(["optimal"]) == (["optimal"], ["g4dn", "g5", "g6"])
    assert split_allowed(["m5", "g5.xlarge", "p3"]) == (["m5"], ["g5.xlarge", "p3"])
    assert split_allowed(["g5"]) == (["optimal"], ["g5"])


def _plan(resources: str, source: str = "wf.yaml"):
    return make_plan(loads_workflow(f"""
name: w
items: [{{k: a}}]
stages:
  - name: small
    command: echo {{k}}
  - name: big
    command: echo {{k}}
    resources: {resources}
""", source=source))


def test_check_fits_accepts_what_fits_and_names_what_does_not() -> None:
    check_fits(_plan("{vcpus: 64, memory: 100GiB}"), ["optimal"])
    check_fits(_plan("{gpus: 8, memory: 200GiB}"), ["optimal"])
    with pytest.raises(PlanError) as exc:
        check_fits(_plan("{vcpus: 16, memory: 250GiB}"), ["c5"])
    e = exc.value
    assert "'big'" in e.message and "c5.24xlarge" in e.message and "(c5)" in e.message
    assert e.where == "wf.yaml:9:16"  # the resources mapping of stage big
    assert "instance_types" in e.hint
    with pytest.raises(PlanError, match="9 GPUs") as exc:
        check_fits(_plan("{gpus: 9}"), ["optimal"])
    assert "at most 8 GPUs" in exc.value.hint


def test_unknown_instance_names_are_left_to_aws() -> None:
    check_fits(_plan("{vcpus: 400}"), ["x9z"])  # the snapshot does not know x9z: nothing to refuse


def test_prices_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({
        "region": "eu-west-1", "date": "2030-01-01", "currency": "USD",
        "instances": {"m5.large": {"vcpus": 2, "memory_mib": 8192, "on_demand_usd_hour": 0.107}},
    }))
    monkeypatch.setenv("CORRAL_PRICES", str(path))
    assert table_info()["region"] == "eu-west-1"
    table = load_instance_types()
    assert list(table) == ["m5.large"] and table["m5.large"].spot_usd_hour == 0.107
    monkeypatch.setenv("CORRAL_PRICES", str(tmp_path / "missing.json"))
    with pytest.raises(PlanError, match="CORRAL_PRICES"):
        load_instance_types()
    instances._load.cache_clear()


def test_fargate_sizes() -> None:
    from corral.instances import fargate_size, wants_fargate

    assert fargate_size(Resources(vcpus=0.25, memory=512)) == (0.25, 512)
    assert fargate_size(Resources(vcpus=0.25, memory=1500)) == (0.25, 2048)
    assert fargate_size(Resources(vcpus=1, memory=2048)) == (1, 2048)
    assert fargate_size(Resources(vcpus=1, memory=9000)) == (2, 9216)
    assert fargate_size(Resources(vcpus=4, memory=31000)) == (8, 32768)
    assert fargate_size(Resources(vcpus=16, memory=120 * 1024)) == (16, 122880)
    assert fargate_size(Resources(vcpus=16, memory=121 * 1024)) is None
    assert fargate_size(Resources(vcpus=17)) is None
    assert fargate_size(Resources(gpus=1)) is None
    assert fargate_size(Resources(disk="300GiB")) is None
    assert wants_fargate(["optimal", "Fargate"]) and not wants_fargate(["optimal"])
    assert split_allowed(["fargate"]) == (["optimal"], ["g4dn", "g5", "g6"])
