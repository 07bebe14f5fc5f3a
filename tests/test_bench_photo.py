"""dlg-bench on the photo-digits preset: its own model reference (name, chunks, command, statistics), its workload
and report section, and its place in the registry (not in the default workloads nor --quick)."""

import hashlib
import json
import math

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from dlg_sampler import digits, photo_digits
from dlg_sampler.bench import cli, reference, report, workloads
from dlg_sampler.bench import registry as R
from dlg_sampler.models import load_model
from dlg_sampler.shards import sha256

PHOTO_SHAPE = (3, 16, 16)


@pytest.fixture
def cheap(monkeypatch):
    """A tiny reference sampler and convergence check (3 steps), and photo-digits splits of 64 images (the full
    splits take tens of seconds to build)."""
    monkeypatch.setattr(reference, "REFERENCE_STEPS", 3)
    monkeypatch.setattr(reference, "CHECK_STEPS", 3)
    monkeypatch.setattr(photo_digits.PhotoDigitsEvaluator, "load_data",
                        staticmethod(lambda split: photo_digits.make_photo_digits(64, split, 0)[0]))


def _checksum(pipeline_dir):
    files = sorted((pipeline_dir / "unet").glob("*.safetensors"))
    return hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()


def test_reference_names_keep_digits_and_name_the_photo_digits_model():
    """The digits reference keeps its file name (made references stay valid); photo-digits' names its own model."""
    digits_sum, photo_sum = _checksum(digits.PIPELINE_DIR), _checksum(photo_digits.PIPELINE_DIR)
    assert digits_sum != photo_sum
    assert reference.reference_name(10000, 0) == f"digits-{digits_sum[:12]}-karras_heun100-n10000-seed0"
    assert reference.reference_name(5000, 0, "photo-digits") == \
        f"photo-digits-{photo_sum[:12]}-karras_heun100-n5000-seed0"
    assert reference.model_checksum("photo-digits") == photo_sum


def test_photo_digits_reference_adopts_chunks_drawn_before(tmp_path, monkeypatch, cheap):
    """Chunks already in ``<name>.chunks`` (another process drawing the same reference) are kept as they are; the
    missing ones are drawn with the same seeds, so the result equals one uninterrupted run."""
    monkeypatch.setattr(reference, "CHUNK", 4)
    name = reference.reference_name(8, 0, "photo-digits")
    drawn_before = torch.full((4, *PHOTO_SHAPE), 0.5)
    reference.sample_in_chunks(lambda m, g: drawn_before, 4, "reference", 0, tmp_path / f"{name}.chunks", "x")
    samples, info = reference.make_reference(8, 0, tmp_path, preset="photo-digits")
    model = load_model(str(photo_digits.PIPELINE_DIR))
    g = torch.Generator().manual_seed(reference.chunk_seed("reference", 0, 1))
    second = reference._vanilla_draw(model, "karras_heun", 3)(4, g)
    assert torch.equal(samples[:4], drawn_before) and torch.allclose(samples[4:], second)
    assert info["preset"] == "photo-digits" and info["model_sha256"] == _checksum(photo_digits.PIPELINE_DIR)
    assert not (tmp_path / f"{name}.chunks").exists() and (tmp_path / f"{name}.safetensors").exists()


def test_reference_command_makes_the_photo_digits_reference_check_and_statistics(tmp_path, cheap):
    stats = tmp_path / "stats.safetensors"
    cli.main(["reference", "--workloads", "photo-digits", "--reference-n", "8", "--check-n", "8",
              "--reference-dir", str(tmp_path / "ref"), "--stats-out", str(stats)])
    samples, info = reference.load_reference(8, 0, tmp_path / "ref", "photo-digits")
    assert samples.shape == (8, *PHOTO_SHAPE) and info["check"]["n"] == 8
    assert all(math.isfinite(info["check"][k]) for k in ("fd_check", "fd_floor", "class_tv_check"))
    evaluator = photo_digits.PhotoDigitsEvaluator()
    written = load_file(str(stats))
    assert torch.allclose(written["mu"].float(), evaluator.features(samples.clamp(-1, 1)).mean(0).double().float(),
                          atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(stats), "pt") as f:
        meta = f.metadata()
    assert meta["n"] == "8" and "--workloads photo-digits" in meta["made_by"] and meta["sha256"] == info["sha256"]


def test_second_family_reference_has_its_own_name_noise_and_convergence_check(tmp_path, cheap):
    """``--reference-sampler DPM++2M``: another file, chunks drawn from their own noise (no sample shared with the
    primary), its NFE counted for its sampler, and a convergence check made with the primary's sampler."""
    ref = tmp_path / "ref"
    for extra in ([], ["--reference-sampler", "DPM++2M", "--reference-steps", "4"]):
        cli.main(["reference", "--workloads", "photo-digits", "--reference-n", "6", "--check-n", "6",
                  "--reference-dir", str(ref)] + extra)
    first, info1 = reference.load_reference(6, 0, ref, "photo-digits")
    second, info2 = reference.load_reference(6, 0, ref, "photo-digits", "DPM++2M", 4)
    assert "DPM++2M4-n6" in reference.reference_name(6, 0, "photo-digits", "DPM++2M", 4)
    assert info2["sampler"] == "DPM++2M" and info2["steps"] == 4 and info2["nfe"] == 4 and info1["nfe"] == 5
    assert info2["check"]["sampler"].startswith("karras_heun") and info1["check"]["sampler"].startswith("DPM++2M")
    assert reference.chunk_kind("DPM++2M") != reference.chunk_kind() == "reference"
    assert torch.cdist(first.flatten(1), second.flatten(1)).min() > 1.0  # independent draws, not one path twice
    with pytest.raises(reference.ReferenceError, match="--reference-sampler DPM\\+\\+2M --reference-steps 4"):
        path = ref / f"{reference.reference_name(6, 0, 'photo-digits', 'DPM++2M', 4)}.json"
        path.write_text(path.read_text().replace(info2["sha256"], "0" * 64))
        reference.load_reference(6, 0, ref, "photo-digits", "DPM++2M", 4)


def test_second_reference_scores_every_row_and_is_not_made_where_the_workload_has_none(tmp_path, monkeypatch,
                                                                                       cheap):
    """A preset workload given a second reference reports ``fd_ref2`` beside ``fd_ref`` (and how far the two
    references are apart); photo-digits has none by default, so the reference command asks for --reference-n."""
    x = torch.rand(10, *PHOTO_SHAPE) * 2 - 1
    w = workloads.digits_workload(10, x, {"n": 10}, "photo-digits", second=(x.flip(0) * 0.9, {"n": 10}))
    scores = w.evaluate(x)
    assert w.metrics[:2] == ("fd_ref", "fd_ref2") and scores["fd_ref2"] > scores["fd_ref"]
    assert w.info["second reference"] == {"n": 10} and w.info["FD second reference vs model reference"] > 0
    assert "fd_ref2" not in workloads.digits_workload(10, x, {"n": 10}, "photo-digits").evaluate(x)
    monkeypatch.setattr(cli, "make_reference", lambda *a, **k: pytest.fail("must refuse first"))
    assert R.WORKLOADS["photo-digits"].second_reference_n == 0 and R.WORKLOADS["digits"].second_reference_n > 0
    with pytest.raises(SystemExit, match="no DPM\\+\\+2M reference"):
        cli.main(["reference", "--workloads", "photo-digits", "--reference-sampler", "DPM++2M"])


def test_ensure_reference_defaults_to_the_preset_workloads_size(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "make_reference", lambda n, seed, folder, preset, sampler, steps: (n, preset))
    assert reference.ensure_reference(None, 0, tmp_path, "photo-digits") == (5000, "photo-digits")
    assert reference.ensure_reference(None, 0, tmp_path) == (reference.REFERENCE_N, "digits")


def test_corrupt_photo_digits_reference_names_its_workload_in_the_remake_command(tmp_path):
    path = tmp_path / f"{reference.reference_name(6, 0, 'photo-digits')}.safetensors"
    reference.save_reference(torch.randn(6, *PHOTO_SHAPE), path, {"n": 6, "seed": 0})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(reference.ReferenceError, match="photo-digits model reference") as err:
        reference.ensure_reference(6, 0, tmp_path, "photo-digits")
    assert f"--reference-n 6 --reference-seed 0 --reference-dir {tmp_path} --workloads photo-digits" in str(err.value)


@pytest.mark.parametrize("argv, error", [
    (["--workloads", "mixture"], "mixture has no model reference"),
    (["--workloads", "digits", "photo-digits", "--stats-out", "s.safetensors"], "run it once per workload"),
])
def test_reference_command_refuses_before_any_sampling(argv, error, monkeypatch, capsys):
    monkeypatch.setattr(cli, "make_reference", lambda *a, **k: pytest.fail("must refuse first"))
    with pytest.raises(SystemExit, match=error):
        cli.main(["reference"] + argv)


def _plan(argv, monkeypatch, tmp_path):
    """The runs ``dlg-bench argv`` plans (nothing runs)."""
    planned = []
    monkeypatch.setattr(cli, "execute", lambda plan, store, build: planned.extend(plan) or 0)
    monkeypatch.setattr(cli, "report", lambda out: out / "RESULTS.md")
    cli.main(argv + ["--out", str(tmp_path)])
    return planned


@pytest.mark.parametrize("argv", [[], ["--quick"]])
def test_default_and_quick_runs_leave_photo_digits_out(argv, monkeypatch, tmp_path):
    workloads = {r.workload for r in _plan(argv, monkeypatch, tmp_path)}
    assert "photo-digits" not in workloads and "digits" in workloads and "mixture" in workloads


def test_photo_digits_plan_runs_its_peers_budgets_lever_and_paper_sweeps_only(monkeypatch, tmp_path, capsys):
    plan = _plan(["--workloads", "photo-digits"], monkeypatch, tmp_path)
    spec = R.WORKLOADS["photo-digits"]
    assert {r.workload for r in plan} == {"photo-digits"} and {r.n for r in plan} == {spec.n}
    vanilla = {r.spec["sampler"] for r in plan if r.spec["kind"] == "vanilla"}
    assert vanilla == {"UniPC", "UniPC-3", "DPM++2M", "DPM++3M-logSNR", "DEIS-3", "UniPC-GITS"}
    assert vanilla <= set(R.PEERS)
    assert {r.budget for r in plan if r.spec["kind"] == "vanilla"} == {6, 8, 10, 12, 15, 20}
    assert {r.budget for r in plan if "chosen" in r.tags} == {r.budget for r in plan if "tuned" in r.tags} \
        == {6, 8, 10, 12, 15, 20}
    extra = {t.split("=")[0] for r in plan for t in r.tags if t.startswith(("lever:", "config:"))}
    assert extra == {"lever:restart_sigma-photo-digits", "config:paper-sweeps", "config:fitted-schedule"}
    sigmas = {r.spec["config"]["restart_sigma"] for r in plan if "restart_sigma" in r.spec.get("config", {})}
    assert sigmas == {6.0, 12.0, 48.0}
    assert {r.budget for r in plan if any(t.startswith("lever:") for t in r.tags)} == set(R.LEVER_BUDGETS)
    # the paper's protocol fixes its denoising steps: one run per seed, placed at its measured whole cost
    assert {r.budget for r in plan if any(t.startswith("config:paper") for t in r.tags)} == {None}
    assert {r.budget for r in plan if any(t.startswith("config:fitted") for t in r.tags)} == set(R.LEVER_BUDGETS)
    assert f"{len(plan)} runs planned" in capsys.readouterr().out


# 5000: the photo-digits reference made (or being made) with the default command is n5000.
@pytest.mark.parametrize("argv, n", [([], 5000), (["--quick"], reference.QUICK_REFERENCE_N),
                                     (["--reference-n", "300"], 300)])
def test_photo_digits_run_asks_for_its_own_reference(argv, n, tmp_path, monkeypatch):
    """``dlg-bench --workloads photo-digits`` scores against the photo-digits reference of the workload's size (the
    one ``dlg-bench reference --workloads photo-digits`` makes), in --reference-dir."""
    asked = []

    def ensure(*args):
        asked.append(args)
        raise KeyboardInterrupt  # stop before loading anything

    monkeypatch.setattr(workloads, "ensure_reference", ensure)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--workloads", "photo-digits", "--seeds", "0", "--samplers", "UniPC", "--levers", "--configs",
                  "--reference-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "out")] + argv)
    assert asked == [(n, 0, tmp_path / "ref", "photo-digits")]


def test_tiny_photo_digits_bench_scores_its_runs_and_reports_a_verdict(tmp_path, cheap):
    """A vanilla peer, the chosen DLG point and the tuned sampler on the photo-digits model, scored against its own
    (tiny) reference by its evaluator; RESULTS.md has its section and verdict table."""
    out = tmp_path / "out"
    cli.main(["--workloads", "photo-digits", "--n", "40", "--seeds", "0", "--nfe", "8", "--samplers", "UniPC",
              "--levers", "--configs", "--reference-n", "8", "--reference-dir", str(tmp_path / "ref"),
              "--out", str(out)])
    rows = [json.loads(line) for line in (out / report.RESULTS).read_text().splitlines()]
    assert {r["spec"]["kind"] for r in rows} == {"vanilla", "dlg", "tuned"}
    for r in rows:
        assert r["workload"] == "photo-digits" and r["nfe"] <= 8
        assert all(math.isfinite(r[m]) for m in ("fd_ref", "kid_ref", "kid_ref_se", "fd_real", "class_tv"))
        assert r["kid_ref_se"] > 0
    md = (out / "RESULTS.md").read_text()
    assert "KID vs model reference" in md and "KID s.e." in md
    section = md.split("## photo-digits")[1].split("## Targets")[0]
    assert "### DLG against the best peer (UniPC)" in section and "| 8 | FD vs model reference | UniPC" in section
    assert "8 samples" in section and "a quick reference" in section
    meta = json.loads((out / report.META).read_text())  # a full photo-digits reference (5000) is not a quick one
    meta["workloads"]["photo-digits"]["reference"]["n"] = R.WORKLOADS["photo-digits"].reference_n
    (out / report.META).write_text(json.dumps(meta))
    section = report.report(out).read_text().split("## photo-digits")[1]
    assert "5000 samples" in section and "a quick reference" not in section


def test_train_classifier_on_photo_digits(tmp_path, monkeypatch):
    """``dlg-train-classifier --data photo-digits``: a classifier of 3x16x16 samples on the photo model's levels."""
    from dlg_sampler.cli import train_classifier_main

    monkeypatch.setattr(photo_digits.PhotoDigitsEvaluator, "load_data",
                        staticmethod(lambda split: photo_digits.make_photo_digits(32, split, 0)[0]))
    train_classifier_main(["--data", "photo-digits", "--steps", "2", "--batch-size", "8", "--channels", "8",
                           "--hidden", "16", "--num-levels", "10", "--out", str(tmp_path / "clf")])
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    ac = DDPMScheduler.from_pretrained(photo_digits.PIPELINE_DIR / "scheduler").alphas_cumprod.double()
    sigmas = ((1 - ac) / ac).sqrt()
    assert config["sample_shape"] == list(PHOTO_SHAPE)
    assert config["sigma_min"] == pytest.approx(float(sigmas[0]))
    assert config["sigma_max"] == pytest.approx(float(sigmas[-1]))
