"""The profile's JSON and the step-time model interpolated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.sim.profile import Profile, ProfiledStepTimes, ServingOverheads, interpolate


def make_profile(**changes: object) -> Profile:
    fields: dict[str, object] = dict(
        model="synthetic", dtype="float32", threads=1, hardware={"cpu": "test"},
        prefill_tokens=[100, 200, 400], prefill_ms=[10.0, 20.0, 60.0],
        decode_batches=[1, 3], decode_contexts=[100, 300],
        decode_ms=[[5.0, 7.0], [8.0, 14.0]],
        kv_bytes_per_token=1000, kv_bandwidth_bytes_per_s=1e6)
    fields.update(changes)
    return Profile(**fields)  # type: ignore[arg-type]


def test_interpolate_hits_points_midpoints_and_extends_the_end_segments() -> None:
    xs, ys = [0.0, 10.0, 20.0], [1.0, 3.0, 13.0]
    assert [interpolate(xs, ys, x) for x in xs] == ys
    assert interpolate(xs, ys, 5.0) == pytest.approx(2.0)
    assert interpolate(xs, ys, 15.0) == pytest.approx(8.0)
    assert interpolate(xs, ys, 30.0) == pytest.approx(23.0)  # last segment continued
    assert interpolate(xs, ys, -10.0) == pytest.approx(0.0)  # clamped at 0, not -1
    assert interpolate([4.0], [7.0], 100.0) == 7.0


def test_interpolate_never_extends_a_falling_end_segment() -> None:
    # One noisy repeat can time the larger point faster; extending that slope would predict
    # steps that shrink with more work, down to 0 ms (a zero TPOT once seen in CI).
    xs, ys = [8.0, 24.0], [0.30, 0.25]
    assert interpolate(xs, ys, 500.0) == 0.25
    assert interpolate(xs, ys, 0.0) == 0.30
    assert interpolate(xs, ys, 16.0) == pytest.approx(0.275)  # inside: still the line
    assert interpolate([0.0, 10.0, 20.0], [1.0, 3.0, 2.0], 40.0) == 2.0


def test_decode_is_bilinear_over_batch_and_context() -> None:
    model = ProfiledStepTimes(make_profile())
    assert model.decode_ms(1, 100) == 5.0
    assert model.decode_ms(3, 300) == 14.0
    assert model.decode_ms(1, 200) == pytest.approx(6.0)
    assert model.decode_ms(2, 100) == pytest.approx(6.5)
    assert model.decode_ms(2, 200) == pytest.approx((6.0 + 11.0) / 2)


def test_step_time_of_prompt_only_decode_only_and_mixed_steps() -> None:
    model = ProfiledStepTimes(make_profile())
    assert model.step_ms(0, 0, 0) == 0.0
    assert model.step_ms(300, 0, 0) == pytest.approx(40.0)
    assert model.step_ms(0, 3, 300) == pytest.approx(14.0)
    # prefill(200 + 3 decode tokens) + decode(3, 300) - decode(3, 100)
    assert model.step_ms(200, 3, 300) == pytest.approx(20.0 + 3 * 40 / 200 + 6.0)


def test_corun_factor_is_the_worst_other_step_and_one_without_factors() -> None:
    plain = ProfiledStepTimes(make_profile())
    assert plain.corun_factor("decode", ["prefill", "decode"]) == 1.0
    model = ProfiledStepTimes(make_profile(corun={"decode": {"prefill": 1.4, "decode": 1.1}}))
    assert model.corun_factor("decode", []) == 1.0
    assert model.corun_factor("decode", ["decode"]) == 1.1
    assert model.corun_factor("decode", ["decode", "prefill"]) == 1.4
    assert model.corun_factor("prefill", ["decode"]) == 1.0  # not measured: no slowdown


def test_transfer_time_is_bytes_over_bandwidth() -> None:
    assert ProfiledStepTimes(make_profile()).transfer_ms(500) == pytest.approx(500.0)


def test_the_deployments_prefill_under_decode_factor_replaces_the_bare_engines() -> None:
    corun = {"prefill": {"decode": 1.05, "prefill": 1.02}, "decode": {"prefill": 1.1}}
    bare = ProfiledStepTimes(make_profile(corun=corun))
    assert bare.corun_factor("prefill", ["decode"]) == 1.05
    measured = ProfiledStepTimes(make_profile(
        corun=corun, serving=ServingOverheads(prefill_under_decode=1.3)))
    assert measured.corun_factor("prefill", ["decode"]) == 1.3
    assert measured.corun_factor("prefill", ["prefill"]) == 1.02  # only prefill under decode
    assert measured.corun_factor("decode", ["prefill"]) == 1.1
    assert measured.corun_factor("prefill", []) == 1.0
    # measured without co-run factors at all: the deployment's factor still applies
    only = ProfiledStepTimes(make_profile(serving=ServingOverheads(prefill_under_decode=1.3)))
    assert only.corun_factor("prefill", ["decode", "prefill"]) == 1.3
    with pytest.raises(ValueError, match="prefill_under_decode"):
        ServingOverheads(prefill_under_decode=-1.0)


def test_the_colocated_pairs_decode_under_decode_factor_replaces_the_bare_engines() -> None:
    corun = {"prefill": {"decode": 1.05}, "decode": {"prefill": 1.1, "decode": 1.02}}
    measured = ProfiledStepTimes(make_profile(corun=corun, serving=ServingOverheads(
        prefill_under_decode=1.3, decode_under_decode=1.35)))
    assert measured.corun_factor("decode", ["decode"]) == 1.35
    assert measured.corun_factor("decode", ["prefill"]) == 1.1
    assert measured.corun_factor("decode", ["prefill", "decode"]) == 1.35
    assert measured.corun_factor("prefill", ["decode"]) == 1.3
    unmeasured = ProfiledStepTimes(make_profile(corun=corun))
    assert unmeasured.corun_factor("decode", ["decode"]) == 1.02
    with pytest.raises(ValueError, match="decode_under_decode"):
        ServingOverheads(decode_under_decode=-0.5)


def test_json_round_trip(tmp_path: Path) -> None:
    profile = make_profile(serving=ServingOverheads(12.5, 30.0, 1.5, 1.25, 1.4),
                           corun={"prefill": {"decode": 1.25}, "decode": {"prefill": 1.5}})
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile


@pytest.mark.parametrize("changes", [
    {"prefill_tokens": [100, 100, 400]},
    {"prefill_ms": [1.0]},
    {"decode_ms": [[5.0, 7.0]]},
    {"decode_ms": [[5.0], [8.0]]},
    {"kv_bandwidth_bytes_per_s": 0.0},
    {"corun": {"verify": {"decode": 1.1}}},
    {"corun": {"decode": {"prefill": 0.0}}},
])
def test_malformed_profiles_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_profile(**changes)


def test_a_file_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="splitserve-profile"):
        Profile.from_json({"kind": "bench-serve-sweep", "version": 1})


def test_the_deployments_decode_under_prefill_factor_replaces_the_bare_engines() -> None:
    corun = {"prefill": {"decode": 1.05}, "decode": {"prefill": 1.03, "decode": 1.02}}
    measured = ProfiledStepTimes(make_profile(corun=corun, serving=ServingOverheads(
        decode_under_prefill=1.25)))
    assert measured.corun_factor("decode", ["prefill"]) == 1.25
    assert measured.corun_factor("decode", ["decode"]) == 1.02  # only decode under prefill
    assert measured.corun_factor("prefill", ["prefill"]) == 1.0
    unmeasured = ProfiledStepTimes(make_profile(corun=corun))
    assert unmeasured.corun_factor("decode", ["prefill"]) == 1.03
    with pytest.raises(ValueError, match="decode_under_prefill"):
        ServingOverheads(decode_under_prefill=-0.1)


def test_the_background_streams_mean_gap_is_read_inside_a_window() -> None:
    from splitserve.bench.kv import UnderDecode

    run = UnderDecode([], [0.0, 0.04, 0.08, 0.12, 0.20, 0.30, 0.40], 0.12, 0.40)
    assert run.mean_gap_ms(0.0, run.measured_from) == pytest.approx(40.0)
    assert run.mean_gap_ms(run.measured_from, run.measured_to) == pytest.approx(280.0 / 3)
    assert run.mean_gap_ms(0.5, 1.0) == 0.0  # no chunk in it
    assert run.mean_gap_ms(0.19, 0.25) == 0.0  # one
    # The slowdown: the gaps while measured over those in the 0.12 s before, its first 0.02 s
    # left out (chunks at 0.04, 0.08, 0.12: 40 ms apart).
    assert run.slowdown(0.12, skip_s=0.02) == pytest.approx((280.0 / 3) / 40.0)
    assert run.slowdown(0.03, skip_s=0.0) == 0.0  # one chunk alone before: not measured
    assert UnderDecode([], [0.0, 0.04, 0.08, 0.12, 0.5], 0.12, 0.40).slowdown(0.12, 0.02) == 0.0
